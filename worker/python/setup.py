"""Packaging of the Python worker SDK (fdbroker-worker).

    python3 -m venv --system-site-packages .venv
    .venv/bin/pip install --no-build-isolation ./worker/python

The message classes are generated at build time, never copied into the
source tree: build_py runs protoc --python_out on
proto/fdbroker/v1/handoff.proto into the built package, as
fdbroker_worker/_generated/fdbroker/v1/handoff_pb2.py (fdbroker_worker/_proto.py
loads it from there). It needs:

- protoc: $PROTOC, else the first protoc on PATH (Debian: protobuf-compiler);
- the proto directory: $FDBROKER_PROTO_DIR if set, else ../../proto relative to
  this file (the repository's proto/).
"""

import os
import pathlib
import shutil
import subprocess

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.errors import ExecError, SetupError

HERE = pathlib.Path(__file__).resolve().parent
PROTO = pathlib.Path("fdbroker", "v1", "handoff.proto")
PROTO_DIR_ENV = "FDBROKER_PROTO_DIR"
# Inside the package; _proto.py looks for _generated/fdbroker/v1/handoff_pb2.py.
GENERATED = pathlib.Path("fdbroker_worker", "_generated")


def _proto_dir() -> pathlib.Path:
    configured = os.environ.get(PROTO_DIR_ENV)
    if configured:
        where = pathlib.Path(configured).resolve()
        if not (where / PROTO).is_file():
            raise SetupError(
                f"fdbroker-worker: {PROTO} not found in ${PROTO_DIR_ENV} "
                f"({where}): point it at the repository's proto/ directory")
        return where
    where = HERE.parent.parent / "proto"
    if not (where / PROTO).is_file():
        raise SetupError(
            f"fdbroker-worker: {PROTO} not found at {where / PROTO} (this "
            "source tree is not inside an fdbroker checkout): set "
            f"{PROTO_DIR_ENV} to the repository's proto/ directory")
    return where


def _protoc() -> str:
    protoc = os.environ.get("PROTOC") or shutil.which("protoc")
    if not protoc:
        raise SetupError(
            "fdbroker-worker: protoc not found on PATH; it generates the "
            "message classes at build time: install protobuf-compiler "
            "(apt-get install protobuf-compiler) or set PROTOC")
    return protoc


class BuildPyWithProto(build_py):
    """build_py, plus protoc --python_out into the built package."""

    def run(self):
        proto_dir = _proto_dir()  # both checked first: fail before copying
        protoc = _protoc()
        super().run()
        out = pathlib.Path(self.build_lib) / GENERATED
        out.mkdir(parents=True, exist_ok=True)
        command = [protoc, f"--proto_path={proto_dir}", f"--python_out={out}",
                   str(proto_dir / PROTO)]
        self.announce("running " + " ".join(command), level=2)
        try:
            subprocess.run(command, check=True)
        except (OSError, subprocess.CalledProcessError) as error:
            raise ExecError(
                f"fdbroker-worker: {' '.join(command)} failed: {error}") from None
        for path in self._generated_outputs():
            if not os.path.isfile(path):
                raise ExecError(f"fdbroker-worker: protoc did not write {path}")

    def _generated_outputs(self) -> list[str]:
        pb2 = PROTO.with_name(PROTO.stem + "_pb2.py")
        return [str(pathlib.Path(self.build_lib) / GENERATED / pb2)]

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + self._generated_outputs()


setup(
    name="fdbroker-worker",
    version="1.2.0",  # protocol 1.2 (docs/protocol.md)
    description="fdbroker worker SDK: serve the client connections an "
                "fdbroker hands over, with asyncio or threads",
    python_requires=">=3.9",
    packages=find_packages(include=["fdbroker_worker", "fdbroker_worker.*"]),
    install_requires=["protobuf"],
    cmdclass={"build_py": BuildPyWithProto},
    zip_safe=False,
)
