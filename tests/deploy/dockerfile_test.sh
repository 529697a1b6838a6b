#!/usr/bin/env bash
# deploy/Dockerfile (no Docker engine here, so it is read, not built): Debian
# 12 in every stage; the build stage installs with deploy/setup.sh and builds
# exactly like deploy/run.sh; the runtime stage installs only the runtime
# packages (setup.sh --runtime), copies the two binaries, runs as a non-root
# user, exposes 8080/9464/50051, has a HEALTHCHECK, and binds the control
# plane to 0.0.0.0 explicitly; every file it copies exists.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

/usr/bin/python3 - "${repo}" <<'PY'
import re
import shlex
import sys
from pathlib import Path

repo = Path(sys.argv[1])
errors = []


def check(condition, message):
    if not condition:
        errors.append(message)


# Instructions, continuation lines joined, comments dropped.
instructions, pending = [], ""
for line in (repo / "deploy/Dockerfile").read_text().splitlines():
    if not pending and (not line.strip() or line.lstrip().startswith("#")):
        continue
    if line.rstrip().endswith("\\"):
        pending += line.rstrip()[:-1] + " "
        continue
    text = (pending + line).strip()
    pending = ""
    keyword, _, rest = text.partition(" ")
    instructions.append((keyword.upper(), rest.strip()))

stages = []
for keyword, rest in instructions:
    if keyword == "FROM":
        stages.append({"from": rest, "steps": []})
    else:
        check(stages, f"{keyword} before the first FROM")
        if stages:
            stages[-1]["steps"].append((keyword, rest))
check(len(stages) >= 2, "not multi-stage")
build, runtime = stages[0], stages[-1]
for stage in stages:
    image = stage["from"].split()[0]
    check(re.fullmatch(r"debian:(12|bookworm)(-slim|-\d+)?(@sha256:\w+)?", image),
          f"FROM {image} is not Debian 12")


def runs(stage):
    return " && ".join(rest for keyword, rest in stage["steps"] if keyword == "RUN")


def setup_calls(stage):
    """The argument lists of every setup.sh command the stage RUNs."""
    calls = []
    for command in re.split(r"&&|\|\||;", runs(stage)):
        words = command.split()
        if words and words[0].endswith("setup.sh"):
            calls.append(words[1:])
    return calls


# Build stage: the project's set-up script, then deploy/run.sh's build.
check([] in setup_calls(build),
      "the build stage does not run deploy/setup.sh (build dependencies)")
run_sh = (repo / "deploy/run.sh").read_text()
for flag in re.findall(r"-D\w+=\w+|-G Ninja", run_sh):
    check(flag in runs(build), f"the build stage lacks deploy/run.sh's cmake flag {flag}")
check("ninja -C build/release" in runs(build), "the build stage does not run ninja")

# Runtime stage.
check(setup_calls(runtime) == [["--runtime"]],
      f"the runtime stage must install with setup.sh --runtime only, "
      f"not {setup_calls(runtime)}")
users = [rest for keyword, rest in runtime["steps"] if keyword == "USER"]
check(users, "the runtime stage has no USER")
if users:
    user = users[-1].split(":")[0]
    check(user not in ("root", "0"), f"the runtime stage runs as {users[-1]}")
copied = " ".join(rest for keyword, rest in runtime["steps"] if keyword == "COPY")
for binary in ("fdbroker", "fdbroker-http-worker"):
    check(re.search(rf"--from=\S+ .*build/release/bin/{binary}(\s|$)", copied),
          f"the runtime stage does not copy {binary} from the build stage")
exposed = set(" ".join(r for k, r in runtime["steps"] if k == "EXPOSE").split())
check({"8080", "9464", "50051"} <= exposed, f"EXPOSE {sorted(exposed)}")
check(any(k == "HEALTHCHECK" for k, _ in runtime["steps"]), "no HEALTHCHECK")
entrypoint = [r for k, r in runtime["steps"] if k == "ENTRYPOINT"]
check(entrypoint, "no ENTRYPOINT")
if entrypoint:
    flags = re.findall(r'"([^"]*)"', entrypoint[-1])
    for flag in ("--listen=0.0.0.0:8080", "--control=0.0.0.0:50051",
                 "--allow_insecure_control", "--metrics=0.0.0.0:9464",
                 "--socket=/run/fdbroker/handoff.sock"):
        check(flag in flags, f"ENTRYPOINT lacks {flag}")

# Every COPY from the build context names a file of the repo.
for stage in stages:
    for keyword, rest in stage["steps"]:
        if keyword != "COPY" or "--from=" in rest:
            continue
        sources = [s for s in shlex.split(rest) if not s.startswith("--")][:-1]
        for source in sources:
            check((repo / source).exists(), f"COPY {source}: not in the repo")

for error in errors:
    print("deploy/Dockerfile:", error, file=sys.stderr)
if errors:
    sys.exit(1)
print(f"{len(stages)} stages; build with deploy/setup.sh and run.sh's cmake flags; "
      f"runtime as USER {users[-1]}")
PY
echo "ok"
