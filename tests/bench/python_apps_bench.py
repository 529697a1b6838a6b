#!/usr/bin/python3
"""Python web apps head to head (tests/bench/python_apps.sh runs this).

The same unchanged FastAPI app (worker/python/examples/fastapi_app.py) with
N worker processes, served three ways:

  gunicorn  gunicorn -w N -k uvicorn.workers.UvicornWorker: the master
            binds, the N workers accept from the shared socket (the
            kernel's accept race decides who gets a connection)
  uvicorn   python3 -m uvicorn --workers N: the same, with uvicorn's own
            supervisor (multiprocessing spawn) as the parent
  fdbroker  fdbroker --workers=N --worker_cmd="python3 -m fdbroker_worker.run
            ... fastapi_app:app": the broker accepts and hands each socket to
            the worker with the fewest connections (least_conn)
  fdbroker-kernel  the same with --placement=kernel: each runner worker
            accepts from a listening socket the broker grants it (one
            SO_REUSEPORT group, the kernel places each connection by the
            broker's cBPF weights) with uvloop's own accept loop

All of them run uvicorn's httptools protocol on uvloop, access logs off,
keep-alive timeout 5 s, on 127.0.0.1 with port 0. Three loads, with wrk:

  keepalive  wrk -t2 -c64 GET /   (a small JSON answer)
  close      the same with Connection: close (one connection per request)
  mixed      a few clients (--cpu-clients, 2) on GET /cpu?ms=20 (20 ms of
             CPU in the thread pool) while 32 keep-alive clients measure
             GET /: its throughput and latency p50/p99; which worker
             answered is counted from the "pid" of every answer

Every server stays up for the whole run; each round runs every (load,
server) pair, the servers in turn (the first one rotating between rounds),
each measured run after a warm-up of the same kind. Per run: wrk's
requests/s, latency and errors, and the CPU of every process of the server
(utime + stime from /proc/PID/stat of the front process and all its
descendants, plus what they reaped: cutime + cstime), per request. The
summary gives the medians over the rounds, the min-max spread, the ratios
to gunicorn and PASS/MISS per target.
"""

import argparse
import datetime
import hashlib
import http.client
import json
import os
import platform
import pstats
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import command_output, parse_wrk  # noqa: E402
from benchlib import BenchError, CLK_TCK, choices, read_key_values, run_main, wait_for  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PYTHON = "/usr/bin/python3"  # Debian's: fastapi, uvicorn, gunicorn, protobuf
HOST = "127.0.0.1"
APP = "fastapi_app:app"
APP_DIR = os.path.join(ROOT, "worker", "python", "examples")
SERVERS = ["gunicorn", "uvicorn", "fdbroker", "fdbroker-kernel"]
# The fdbroker variants, each held to the targets against gunicorn.
BROKERS = ["fdbroker", "fdbroker-kernel"]
LOADS = ["keepalive", "close", "mixed"]
LOAD_TITLES = {
    "keepalive": "keep-alive",
    "close": "connection per request",
    "mixed": "mixed (fast GET / under /cpu load)",
}

# wrk script for the mixed load: counts the answers per worker pid (the app
# puts "pid" in both bodies) and prints them after wrk's summary.
COUNT_LUA = r"""
local threads = {}
function setup(thread) table.insert(threads, thread) end
counts = {}
function response(status, headers, body)
  local pid = body:match('"pid":%s*(%d+)')
  if pid then counts[pid] = (counts[pid] or 0) + 1 end
end
function done(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads) do
    for pid, n in pairs(t:get("counts")) do total[pid] = (total[pid] or 0) + n end
  end
  local parts = {}
  for pid, n in pairs(total) do table.insert(parts, pid .. ":" .. n) end
  io.write("PIDS " .. table.concat(parts, ",") .. "\n")
end
"""

# Worker command for the profile: the first worker to start runs the runner
# under cProfile (main thread only), the others run it as is.
PROFILED_RUN = r"""
import cProfile, os, runpy, sys
out = os.environ["PYAPPS_PROFILE_OUT"]
try:
    os.close(os.open(out + ".lock", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    mine = True
except FileExistsError:
    mine = False
sys.argv[0] = "fdbroker_worker.run"
if not mine:
    runpy.run_module("fdbroker_worker.run", run_name="__main__", alter_sys=True)
else:
    with open(out + ".pid", "w") as f:
        f.write(str(os.getpid()))
    profile = cProfile.Profile()
    try:
        profile.runcall(runpy.run_module, "fdbroker_worker.run",
                        run_name="__main__", alter_sys=True)
    finally:
        profile.dump_stats(out)
"""


# --- /proc: the CPU of a process tree ----------------------------------------------


def read_stats():
    """{pid: (ppid, utime, stime, cutime, cstime)} of every process, in
    clock ticks (one pass over /proc)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                data = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        # The command name may contain spaces and parentheses.
        fields = data[data.rindex(")") + 2 :].split()
        # fields[0] is field 3 (state); ppid is 4, utime..cstime 14..17.
        out[int(entry)] = (int(fields[1]),) + tuple(int(x) for x in fields[11:15])
    return out


def tree(root, stats):
    """root and all its descendants, as {pid: stats}."""
    kids = {}
    for pid, s in stats.items():
        kids.setdefault(s[0], []).append(pid)
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in stats and pid not in out:
            out[pid] = stats[pid]
            todo.extend(kids.get(pid, ()))
    return out


def cpu_snapshot(root):
    return {"tree": tree(root, read_stats()), "wall": time.monotonic()}


def cpu_delta(root, before, after):
    """(user s, system s, front s, processes changed, {pid: own s}) between two snapshots
    of root's tree. A process alive in both counts its growth (its own time
    and what it reaped); a new one all of it; one that is gone was reaped by
    a parent in the tree, whose cutime/cstime grew by its whole life, so its
    earlier share is taken off again."""
    user = system = 0
    b, a = before["tree"], after["tree"]
    for pid, s in a.items():
        old = b.get(pid, (0, 0, 0, 0, 0))
        user += (s[1] + s[3]) - (old[1] + old[3])
        system += (s[2] + s[4]) - (old[2] + old[4])
    for pid, old in b.items():
        if pid not in a:
            user -= old[1] + old[3]
            system -= old[2] + old[4]
    front = None
    if root in a and root in b:
        front = (sum(a[root][1:3]) - sum(b[root][1:3])) / CLK_TCK
    own = {pid: (sum(s[1:3]) - sum(b[pid][1:3])) / CLK_TCK for pid, s in a.items() if pid in b}
    return user / CLK_TCK, system / CLK_TCK, front, set(a) != set(b), own


def listening_ports(root):
    """TCP ports (IPv4) on which a process of root's tree listens."""
    inodes = set()
    for pid in tree(root, read_stats()):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    ports = set()
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # TCP_LISTEN
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return sorted(ports)


def get_json(port, path="/", timeout=5.0):
    """(status, parsed JSON body) of GET path on a new connection."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        body = response.read()
        return response.status, json.loads(body) if body else None
    finally:
        conn.close()


# --- the servers --------------------------------------------------------------------


class Server:
    """One way of serving the app with N workers; start() leaves it serving
    on self.port with every worker answering."""

    name = ""

    def __init__(self, args, workdir):
        self.args = args
        self.dir = os.path.join(workdir, self.name)
        os.makedirs(self.dir, exist_ok=True)
        self.proc = None
        self.port = None
        self.worker_pids = []

    def argv(self):
        raise NotImplementedError

    def find_port(self):
        ports = listening_ports(self.proc.pid)
        return ports[0] if len(ports) == 1 else None

    def env(self):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [os.path.join(ROOT, "worker", "python")]
            + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        env["FDBROKER_PYTHON_PROTO_DIR"] = self.args.proto_dir
        env.pop("PYTHONPROFILEIMPORTTIME", None)
        return env

    def start(self, argv=None, env=None):
        log = open(os.path.join(self.dir, "server.log"), "ab")
        try:
            # A session of its own: its process group is ours to end.
            self.proc = subprocess.Popen(
                argv or self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=ROOT,
                env=env or self.env(),
                start_new_session=True,
            )
        finally:
            log.close()
        alive = lambda: self.proc.poll() is None  # noqa: E731
        try:
            self.port = wait_for(self.find_port, 60, f"{self.name}: listening port", alive=alive)
            self.worker_pids = wait_for(self.all_workers_answer, 60,
                                        f"{self.name}: {self.args.workers} workers answering",
                                        alive=alive, interval=0.2)
        except BenchError as error:
            with open(os.path.join(self.dir, "server.log"), errors="replace") as f:
                tail = f.read()[-2000:]
            raise BenchError(f"{error}; its log ends:\n{tail}") from None

    def all_workers_answer(self):
        """The N worker pids once N different ones have answered GET /."""
        seen = getattr(self, "_seen", set())
        self._seen = seen
        for _ in range(4 * self.args.workers):
            try:
                status, body = get_json(self.port)
            except (OSError, ValueError, http.client.HTTPException):
                return None
            if status == 200 and body and "pid" in body:
                seen.add(body["pid"])
        return sorted(seen) if len(seen) >= self.args.workers else None

    def log_size(self):
        return os.path.getsize(os.path.join(self.dir, "server.log"))

    def tracebacks_since(self, offset):
        with open(os.path.join(self.dir, "server.log"), "rb") as f:
            f.seek(offset)
            return f.read().count(b"Traceback (most recent call last)")

    def stop(self):
        """SIGTERM to the front process, then SIGKILL to the process group
        we created for it if anything of it is left after 20 s."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self.proc = None


class Gunicorn(Server):
    name = "gunicorn"

    def argv(self):
        return [
            PYTHON, "-m", "gunicorn",
            "-w", str(self.args.workers),
            "-k", "uvicorn.workers.UvicornWorker",
            "-b", f"{HOST}:0",
            "--keep-alive", str(self.args.keep_alive),  # gunicorn's default is 2
            "--log-level", "warning",  # no --access-logfile: no access log
            "--chdir", APP_DIR,
            APP,
        ]


class Uvicorn(Server):
    name = "uvicorn"

    def argv(self):
        return [
            PYTHON, "-m", "uvicorn",
            "--workers", str(self.args.workers),
            "--host", HOST,
            "--port", "0",
            "--no-access-log",
            "--timeout-keep-alive", str(self.args.keep_alive),
            "--log-level", "warning",
            "--app-dir", APP_DIR,
            APP,
        ]


class Fdbroker(Server):
    name = "fdbroker"

    def worker_cmd(self, runner=None):
        runner = runner or f"{PYTHON} -m fdbroker_worker.run"
        return (
            f"{runner} --app-dir={APP_DIR} --log-level=warning "
            f"--timeout-keep-alive={self.args.keep_alive} {APP}"
        )  # the runner's access log is off by default

    def argv(self, runner=None):
        return [
            os.path.join(self.args.bin_dir, "fdbroker"),
            f"--listen={HOST}:0",
            "--control=",
            "--metrics=",
            f"--socket={os.path.join(self.dir, 'handoff.sock')}",
            f"--ready_file={os.path.join(self.dir, 'broker.ready')}",
            f"--workers={self.args.workers}",
            f"--worker_cmd={self.worker_cmd(runner)}",
            "--drain_timeout=5s",
        ] + self.args.broker_flag

    def find_port(self):
        values = read_key_values(os.path.join(self.dir, "broker.ready"))
        return int(values["listen"].rsplit(":", 1)[1]) if values else None


class FdbrokerKernel(Fdbroker):
    name = "fdbroker-kernel"

    def argv(self, runner=None):
        return super().argv(runner) + ["--placement=kernel"]


SERVER_CLASSES = {c.name: c for c in (Gunicorn, Uvicorn, Fdbroker, FdbrokerKernel)}


# --- wrk ---------------------------------------------------------------------------------


def wrk_argv(args, port, load, duration, *, path="/", connections=None, threads=None, script=None):
    argv = [
        "wrk",
        f"-t{threads or args.wrk_threads}",
        f"-c{connections or args.connections}",
        f"-d{duration}s",
        "--latency",
    ]
    if load == "close":
        argv += ["-H", "Connection: close"]
    if script:
        argv += ["-s", script]
    return argv + [f"http://{HOST}:{port}{path}"]


def finish_wrk(proc, argv, timeout):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise BenchError(f"{' '.join(argv)}: still running after {timeout} s")
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed:\n{out}{err}")
    result = parse_wrk(out)
    m = re.search(r"^PIDS (\S*)$", out, re.M)
    if m:
        result["per_pid"] = {
            int(p): int(n) for p, n in (kv.split(":") for kv in m.group(1).split(",") if kv)
        }
    return result


def run_wrk(argv, duration):
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return finish_wrk(proc, argv, duration + 30)


# --- one measured run ---------------------------------------------------------------


def measure(args, server, load, workdir):
    """A warm-up and a measured run of one load on one server."""
    root = server.proc.pid
    log_from = server.log_size()
    script = os.path.join(workdir, "count.lua")
    if load in ("keepalive", "close"):
        if args.warmup > 0:
            run_wrk(wrk_argv(args, server.port, load, args.warmup), args.warmup)
        before = cpu_snapshot(root)
        result = run_wrk(wrk_argv(args, server.port, load, args.duration), args.duration)
        after = cpu_snapshot(root)
    else:
        # The /cpu clients start first and end last, so they cover the whole
        # measured run of the fast clients (and its warm-up).
        lead = 1.0
        cpu_duration = args.warmup + args.duration + 2 * lead + 1
        cpu_argv = wrk_argv(
            args, server.port, "keepalive", int(cpu_duration + 0.999),
            path=f"/cpu?ms={args.cpu_ms}", connections=args.cpu_clients,
            threads=1, script=script,
        )
        fast = lambda d: wrk_argv(  # noqa: E731
            args, server.port, "keepalive", d, connections=args.fast_connections,
            script=script,
        )
        cpu_proc = subprocess.Popen(cpu_argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(lead)
            if args.warmup > 0:
                run_wrk(fast(args.warmup), args.warmup)
            before = cpu_snapshot(root)
            result = run_wrk(fast(args.duration), args.duration)
            after = cpu_snapshot(root)
        finally:
            cpu_result = finish_wrk(cpu_proc, cpu_argv, cpu_duration + 30)
        result["cpu_endpoint"] = {
            k: cpu_result.get(k)
            for k in ("requests", "rps", "errors", "non_2xx", "wrk_latency_p50_us",
                      "wrk_latency_p99_us", "per_pid")
        }
    user, system, front, changed, own = cpu_delta(root, before, after)
    # Tracebacks the server (or its workers, which share its stderr) logged
    # during the warm-up and the run: errors wrk cannot see.
    result["log_tracebacks"] = server.tracebacks_since(log_from)
    # Other load on the machine (the 1-minute average includes this run's own).
    result["loadavg_1m_after"] = float(open("/proc/loadavg").read().split()[0])
    wall = after["wall"] - before["wall"]
    result.update(
        user_cpu_s=user,
        system_cpu_s=system,
        total_cpu_s=user + system,
        front_cpu_s=front,
        cores_used=(user + system) / wall if wall > 0 else None,
        system_share=system / (user + system) if user + system > 0 else None,
        processes=len(after["tree"]),
        processes_changed=changed,
    )
    if result["requests"]:
        result["cpu_per_request_us"] = (user + system) / result["requests"] * 1e6
        if front is not None:
            result["front_cpu_per_request_us"] = front / result["requests"] * 1e6
    # How evenly the work spread: each worker's share of the workers' CPU.
    result["worker_cpu_s"] = {str(pid): own.get(pid) for pid in server.worker_pids}
    result["worker_cpu_shares"] = shares(
        {pid: own.get(pid) or 0.0 for pid in server.worker_pids}, server.worker_pids)
    if "per_pid" in result:
        result["fast_share_per_worker"] = shares(result["per_pid"], server.worker_pids)
    if load == "mixed" and result["cpu_endpoint"].get("per_pid") is not None:
        result["cpu_share_per_worker"] = shares(result["cpu_endpoint"]["per_pid"], server.worker_pids)
    return result


def shares(per_pid, worker_pids):
    """Each worker's share of the answers, sorted from the largest (the
    pids differ between servers; the sorted shares compare)."""
    total = sum(per_pid.values())
    if not total:
        return []
    counts = [per_pid.get(pid, 0) for pid in worker_pids]
    counts += [n for pid, n in per_pid.items() if pid not in worker_pids]  # a restarted worker
    return sorted((n / total for n in counts), reverse=True)


# --- summary ----------------------------------------------------------------------------------

SUMMARY_KEYS = [
    "rps",
    "cpu_per_request_us",
    "front_cpu_per_request_us",
    "cores_used",
    "system_share",
    "wrk_latency_p50_us",
    "wrk_latency_p99_us",
    "errors",
    "non_2xx",
    "log_tracebacks",
    "cpu_endpoint_rps",
    "cpu_endpoint_errors",
    "cpu_endpoint_non_2xx",
    "max_fast_share",
    "max_cpu_share",
    "max_worker_cpu_share",
]


def flat(run):
    """The run's figures under SUMMARY_KEYS."""
    out = dict(run)
    cpu = run.get("cpu_endpoint")
    if cpu:
        out["cpu_endpoint_rps"] = cpu.get("rps")
        out["cpu_endpoint_errors"] = cpu.get("errors")
        out["cpu_endpoint_non_2xx"] = cpu.get("non_2xx")
    if run.get("fast_share_per_worker"):
        out["max_fast_share"] = run["fast_share_per_worker"][0]
    if run.get("worker_cpu_shares"):
        out["max_worker_cpu_share"] = run["worker_cpu_shares"][0]
    if run.get("cpu_share_per_worker"):
        out["max_cpu_share"] = run["cpu_share_per_worker"][0]
    return out


def summarize(runs):
    """{server: {load: {key: {median, min, max, runs}}}}."""
    values = {}
    for run in runs:
        cell = values.setdefault(run["server"], {}).setdefault(run["load"], {})
        for key, value in flat(run).items():
            if key in SUMMARY_KEYS and value is not None:
                cell.setdefault(key, []).append(value)
    out = {}
    for server, loads in values.items():
        for load, cell in loads.items():
            out.setdefault(server, {})[load] = {
                key: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v}
                for key, v in cell.items()
            }
    return out


def med(summary, server, load, key):
    return summary.get(server, {}).get(load, {}).get(key, {}).get("median")


def ratio(a, b):
    return a / b if a is not None and b else None


def ratios(summary, servers):
    out = {}
    for server in servers:
        if server == "gunicorn":
            continue
        for load in LOADS:
            for key in ("rps", "cpu_per_request_us", "wrk_latency_p99_us"):
                value = ratio(med(summary, server, load, key), med(summary, "gunicorn", load, key))
                if value is not None:
                    out[f"{server}/gunicorn {load} {key}"] = value
    return out


def targets(rat, servers):
    def check(name, value, op, goal):
        if value is None:
            verdict = "n/a"
        else:
            verdict = "PASS" if (value >= goal if op == ">=" else value <= goal) else "MISS"
        return {"target": name, "value": value, "goal": f"{op} {goal}x gunicorn", "verdict": verdict}

    out = []
    for broker in [b for b in BROKERS if b in servers]:
        r = lambda load, key: rat.get(f"{broker}/gunicorn {load} {key}")  # noqa: E731
        # The hand-off mode's target names stay as they were (older results).
        prefix = "" if broker == "fdbroker" else f"{broker}: "
        out += [
            check(f"{prefix}keep-alive throughput", r("keepalive", "rps"), ">=", 1.0),
            check(f"{prefix}connection-per-request throughput", r("close", "rps"), ">=", 1.0),
            check(f"{prefix}server CPU per request, keep-alive", r("keepalive", "cpu_per_request_us"), "<=", 1.05),
            check(
                f"{prefix}server CPU per request, connection per request",
                r("close", "cpu_per_request_us"),
                "<=",
                1.05,
            ),
            check(f"{prefix}mixed load: fast endpoint p99", r("mixed", "wrk_latency_p99_us"), "<=", 1.0),
        ]
    return out


def fmt(value, digits=1, scale=1.0):
    if value is None:
        return "-"
    return f"{value * scale:,.{digits}f}"


def spread(summary, server, load, key, digits=1, scale=1.0):
    cell = summary.get(server, {}).get(load, {}).get(key)
    if not cell:
        return "-"
    return (
        f"{fmt(cell['median'], digits, scale)} "
        f"({fmt(cell['min'], digits, scale)}-{fmt(cell['max'], digits, scale)})"
    )


def summary_text(summary, rat, tgt, args, servers):
    """The human summary (also written as the .md next to the JSON)."""
    lines = [
        f"Medians (min-max) of {args.rounds} interleaved round(s) x {args.duration} s, "
        f"N={args.workers} workers, FastAPI app {APP}; wrk -t{args.wrk_threads} "
        f"-c{args.connections} (keep-alive, close); mixed: {args.cpu_clients} clients on "
        f"/cpu?ms={args.cpu_ms} + {args.fast_connections} keep-alive clients on /.",
        "",
    ]
    header = (
        f"| {'load':<10} | {'server':<15} | {'req/s':>24} | {'vs gu':>5} | {'CPU us/req':>22} "
        f"| {'vs gu':>5} | {'front us/req':>12} | {'p50 ms':>6} | {'p99 ms':>20} | {'vs gu':>5} | {'err':>3} | {'tb':>5} |"
    )
    lines += [header, "|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|"]
    for load in args.loads:
        for server in servers:
            if load not in summary.get(server, {}):
                continue
            errors_max = sum(
                summary[server][load].get(k, {}).get("max", 0)
                for k in ("errors", "non_2xx", "cpu_endpoint_errors", "cpu_endpoint_non_2xx")
            )
            tracebacks = sum(summary[server][load].get("log_tracebacks", {}).get("runs", [0]))
            vs = lambda key: (  # noqa: E731
                "1.00" if server == "gunicorn"
                else fmt(rat.get(f"{server}/gunicorn {load} {key}"), 2)
            )
            lines.append(
                f"| {load:<10} | {server:<15} | {spread(summary, server, load, 'rps', 0):>24} "
                f"| {vs('rps'):>5} | {spread(summary, server, load, 'cpu_per_request_us'):>22} "
                f"| {vs('cpu_per_request_us'):>5} "
                f"| {fmt(med(summary, server, load, 'front_cpu_per_request_us'), 1):>12} "
                f"| {fmt(med(summary, server, load, 'wrk_latency_p50_us'), 2, 1e-3):>6} "
                f"| {spread(summary, server, load, 'wrk_latency_p99_us', 2, 1e-3):>20} "
                f"| {vs('wrk_latency_p99_us'):>5} | {fmt(errors_max, 0) if errors_max else '0':>3} "
                f"| {fmt(tracebacks, 0) if tracebacks else '0':>5} |"
            )
    lines += [
        "",
        "vs gu: ratio of the medians to gunicorn's; front: the broker, gunicorn's master, uvicorn's "
        "parent alone; err: most socket errors + non-2xx of a run (both wrk's in the mixed load); "
        "tb: tracebacks in the server's log, all runs. Mixed: CPU us/req is all the servers' CPU "
        "(the /cpu work included) per GET / answered; p50/p99 are GET /'s.",
    ]
    if "mixed" in args.loads:
        lines += ["", "Mixed load, per server: /cpu?ms throughput, cores used, share of answers by the busiest worker (fast / cpu)."]
        for server in servers:
            cell = summary.get(server, {}).get("mixed")
            if not cell:
                continue
            lines.append(
                f"  {server:<15} /cpu {spread(summary, server, 'mixed', 'cpu_endpoint_rps', 1)} req/s; "
                f"{fmt(med(summary, server, 'mixed', 'cores_used'), 2)} cores; busiest worker: "
                f"{spread(summary, server, 'mixed', 'max_fast_share', 0, 100)} % of GET /, "
                f"{spread(summary, server, 'mixed', 'max_cpu_share', 0, 100)} % of /cpu"
            )
    lines += [
        "",
        f"Medians per load: the busiest worker's share of the workers' CPU (even: "
        f"{100 / args.workers:.0f} %), and the kernel's share of the servers' CPU (stime / (utime + stime)).",
    ]
    for server in servers:
        lines.append(
            f"  {server:<15} "
            + "; ".join(
                f"{load} {fmt(med(summary, server, load, 'max_worker_cpu_share'), 0, 100)} % / "
                f"{fmt(med(summary, server, load, 'system_share'), 0, 100)} %"
                for load in args.loads
                if load in summary.get(server, {})
            )
        )
    lines += ["", "| target (fdbroker variants vs gunicorn) | goal | measured | |", "| --- | --- | ---: | --- |"]
    for t in tgt:
        lines.append(f"| {t['target']} | {t['goal']} | {fmt(t['value'], 3)} | {t['verdict']} |")
    return "\n".join(lines) + "\n"


# --- the optional profile -------------------------------------------------------------------


def profile_runner(args, workdir, out_prefix):
    """One fdbroker with N runner workers, the first under cProfile (main
    thread), under the connection-per-request load; the top functions by
    own time, and counts per request of the profiled worker."""
    server = Fdbroker(args, os.path.join(workdir, "profile"))
    stats_path = os.path.join(server.dir, "runner.prof")
    wrapper = os.path.join(server.dir, "profiled_run.py")
    with open(wrapper, "w") as f:
        f.write(PROFILED_RUN)
    env = server.env()
    env["PYAPPS_PROFILE_OUT"] = stats_path
    try:
        server.start(argv=server.argv(runner=f"{PYTHON} {wrapper}"), env=env)
        with open(stats_path + ".pid") as f:
            profiled = int(f.read())
        load = run_wrk(wrk_argv(args, server.port, "close", args.duration), args.duration)
    finally:
        server.stop()
    if not os.path.exists(stats_path):
        print("profile: the profiled worker wrote no stats; skipped")
        return None
    stats = pstats.Stats(stats_path)
    served = 0
    for (filename, _, function), row in stats.stats.items():
        if function == "root" and filename.endswith("fastapi_app.py"):
            served = row[1]  # primitive calls of the app's GET /
    # The loop's own time (uvloop's C code: epoll_wait, reading, writing,
    # idle) is charged to run_until_complete; the rest is Python called from
    # it. The runner's share: the functions of fdbroker_worker/ themselves.
    loop_own = sum(row[2] for (_, _, fn), row in stats.stats.items()
                   if "run_until_complete" in fn)
    runner_own = sum(row[2] for (fn, _, _), row in stats.stats.items()
                     if "/fdbroker_worker/" in fn)
    entry = {}
    for (filename, _, function), row in stats.stats.items():
        if "/fdbroker_worker/" in filename and function in ("_process", "_adopt", "_connect"):
            entry[function] = entry.get(function, 0.0) + row[3]
    text_path = out_prefix + ".profile.txt"
    with open(text_path, "w") as f:
        f.write(
            f"cProfile of one fdbroker_worker.run worker (pid {profiled}, main thread) of {args.workers}, "
            f"under wrk -t{args.wrk_threads} -c{args.connections} -H 'Connection: close' for "
            f"{args.duration} s: {load['rps']:.0f} req/s in all, {served} requests served by this worker.\n"
            "cProfile slows Python calls down (several times for small functions): the ranking "
            "and the counts per request are what it tells, not the absolute times.\n"
            f"Profiled time {stats.total_tt:.2f} s, of which the loop's own (uvloop C code, I/O, idle) "
            f"{loop_own:.2f} s; Python {stats.total_tt - loop_own:.2f} s, of which the functions of "
            f"fdbroker_worker/ themselves {runner_own:.2f} s "
            f"({runner_own / max(stats.total_tt - loop_own, 1e-9) * 100:.0f} %). Cumulative: "
            + ", ".join(f"{k} {v:.2f} s" for k, v in sorted(entry.items()))
            + " (_process: the broker channel; _adopt, _connect: each handed-over socket).\n\n"
        )
        stats.stream = f
        stats.sort_stats("tottime").print_stats(35)
        stats.sort_stats("cumulative").print_stats(35)
    top = []
    for (filename, line, function), (cc, nc, tt, ct, _) in sorted(
        stats.stats.items(), key=lambda kv: kv[1][2], reverse=True
    )[:25]:
        top.append({
            "function": f"{os.path.relpath(filename, ROOT) if filename.startswith(ROOT) else filename}:{line}({function})",
            "calls_per_request": nc / served if served else None,
            "tottime_s": tt,
            "cumtime_s": ct,
            "tottime_us_per_request": tt / served * 1e6 if served else None,
        })
    total = stats.total_tt
    print(f"profile: {text_path} ({served} requests in the profiled worker, "
          f"{total / served * 1e6 if served else 0:.0f} us profiled time per request)")
    return {"rps": load["rps"], "requests_profiled": served, "total_tt_s": total,
            "loop_own_s": loop_own, "runner_own_tottime_s": runner_own,
            "runner_entry_cumtime_s": entry, "top": top, "text": text_path}


# --- main -------------------------------------------------------------------------------------


def runner_digest():
    """A digest of worker/python/fdbroker_worker/*.py: which runner was
    measured, in a tree with uncommitted changes."""
    digest = hashlib.sha256()
    package = os.path.join(ROOT, "worker", "python", "fdbroker_worker")
    for name in sorted(os.listdir(package)):
        if name.endswith(".py"):
            with open(os.path.join(package, name), "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
    return digest.hexdigest()[:16]


def machine_info():
    model = None
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def version(module):
        return command_output([PYTHON, "-c", f"import {module}; print({module}.__version__)"])

    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "wrk": command_output(["wrk", "-v"]),
        "python": command_output([PYTHON, "--version"]),
        "gunicorn": version("gunicorn"),
        "uvicorn": version("uvicorn"),
        "uvloop": version("uvloop"),
        "httptools": version("httptools"),
        "fastapi": version("fastapi"),
        "fdbroker_commit": command_output(["git", "-C", ROOT, "describe", "--always", "--dirty"]),
        "runner_sources_sha256": runner_digest(),
        "loadavg_at_start": open("/proc/loadavg").read().split()[:3],
    }


def smoke_check(runs, servers, args):
    """--smoke: every server answered in every load, with no error."""
    problems = []
    for server in servers:
        for load in args.loads:
            cells = [r for r in runs if r["server"] == server and r["load"] == load]
            if not cells:
                problems.append(f"{server} {load}: no run")
            for r in cells:
                if not r["requests"] > 0 or not r.get("cpu_per_request_us"):
                    problems.append(f"{server} {load}: no requests or no CPU measured")
                if r["errors"] or r["non_2xx"]:
                    problems.append(f"{server} {load}: {r['errors']} socket errors, {r['non_2xx']} non-2xx")
                if r.get("log_tracebacks"):
                    problems.append(f"{server} {load}: {r['log_tracebacks']} tracebacks in its log")
                cpu = r.get("cpu_endpoint")
                if cpu is not None:
                    if not cpu["requests"] or cpu["errors"] or cpu["non_2xx"]:
                        problems.append(f"{server} {load} /cpu: {cpu}")
                    if not r.get("per_pid"):
                        problems.append(f"{server} {load}: no answers counted per worker")
    return problems


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin-dir", required=True, help="directory with fdbroker")
    p.add_argument("--proto-dir", default="", help="directory with fdbroker/v1/handoff_pb2.py "
                   "(default $FDBROKER_PYTHON_PROTO_DIR, else BIN_DIR/../gen/python)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=8, help="seconds per measured run")
    p.add_argument("--warmup", type=int, default=2, help="seconds of warm-up before each run (0: none)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--servers", default=",".join(SERVERS))
    p.add_argument("--loads", default=",".join(LOADS))
    p.add_argument("--wrk-threads", type=int, default=2)
    p.add_argument("--connections", type=int, default=64, help="wrk connections, keepalive and close")
    p.add_argument("--fast-connections", type=int, default=32, help="mixed: clients on GET /")
    p.add_argument("--cpu-clients", type=int, default=2, help="mixed: clients on GET /cpu")
    p.add_argument("--cpu-ms", type=int, default=20, help="mixed: CPU ms per /cpu request")
    p.add_argument("--keep-alive", type=int, default=5, help="keep-alive timeout, s, of every server")
    p.add_argument("--broker-flag", action="append", default=[], help="extra fdbroker flag (repeatable)")
    p.add_argument("--json", default="", help="results (default tests/bench/results/python-apps-<UTC date>.json)")
    p.add_argument("--profile", action="store_true", help="afterwards, cProfile one runner worker "
                   "under the connection-per-request load (<json>.profile.txt)")
    p.add_argument("--smoke", action="store_true", help="1 round x 1 s per load, no warm-up; "
                   "fails unless every server answered every load without an error")
    args = p.parse_args()
    if args.smoke:
        args.rounds, args.duration, args.warmup = 1, 1, 0
    args.servers = choices(p, "--servers", args.servers, SERVERS)
    args.loads = choices(p, "--loads", args.loads, LOADS)
    if min(args.rounds, args.duration, args.workers, args.cpu_clients, args.fast_connections) < 1:
        p.error("--rounds, --duration, --workers, --cpu-clients, --fast-connections must be >= 1")
    args.bin_dir = os.path.abspath(args.bin_dir)
    args.proto_dir = os.path.abspath(
        args.proto_dir
        or os.environ.get("FDBROKER_PYTHON_PROTO_DIR")
        or os.path.join(args.bin_dir, "..", "gen", "python")
    )
    if not os.access(os.path.join(args.bin_dir, "fdbroker"), os.X_OK):
        p.error(f"{args.bin_dir}/fdbroker not found")
    if not os.path.exists(os.path.join(args.proto_dir, "fdbroker", "v1", "handoff_pb2.py")):
        p.error(f"{args.proto_dir}/fdbroker/v1/handoff_pb2.py not found")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    args.json = args.json or os.path.join(HERE, "results", f"python-apps-{stamp}.json")
    return args


def main():
    args = parse_args()
    for tool in ("wrk",):
        if not shutil.which(tool):
            raise BenchError(f"{tool} not found (deploy/setup.sh --bench-tools)")
    workdir = tempfile.mkdtemp(prefix="fdbroker-pyapps.")
    with open(os.path.join(workdir, "count.lua"), "w") as f:
        f.write(COUNT_LUA)
    started = datetime.datetime.now(datetime.timezone.utc)
    runs, servers, profile = [], {}, None
    info = machine_info()
    print(
        f"machine: {info['nproc']} CPUs, {info['cpu_model']}, load {' '.join(info['loadavg_at_start'])}; "
        f"{info['python']}, gunicorn {info['gunicorn']}, uvicorn {info['uvicorn']}, "
        f"uvloop {info['uvloop']}, httptools {info['httptools']}, fastapi {info['fastapi']}",
        flush=True,
    )
    try:
        for name in args.servers:
            server = SERVER_CLASSES[name](args, workdir)
            servers[name] = server  # stopped in the end, even if it fails to start
            server.start()
            print(f"{name}: serving on {HOST}:{server.port}, workers {server.worker_pids}", flush=True)
        names = list(servers)
        for rnd in range(1, args.rounds + 1):
            shift = (rnd - 1) % len(names)
            order = names[shift:] + names[:shift]
            for load in args.loads:
                for name in order:
                    server = servers[name]
                    if server.proc.poll() is not None:
                        raise BenchError(f"{name} exited (log: {server.dir}/server.log)")
                    result = measure(args, server, load, workdir)
                    result.update(server=name, load=load, round=rnd)
                    runs.append(result)
                    extra = ""
                    if load == "mixed":
                        extra = (f", /cpu {result['cpu_endpoint']['rps']:.1f} req/s, "
                                 f"GET / shares {['%.0f%%' % (s * 100) for s in result.get('fast_share_per_worker', [])]}")
                    extra += f", worker CPU {['%.0f%%' % (s * 100) for s in result['worker_cpu_shares']]}"
                    print(
                        f"round {rnd} {load:<9} {name:<8} {result['rps']:>8,.0f} req/s, "
                        f"{result.get('cpu_per_request_us', 0):6.1f} us CPU/req, "
                        f"p50 {result.get('wrk_latency_p50_us', 0) / 1000:.2f} ms, "
                        f"p99 {result.get('wrk_latency_p99_us', 0) / 1000:.2f} ms, "
                        f"errors {result['errors'] + result['non_2xx']}"
                        + (f", {result['log_tracebacks']} TRACEBACKS in the log" if result["log_tracebacks"] else "")
                        + extra,
                        flush=True,
                    )
        for server in servers.values():
            server.stop()
        if args.profile:
            profile = profile_runner(args, workdir, os.path.splitext(args.json)[0])
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    summary = summarize(runs)
    rat = ratios(summary, list(servers))
    tgt = targets(rat, list(servers))
    text = summary_text(summary, rat, tgt, args, list(servers))
    print("\n" + text)
    result = {
        "started": started.isoformat(timespec="seconds"),
        "machine": info,
        "settings": {
            "rounds": args.rounds,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "workers": args.workers,
            "servers": list(servers),
            "loads": args.loads,
            "keep_alive_timeout_s": args.keep_alive,
            "app": APP,
            "commands": {
                name: " ".join(server.argv()).replace(ROOT + "/", "") for name, server in servers.items()
            },
            "wrk_keepalive": " ".join(wrk_argv(args, 0, "keepalive", args.duration)),
            "wrk_close": " ".join(wrk_argv(args, 0, "close", args.duration)),
            "wrk_mixed_cpu": " ".join(wrk_argv(args, 0, "keepalive", "D", path=f"/cpu?ms={args.cpu_ms}",
                                               connections=args.cpu_clients, threads=1, script="count.lua")),
            "wrk_mixed_fast": " ".join(wrk_argv(args, 0, "keepalive", args.duration,
                                                connections=args.fast_connections, script="count.lua")),
            "broker_flags": args.broker_flag,
            "smoke": args.smoke,
        },
        "runs": runs,
        "summary": summary,
        "ratios": rat,
        "targets": tgt,
        "profile": profile,
        "loadavg_at_end": open("/proc/loadavg").read().split()[:3],
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.splitext(args.json)[0] + ".md", "w") as f:
        f.write(text)
    print(f"results: {args.json}")
    if args.smoke:
        problems = smoke_check(runs, list(servers), args)
        if problems:
            raise BenchError("smoke: " + "; ".join(problems))
        print(f"python apps smoke: {len(servers)} servers x {len(args.loads)} loads answered, no errors")


if __name__ == "__main__":
    run_main(main)
