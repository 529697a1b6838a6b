"""Loads the message classes that protoc generated from handoff.proto.

They are never copied into the source tree: an installed package carries them
(setup.py generates them at build time), and a CMake build generates them
(worker/python/CMakeLists.txt) into <build>/gen/python. Where they are looked
for:

1. $FDBROKER_PYTHON_PROTO_DIR: a directory holding fdbroker/v1/handoff_pb2.py.
   When set it is the only place looked at (it pins one build: the tests set
   it), so a wrong value fails rather than silently loading another copy;
2. inside the package, _generated/fdbroker/v1/handoff_pb2.py: written by
   `pip install ./worker/python` (setup.py), absent from a source checkout;
3. the build trees of the repository this package sits in,
   <repo>/build/*/gen/python (build/release from deploy/run.sh, build/test
   from tests/run.sh, or any other): the most recently generated one, so a
   stale tree never shadows a fresh one.
"""

import glob
import importlib.util
import os
import pathlib
import sys
from types import ModuleType

ENV_VAR = "FDBROKER_PYTHON_PROTO_DIR"
_RELATIVE = os.path.join("fdbroker", "v1", "handoff_pb2.py")
_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
_SHIPPED = _PACKAGE_DIR / "_generated" / _RELATIVE
# worker/python/fdbroker_worker -> the repository root, when the package sits
# in a checkout (an installed one has no proto/ three levels up).
_REPO_ROOT = _PACKAGE_DIR.parents[2] if len(_PACKAGE_DIR.parents) > 2 else None
_IN_CHECKOUT = _REPO_ROOT is not None and (
    _REPO_ROOT / "proto" / "fdbroker" / "v1" / "handoff.proto").is_file()


class SetupError(ImportError):
    """The SDK's dependencies are missing; the message says how to fix it."""


def _candidates() -> list[str]:
    configured = os.environ.get(ENV_VAR)
    if configured:
        return [os.path.join(configured, _RELATIVE)]
    candidates = [str(_SHIPPED)]
    if _IN_CHECKOUT:
        built = glob.glob(str(_REPO_ROOT / "build" / "*" / "gen" / "python" /
                              _RELATIVE))
        candidates += sorted(built, key=os.path.getmtime, reverse=True)
    return candidates


def _protobuf_message() -> ModuleType:
    try:
        import google.protobuf.message
    except ImportError:
        raise SetupError(
            f"fdbroker_worker needs protobuf for {sys.executable}: install "
            "Debian's python3-protobuf (apt-get install python3-protobuf) and "
            "run with /usr/bin/python3") from None
    return google.protobuf.message


def _not_found() -> SetupError:
    configured = os.environ.get(ENV_VAR)
    if configured:
        return SetupError(
            f"fdbroker_worker: generated {_RELATIVE} not found at "
            f"{os.path.join(configured, _RELATIVE)} (${ENV_VAR}): point it at "
            "a build's gen/python directory, or unset it")
    if _IN_CHECKOUT:
        where = _REPO_ROOT / "build" / "*" / "gen" / "python" / _RELATIVE
        return SetupError(
            f"fdbroker_worker: generated {_RELATIVE} not found at {where}: "
            "build the project first (deploy/run.sh, tests/run.sh, or ninja "
            f"in a build dir), install the package (pip install "
            f"./worker/python), or set {ENV_VAR}")
    return SetupError(
        f"fdbroker_worker: generated {_RELATIVE} not found at {_SHIPPED}: "
        "reinstall the package (pip install --no-build-isolation "
        f"./worker/python, which runs protoc), or set {ENV_VAR}")


def _load_generated() -> ModuleType:
    """Returns the handoff_pb2 module, or raises SetupError."""
    found = [path for path in _candidates() if os.path.isfile(path)]
    if not found:
        raise _not_found()
    spec = importlib.util.spec_from_file_location("fdbroker.v1.handoff_pb2",
                                                  found[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The only place that imports protobuf: a missing one is a SetupError.
DecodeError = _protobuf_message().DecodeError
pb = _load_generated()
