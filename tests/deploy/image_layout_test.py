#!/usr/bin/python3
"""The image's process layout keeps the broker-crash promise, without Docker.

Runs deploy/Dockerfile's ENTRYPOINT as the container would (its own PID
namespace, so its first process is PID 1; image paths mapped to this build),
with test flags appended the way docker-compose's `command:` appends them:

- PID 1 is an init, not the broker;
- the broker is SIGKILLed under keep-alive clients: every established
  connection keeps being answered, the broker is started again inside the
  container, adopts the same workers and serves new clients with them;
- orphans (a worker command that leaves a background child) are reaped;
- SIGTERM to PID 1 (`docker stop`) drains and everything exits 0.

  image_layout_test.py BIN_DIR
"""

import http.client
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN_DIR = Path(sys.argv[1]).resolve()


def fail(message):
    print(f"FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def wait_for(predicate, seconds, what):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    fail(f"timed out after {seconds}s waiting for {what}")


def entrypoint():
    """The runtime stage's ENTRYPOINT, image paths mapped to local files."""
    text = (REPO / "deploy/Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    lines = [l for l in text.splitlines() if l.startswith("ENTRYPOINT")]
    if not lines:
        fail("deploy/Dockerfile has no ENTRYPOINT")
    argv = re.findall(r'"([^"]*)"', lines[-1])
    mapped = []
    for arg in argv:
        if arg.startswith("/"):
            name = os.path.basename(arg)
            if (BIN_DIR / name).exists():
                arg = str(BIN_DIR / name)
            elif (REPO / "deploy" / name).exists():
                arg = str(REPO / "deploy" / name)
            elif not os.path.exists(arg):
                fail(f"ENTRYPOINT runs {arg}: neither built here nor on this host")
        mapped.append(arg)
    return mapped


def children(pid):
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return out


def descendants(pid):
    out, queue = [], [pid]
    while queue:
        for child in children(queue.pop()):
            out.append(child)
            queue.append(child)
    return out


def status_field(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return line.split(":", 1)[1].split()
    except OSError:
        return None
    return None


def exe(pid):
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return ""


def read_ready(path):
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    values = dict(l.split("=", 1) for l in text.splitlines() if "=" in l)
    return values if "listen" in values and "pid" in values else None


def get(conn):
    conn.request("GET", "/")
    response = conn.getresponse()
    response.read()
    if response.status != 200:
        fail(f"GET / answered {response.status}")
    return int(response.getheader("X-Worker-Pid"))


def connect(listen):
    host, port = listen.rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=10)


def main():
    tmp = Path(tempfile.mkdtemp(prefix="fdbroker-image-"))
    ready = tmp / "ready"
    worker = BIN_DIR / "fdbroker-http-worker"
    # A worker command that leaves an orphan behind, as wrapper scripts do.
    worker_cmd = f'/bin/sh -c "(sleep 0.3 &); exec {worker}"'
    flags = [
        "--listen=127.0.0.1:0", "--control=127.0.0.1:0", "--metrics=",
        "--workers=2", f"--socket={tmp}/handoff.sock",
        f"--ready_file={ready}", f"--worker_cmd={worker_cmd}",
    ]
    argv = ["unshare", "--pid", "--fork", "--mount-proc"] + entrypoint() + flags
    print("running:", shlex.join(argv))
    container = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    try:
        run(container, ready)
    finally:
        if container.poll() is None:
            for pid in reversed(descendants(container.pid)):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            container.kill()
            container.wait()


def run(container, ready):
    first = wait_for(lambda: read_ready(ready), 30, "the broker's ready file")
    init = wait_for(lambda: children(container.pid), 10, "PID 1")[0]
    if status_field(init, "NSpid")[-1] != "1":
        fail(f"process {init} is not PID 1 of the namespace")
    if exe(init) == "fdbroker":
        fail("the broker is PID 1 of the container: when it dies the kernel "
             "kills every worker with it")
    brokers = [p for p in descendants(container.pid) if exe(p) == "fdbroker"]
    if len(brokers) != 1:
        fail(f"expected one broker process, found {brokers}")
    broker = brokers[0]
    print(f"PID 1: {exe(init)}; broker: host pid {broker}")

    # Keep-alive clients, spread over both workers.
    clients, workers = [], set()
    deadline = time.monotonic() + 20
    while (len(workers) < 2 or len(clients) < 8) and time.monotonic() < deadline:
        conn = connect(first["listen"])
        workers.add(get(conn))
        clients.append(conn)
    if len(workers) < 2:
        fail(f"only workers {workers} answered")
    print(f"{len(clients)} keep-alive clients on workers {sorted(workers)}")

    os.kill(broker, signal.SIGKILL)
    # Every established connection keeps being answered, across the restart.
    second = None
    answered = 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for conn in clients:
            if get(conn) not in workers:
                fail("an established connection moved to another worker")
            answered += 1
        second = read_ready(ready)
        if second and second["pid"] != first["pid"]:
            break
        time.sleep(0.05)
    else:
        fail("the broker was not started again inside the container")
    print(f"{answered} requests answered on established connections while "
          f"the broker was down and restarted (namespace pid "
          f"{first['pid']} -> {second['pid']})")

    # The new broker adopts the same workers: new clients reach them and no
    # worker is started in their place.
    def adopted():
        conn = connect(second["listen"])
        try:
            pids = {get(conn)}
        finally:
            conn.close()
        return pids <= workers
    wait_for(adopted, 30, "the restarted broker to serve new clients")
    for _ in range(20):
        if not adopted():
            fail("a new client was served by a worker the broker started anew")
    http_workers = [p for p in descendants(container.pid)
                    if exe(p) == "fdbroker-http-worker"]
    if len(http_workers) != 2:
        fail(f"expected the 2 adopted workers, found {len(http_workers)}")

    # The orphans the worker command left (and the killed broker) are reaped.
    def no_zombies():
        return not [p for p in descendants(container.pid)
                    if (status_field(p, "State") or ["?"])[0] == "Z"]
    wait_for(no_zombies, 5, "orphans to be reaped")

    # docker stop: SIGTERM to PID 1 drains and every process exits, code 0.
    for conn in clients:
        conn.close()
    os.kill(init, signal.SIGTERM)
    try:
        code = container.wait(timeout=45)
    except subprocess.TimeoutExpired:
        fail("SIGTERM to PID 1 did not end the container within 45 s")
    if code != 0:
        fail(f"the container exited {code} after SIGTERM, not 0")
    print("PASS: init is PID 1, the broker crash cost no established "
          "connection, workers adopted, orphans reaped, SIGTERM exits 0")


if __name__ == "__main__":
    main()
