"""Loads the message classes that protoc generated from handoff.proto.

They are never copied into the source tree: the build generates them
(worker/python/CMakeLists.txt) into <build>/gen/python. Where they are looked
for, first match wins:

1. $FDBROKER_PYTHON_PROTO_DIR: a directory holding fdbroker/v1/handoff_pb2.py
   (set it when the package runs outside this repository);
2. the build trees of the repository this package sits in,
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
_REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]


class SetupError(ImportError):
    """The SDK's dependencies are missing; the message says how to fix it."""


def _candidates() -> list[str]:
    configured = os.environ.get(ENV_VAR)
    if configured:
        return [os.path.join(configured, _RELATIVE)]
    built = glob.glob(str(_REPO_ROOT / "build" / "*" / "gen" / "python" /
                          _RELATIVE))
    return sorted(built, key=os.path.getmtime, reverse=True)


def _protobuf_message() -> ModuleType:
    try:
        import google.protobuf.message
    except ImportError:
        raise SetupError(
            f"fdbroker_worker needs protobuf for {sys.executable}: install "
            "Debian's python3-protobuf (apt-get install python3-protobuf) and "
            "run with /usr/bin/python3") from None
    return google.protobuf.message


def _load_generated() -> ModuleType:
    """Returns the handoff_pb2 module, or raises SetupError."""
    candidates = _candidates()
    found = [path for path in candidates if os.path.isfile(path)]
    if not found:
        where = candidates[0] if candidates else str(
            _REPO_ROOT / "build" / "*" / "gen" / "python" / _RELATIVE)
        raise SetupError(
            f"fdbroker_worker: generated {_RELATIVE} not found at {where}: "
            "build the project first (deploy/run.sh, tests/run.sh, or ninja "
            f"in a build dir), or set {ENV_VAR}")
    spec = importlib.util.spec_from_file_location("fdbroker.v1.handoff_pb2",
                                                  found[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The only place that imports protobuf: a missing one is a SetupError.
DecodeError = _protobuf_message().DecodeError
pb = _load_generated()
