"""worker/python as an installable package (setup.py, pyproject.toml).

Installs a copy of worker/python (and proto/) into a fresh virtualenv with
`pip install --no-build-isolation --no-index`, offline, and imports it from
elsewhere with no PYTHONPATH: the generated handoff_pb2 must come from inside
the venv's site-packages, protobuf from the system (a declared requirement,
never downloaded). The builds run in temporary copies, so nothing (build/,
*.egg-info) is written into the repository. Run with /usr/bin/python3, whose
site packages have protobuf, setuptools and wheel (Debian packages).
"""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import unittest

REPO = pathlib.Path(__file__).resolve().parents[3]
GENERATED = pathlib.Path("fdbroker_worker", "_generated", "fdbroker", "v1",
                         "handoff_pb2.py")
# Whatever would make a subprocess find the package, or a proto, or a pip
# setting, without installing it.
_SCRUBBED = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE",
             "VIRTUAL_ENV", "FDBROKER_PYTHON_PROTO_DIR", "FDBROKER_PROTO_DIR",
             "PROTOC")


def clean_env(**extra: str) -> dict:
    env = {key: value for key, value in os.environ.items()
           if key not in _SCRUBBED and not key.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull,  # no find-links, no index from
               PIP_DISABLE_PIP_VERSION_CHECK="1",  # /etc/pip.conf & co
               PIP_NO_INPUT="1")
    env.update(extra)
    return env


def copy_sources(into: pathlib.Path, with_proto: bool = True) -> pathlib.Path:
    """Copies worker/python (and proto/) into `into`; returns the package dir."""
    ignore = shutil.ignore_patterns("build", "dist", "*.egg-info",
                                    "__pycache__", "_generated")
    package = into / "worker" / "python"
    shutil.copytree(REPO / "worker" / "python", package, ignore=ignore)
    if with_proto:
        shutil.copytree(REPO / "proto" / "fdbroker", into / "proto" / "fdbroker")
    return package


def run(command: list, cwd: pathlib.Path, env: dict,
        timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(part) for part in command], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)


class PackageInstallTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory(prefix="fdbroker-pkg-")
        cls.tmp = pathlib.Path(cls._tmp.name)
        cls.venv = cls.tmp / "venv"
        made = run([sys.executable, "-m", "venv", "--system-site-packages",
                    cls.venv], cls.tmp, clean_env())
        if made.returncode != 0:
            cls._tmp.cleanup()
            raise AssertionError(f"venv creation failed:\n{made.stdout}")
        cls.python = cls.venv / "bin" / "python"
        cls.pip = cls.venv / "bin" / "pip"
        source = copy_sources(cls.tmp / "src")
        cls.install = run([cls.pip, "install", "--no-build-isolation",
                           "--no-index", source], cls.tmp / "src", clean_env())

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def setUp(self):
        self.assertEqual(self.install.returncode, 0,
                         f"pip install failed:\n{self.install.stdout}")

    def site_packages(self) -> pathlib.Path:
        out = run([self.python, "-c",
                   "import sysconfig; print(sysconfig.get_path('purelib'))"],
                  self.tmp, clean_env())
        self.assertEqual(out.returncode, 0, out.stdout)
        return pathlib.Path(out.stdout.strip()).resolve()

    def import_elsewhere(self, code: str, **env: str):
        with tempfile.TemporaryDirectory(dir=self.tmp) as elsewhere:
            return run([self.python, "-c", code], pathlib.Path(elsewhere),
                       clean_env(**env))

    def test_protobuf_is_a_satisfied_requirement_not_a_download(self):
        self.assertIn("Requirement already satisfied: protobuf",
                      self.install.stdout)
        shown = run([self.pip, "show", "fdbroker-worker"], self.tmp,
                    clean_env())
        self.assertEqual(shown.returncode, 0, shown.stdout)
        fields = dict(line.split(": ", 1) for line in shown.stdout.splitlines()
                      if ": " in line)
        self.assertEqual(fields.get("Version"), "1.2.0", shown.stdout)
        requires = [name.strip() for name in fields.get("Requires", "").split(",")]
        self.assertIn("protobuf", requires, shown.stdout)

    def test_imports_from_anywhere_with_the_shipped_generated_code(self):
        out = self.import_elsewhere(
            "import fdbroker_worker, fdbroker_worker._proto as p\n"
            "print(fdbroker_worker.__file__)\nprint(p.pb.__file__)\n"
            "print(p.pb.HandoffMessage.DESCRIPTOR.full_name)")
        self.assertEqual(out.returncode, 0, out.stdout)
        package, pb2, message = out.stdout.strip().splitlines()[-3:]
        site = self.site_packages()
        self.assertTrue(pathlib.Path(package).resolve().is_relative_to(site),
                        f"{package} not under {site}")
        self.assertEqual(pathlib.Path(pb2).resolve(), site / GENERATED)
        self.assertEqual(message, "fdbroker.v1.HandoffMessage")

    def test_proto_dir_variable_still_comes_first(self):
        pinned = self.tmp / "pinned"
        if not pinned.exists():
            shutil.copytree(self.site_packages() / GENERATED.parents[2], pinned)
        out = self.import_elsewhere(
            "import fdbroker_worker._proto as p; print(p.pb.__file__)",
            FDBROKER_PYTHON_PROTO_DIR=str(pinned))
        self.assertEqual(out.returncode, 0, out.stdout)
        self.assertEqual(pathlib.Path(out.stdout.strip()).resolve(),
                         pinned / "fdbroker" / "v1" / "handoff_pb2.py")
        # Set but wrong: an error naming it, not the shipped copy.
        out = self.import_elsewhere("import fdbroker_worker",
                                    FDBROKER_PYTHON_PROTO_DIR=str(
                                        self.tmp / "nowhere"))
        self.assertNotEqual(out.returncode, 0, out.stdout)
        self.assertIn("SetupError", out.stdout)
        self.assertIn("FDBROKER_PYTHON_PROTO_DIR", out.stdout)

    def test_no_generated_code_or_examples_beyond_the_package(self):
        site = self.site_packages()
        self.assertFalse((site / "examples").exists())
        self.assertFalse((site / "fdbroker").exists())
        self.assertTrue((site / "fdbroker_worker" / "_proto.py").is_file())


class PackageBuildFailureTest(unittest.TestCase):
    """A build that cannot run protoc fails with one clear line."""

    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory(prefix="fdbroker-pkg-")
        self.addCleanup(self._tmp.cleanup)
        self.tmp = pathlib.Path(self._tmp.name)

    def build_wheel(self, source: pathlib.Path, **env: str):
        # pip of this interpreter: a wheel only, nothing installed anywhere.
        return run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                    "--no-build-isolation", "--no-index", "--wheel-dir",
                    self.tmp / "wheels", source], self.tmp, clean_env(**env))

    def test_protoc_missing_from_path(self):
        source = copy_sources(self.tmp / "src")
        no_protoc = self.tmp / "bin"  # PATH with python3 but no protoc
        no_protoc.mkdir()
        (no_protoc / "python3").symlink_to(sys.executable)
        out = self.build_wheel(source, PATH=str(no_protoc))
        self.assertNotEqual(out.returncode, 0, out.stdout)
        self.assertIn("error: fdbroker-worker: protoc not found on PATH",
                      out.stdout)
        self.assertEqual(list(self.tmp.glob("wheels/*.whl")), [])

    def test_proto_dir_outside_a_checkout(self):
        source = copy_sources(self.tmp / "src", with_proto=False)
        out = self.build_wheel(source)
        self.assertNotEqual(out.returncode, 0, out.stdout)
        self.assertIn("set FDBROKER_PROTO_DIR", out.stdout)
        out = self.build_wheel(source,
                               FDBROKER_PROTO_DIR=str(REPO / "proto"))
        self.assertEqual(out.returncode, 0, out.stdout)
        self.assertEqual(len(list(self.tmp.glob("wheels/*.whl"))), 1)


if __name__ == "__main__":
    unittest.main()
