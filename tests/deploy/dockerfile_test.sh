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
    # tests/deploy/image_layout_test.py runs this ENTRYPOINT and checks
    # what the layout does; here only that the broker is not PID 1.
    check(flags[:1] == ["/usr/bin/tini"],
          f"ENTRYPOINT starts {flags[:1]}, not the init (tini)")
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

# worker/python/examples/Dockerfile, the pattern for an image of your own
# Python app: FROM the fdbroker image, as uid 10001 again, its ENTRYPOINT
# the base image's (init, keeper, broker) plus the worker command, every file it copies exists, every Debian package it installs exists, and its worker
# command runs the runner on the app it copied.
/usr/bin/python3 - "${repo}" <<'PY'
import re
import shlex
import subprocess
import sys
from pathlib import Path

repo = Path(sys.argv[1])
path = repo / "worker/python/examples/Dockerfile"
errors = []
instructions, pending = [], ""
for line in path.read_text().splitlines():
    if not pending and (not line.strip() or line.lstrip().startswith("#")):
        continue
    if line.rstrip().endswith("\\"):
        pending += line.rstrip()[:-1] + " "
        continue
    keyword, _, rest = (pending + line).strip().partition(" ")
    pending = ""
    instructions.append((keyword.upper(), rest.strip()))
froms = [rest.split()[0] for keyword, rest in instructions if keyword == "FROM"]
if froms[-1:] != ["fdbroker"]:
    errors.append(f"the last stage is FROM {froms[-1:]}, not the fdbroker image")
users = [rest for keyword, rest in instructions if keyword == "USER"]
if users[-1:] != ["10001:10001"]:
    errors.append(f"runs as {users[-1:]}, not the image's uid 10001")
packages = set()
for keyword, rest in instructions:
    if keyword == "COPY" and "--from=" not in rest:
        for source in [s for s in shlex.split(rest) if not s.startswith("--")][:-1]:
            if not (repo / source).exists():
                errors.append(f"COPY {source}: not in the repo")
    if keyword == "RUN":
        for command in re.split(r"&&", rest):
            words = command.split()
            if words[:2] == ["apt-get", "install"]:
                packages.update(w for w in words[2:] if not w.startswith("-"))
known = subprocess.run(["apt-cache", "show", "--no-all-versions", *sorted(packages)],
                       capture_output=True, text=True).stdout
for package in sorted(packages):
    if f"Package: {package}\n" not in known:
        errors.append(f"apt-get install {package}: no such Debian package")
entrypoint = [rest for keyword, rest in instructions if keyword == "ENTRYPOINT"][-1]
argv = re.findall(r'"([^"]*)"', entrypoint)
if argv[:5] != ["/usr/bin/tini", "-s", "--", "/usr/local/bin/fdbroker-keeper",
                "/usr/local/bin/fdbroker"]:
    errors.append(f"ENTRYPOINT {argv[:5]} is not the base image's "
                  "(tini -s, fdbroker-keeper, fdbroker)")
worker_cmd = [f for f in argv if f.startswith("--worker_cmd=")]
if not worker_cmd or "-m fdbroker_worker.run" not in worker_cmd[0]:
    errors.append(f"the worker command does not run fdbroker_worker.run: {worker_cmd}")
elif "fastapi_app:app" not in worker_cmd[0]:
    errors.append("the worker command does not serve the app it copies")
for error in errors:
    print("worker/python/examples/Dockerfile:", error, file=sys.stderr)
if errors:
    sys.exit(1)
print(f"app image: {len(froms)} stages, {len(packages)} Debian packages, USER {users[-1]}")
PY
echo "ok"
