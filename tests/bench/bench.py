#!/usr/bin/python3
"""The fdbroker benchmark (tests/bench/run.sh builds, then runs this).

Four ways to serve the same HTTP workload with N worker processes, measured
interleaved (A B C D A B C D ...) so that drift on a shared machine hits each
variant alike:

  direct        N fdbroker-http-worker --listen, one port, SO_REUSEPORT
  fdbroker      fdbroker --workers=N with the same worker binary (supervised)
  haproxy       HAProxy, mode tcp, roundrobin, in front of N standalone
                workers on their own ports
  node-cluster  Node.js cluster, SCHED_RR: the primary accepts and hands each
                connection to one of N node http workers

Two workloads, the same wrk settings for every variant: keep-alive, and one
connection per request (Connection: close). Each measured run follows a
warm-up run of the same kind. See docs/benchmarks.md for the method.

With --balance, the runs measure how evenly the workers share the load
instead (wrk counts each worker's responses with balance.lua, and the
broker's per-worker active connections are sampled halfway through a
keep-alive run): the spread is max |worker / mean - 1| over the N workers.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (  # noqa: E402
    BenchError,
    Processes,
    children,
    choices,
    cpu_seconds,
    free_port,
    histogram_delta,
    histogram_quantile,
    http_ok,
    read_key_values,
    run_main,
    sched_stat,
    scrape,
    scrape_settled,
    wait_for,
)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
HOST = "127.0.0.1"
VARIANTS = ["direct", "fdbroker", "fdbroker-kernel", "haproxy", "node-cluster"]
WORKLOADS = ["keepalive", "close"]
BALANCE_SCRIPT = os.path.join(HERE, "balance.lua")


# --- the variants ----------------------------------------------------------------


class Variant:
    """One way of serving; start() leaves it ready on self.port."""

    name = ""
    front_name = None  # the process in front of the workers, if any

    def __init__(self, args, procs, workdir):
        self.args, self.procs = args, procs
        self.dir = os.path.join(workdir, self.name)
        os.makedirs(self.dir, exist_ok=True)
        self.port = None
        self.front = None  # Popen of the front process
        self.workers = []  # Popen of workers we started ourselves

    def worker_bin(self):
        return os.path.join(self.args.bin_dir, "fdbroker-http-worker")

    def start_standalone_worker(self, port, index):
        ready = os.path.join(self.dir, f"worker{index}.ready")
        proc = self.procs.start(
            [self.worker_bin(), f"--listen={HOST}:{port}", f"--ready_file={ready}"],
            os.path.join(self.dir, f"worker{index}.log"),
        )
        self.workers.append(proc)
        values = wait_for(
            lambda: read_key_values(ready),
            20,
            f"{self.name}: worker {index} ready file",
            alive=lambda: proc.poll() is None,
        )
        return int(values["listen"].rsplit(":", 1)[1])

    def start_front(self, launch):
        """launch(port) starts the front process on a port picked free a
        moment before and waits until it serves; another port if it lost
        that port to someone else (it exited), three tries."""
        for attempt in range(3):
            self.port = free_port()
            try:
                launch(self.port)
                return
            except BenchError:
                if self.front is None or self.front.poll() is None or attempt == 2:
                    raise
                self.front = None

    def front_pid(self):
        return self.front.pid if self.front else None

    def worker_pids(self):
        return [p.pid for p in self.workers]

    def wait_serving(self):
        front = self.front
        wait_for(
            lambda: http_ok(HOST, self.port),
            20,
            f"{self.name}: GET / (logs: {self.dir})",
            alive=lambda: front is None or front.poll() is None,
        )

    def stop(self):
        for proc in self.workers:
            self.procs.stop(proc)
        if self.front:
            self.procs.stop(self.front, extra_pids=self.child_pids())
        self.workers, self.front = [], None

    def child_pids(self):
        return []

    # Hooks around a measured run (the broker's metrics).
    def before_run(self):
        return None

    def after_run(self, before, result):
        pass

    def worker_connections(self):
        """Active connections of each worker now (--balance); None if the
        variant cannot tell."""
        return None


class Direct(Variant):
    name = "direct"

    def start(self):
        # The first worker picks the port, the others share it (SO_REUSEPORT).
        self.port = self.start_standalone_worker(0, 0)
        for i in range(1, self.args.workers):
            self.start_standalone_worker(self.port, i)
        self.wait_serving()


class Fdbroker(Variant):
    name = "fdbroker"
    front_name = "broker"
    placement_flags = []

    def start(self):
        ready = os.path.join(self.dir, "broker.ready")
        argv = [
            os.path.join(self.args.bin_dir, "fdbroker"),
            f"--listen={HOST}:0",
            f"--control={HOST}:0",
            f"--metrics={HOST}:0",
            f"--socket={os.path.join(self.dir, 'handoff.sock')}",
            f"--workers={self.args.workers}",
            f"--worker_cmd={self.worker_bin()}",
            "--drain_timeout=3s",
            f"--ready_file={ready}",
        ] + self.placement_flags + self.args.broker_flag
        self.front = self.procs.start(argv, os.path.join(self.dir, "broker.log"))
        values = wait_for(
            lambda: read_key_values(ready),
            30,
            "fdbroker: ready file",
            alive=lambda: self.front.poll() is None,
        )
        self.port = int(values["listen"].rsplit(":", 1)[1])
        self.metrics = values["metrics"]
        wait_for(
            lambda: scrape(self.metrics).get('fdbroker_workers{state="ready"}')
            == self.args.workers,
            30,
            f"fdbroker: {self.args.workers} ready workers",
            alive=lambda: self.front.poll() is None,
        )
        self.wait_serving()

    def worker_pids(self):
        return children(self.front.pid)

    def child_pids(self):
        return children(self.front.pid) if self.front else []

    def before_run(self):
        return scrape_settled(self.metrics)

    def worker_connections(self):
        samples = scrape(self.metrics)
        return [
            v for k, v in samples.items() if k.startswith("fdbroker_worker_connections_active{")
        ]

    def after_run(self, before, result):
        after = scrape_settled(self.metrics)
        handed = after["fdbroker_connections_handed_off_total"] - before.get(
            "fdbroker_connections_handed_off_total", 0.0
        )
        result["handed_off"] = handed
        buckets = histogram_delta(before, after)
        result["handoff_latency_count"] = buckets[-1][1] if buckets else 0
        for q in (0.5, 0.99):
            value = histogram_quantile(q, buckets)
            result[f"handoff_p{round(q * 100)}_us"] = (
                None if value is None else value * 1e6
            )
        result["handoff_buckets"] = [
            [("+Inf" if b == float("inf") else b), c] for b, c in buckets
        ]
        failures = sum(
            v - before.get(k, 0.0)
            for k, v in after.items()
            if k.startswith("fdbroker_handoff_failures_total")
        )
        result["handoff_failures"] = failures
        if handed > 0 and result["front_cpu_s"] is not None:
            result["broker_cpu_per_handoff_us"] = result["front_cpu_s"] / handed * 1e6
        # --placement=kernel: the connections workers accepted themselves.
        kernel = after.get("fdbroker_connections_kernel_accepted_total", 0.0) - before.get(
            "fdbroker_connections_kernel_accepted_total", 0.0
        )
        result["kernel_accepted"] = kernel


class FdbrokerKernel(Fdbroker):
    """fdbroker --placement=kernel: each worker accepts from its own listener
    of the broker's SO_REUSEPORT group, steered by the broker's cBPF program."""

    name = "fdbroker-kernel"
    placement_flags = ["--placement=kernel"]


class Haproxy(Variant):
    name = "haproxy"
    front_name = "haproxy"

    def start(self):
        backends = [self.start_standalone_worker(0, i) for i in range(self.args.workers)]

        def launch(port):
            config = os.path.join(self.dir, "haproxy.cfg")
            with open(config, "w") as f:
                f.write(self.config(backends, port))
            self.front = self.procs.start(
                ["haproxy", "-db", "-f", config], os.path.join(self.dir, "haproxy.log")
            )
            self.wait_serving()

        self.start_front(launch)

    def config(self, backends, port):
        # Debian's defaults otherwise (threads: one per CPU); tcp mode, so
        # HAProxy splices bytes and never parses HTTP, like a broker that
        # would proxy instead of handing the socket over.
        servers = "\n".join(
            f"    server w{i} {HOST}:{port}" for i, port in enumerate(backends)
        )
        # No global maxconn: HAProxy derives it from RLIMIT_NOFILE.
        return f"""defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend bench
    bind {HOST}:{port}
    default_backend workers
backend workers
    balance roundrobin
{servers}
"""


class NodeCluster(Variant):
    name = "node-cluster"
    front_name = "primary"

    def start(self):
        ready = os.path.join(self.dir, "node.ready")

        def launch(port):
            if os.path.exists(ready):
                os.unlink(ready)
            script = os.path.join(HERE, "node_cluster.js")
            self.front = self.procs.start(
                [self.args.node, script, HOST, str(port), str(self.args.workers), ready],
                os.path.join(self.dir, "node.log"),
            )
            wait_for(
                lambda: read_key_values(ready),
                30,
                "node-cluster: ready file",
                alive=lambda: self.front.poll() is None,
            )
            self.wait_serving()

        self.start_front(launch)

    def worker_pids(self):
        return children(self.front.pid)

    def child_pids(self):
        return children(self.front.pid) if self.front else []


VARIANT_CLASSES = {
    c.name: c for c in (Direct, Fdbroker, FdbrokerKernel, Haproxy, NodeCluster)
}


# --- wrk -----------------------------------------------------------------------------


def wrk_argv(args, port, workload, duration):
    argv = [
        "wrk",
        f"-t{args.wrk_threads}",
        f"-c{args.connections}",
        f"-d{duration}s",
        "--latency",
    ]
    if workload == "close":
        argv += ["-H", "Connection: close"]
    if args.balance:
        argv += ["-s", BALANCE_SCRIPT]
    return argv + [f"http://{HOST}:{port}/"]


_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _seconds(text):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    return float(m.group(1)) * _UNIT[m.group(2)] if m else None


def parse_wrk(text):
    out = {"errors": 0, "non_2xx": 0}
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", text)
    if not m:
        raise BenchError(f"wrk printed no summary:\n{text}")
    out["requests"] = int(m.group(1))
    out["elapsed_s"] = _seconds(m.group(2) + m.group(3))
    out["rps"] = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    for pct in ("50", "99"):  # wrk --latency percentiles
        m = re.search(rf"^\s+{pct}%\s+(\S+)", text, re.M)
        if m:
            out[f"wrk_latency_p{pct}_us"] = _seconds(m.group(1)) * 1e6
    # The worst request of the run ("Latency avg stdev max").
    m = re.search(r"^\s+Latency\s+\S+\s+\S+\s+(\S+)", text, re.M)
    if m and _seconds(m.group(1)) is not None:
        out["wrk_latency_max_us"] = _seconds(m.group(1)) * 1e6
    m = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    if m:
        out["errors"] = sum(int(g) for g in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        out["non_2xx"] = int(m.group(1))
    # balance.lua: responses per worker pid.
    workers = {pid: int(n) for pid, n in re.findall(r"^worker (\S+) (\d+)$", text, re.M)}
    if workers:
        out["worker_requests"] = workers
    return out


def run_wrk(args, port, workload, duration, midway=None):
    """wrk's summary; `midway()`, if given, is called halfway through the run
    and its value returned as "midway"."""
    argv = wrk_argv(args, port, workload, duration)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sample = None
    try:
        if midway is not None:
            time.sleep(duration / 2)
            sample = midway()
        stdout, stderr = proc.communicate(timeout=duration + 30)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed:\n{stdout}{stderr}")
    out = parse_wrk(stdout)
    if sample is not None:
        out["midway"] = sample
    return out


def spread(counts, n):
    """max |count / mean - 1| over n workers (missing ones count 0)."""
    counts = list(counts) + [0] * max(0, n - len(counts))
    mean = sum(counts) / len(counts) if counts else 0
    if not mean:
        return None
    return max(abs(c / mean - 1) for c in counts)


# --- one measured run -------------------------------------------------------------


def cpu_snapshot(variant):
    front = variant.front_pid()
    workers = {pid: cpu_seconds(pid) for pid in variant.worker_pids()}
    return {
        "front": cpu_seconds(front) if front else None,
        "workers": workers,
        "front_sched": sched_stat(front) if front else None,
        "workers_sched": {pid: sched_stat(pid) for pid in workers},
        "wall": time.monotonic(),
    }


def runqueue_wait(before, after, wall):
    """From (before, after) pairs of sched_stat(), one per thread: the share
    of the run a thread spent runnable but waiting for a CPU (averaged over
    the threads), and the mean wait each time one was put on a CPU."""
    waited = slices = 0
    count = 0
    for b, a in zip(before, after):
        if b is None or a is None:
            continue
        waited += a[1] - b[1]
        slices += a[2] - b[2]
        count += 1
    if count == 0 or wall <= 0:
        return None, None
    return waited / wall / count, (waited / slices * 1e6 if slices else None)


def measure(args, variant, workload):
    if args.warmup > 0:
        run_wrk(args, variant.port, workload, args.warmup)
    metrics_before = variant.before_run()
    cpu_before = cpu_snapshot(variant)
    midway = variant.worker_connections if args.balance and workload == "keepalive" else None
    result = run_wrk(args, variant.port, workload, args.duration, midway)
    cpu_after = cpu_snapshot(variant)
    if "worker_requests" in result:
        result["request_spread"] = spread(result["worker_requests"].values(), args.workers)
    connections = result.pop("midway", None)
    if connections is not None:
        result["worker_connections"] = sorted(connections)
        result["connection_spread"] = spread(connections, args.workers)
    front = None
    if cpu_before["front"] is not None and cpu_after["front"] is not None:
        front = cpu_after["front"] - cpu_before["front"]
    workers = 0.0
    for pid, before in cpu_before["workers"].items():
        after = cpu_after["workers"].get(pid)
        if before is not None and after is not None:
            workers += after - before
    # A worker that restarted during the run would hide its CPU: say so.
    result["worker_set_changed"] = set(cpu_before["workers"]) != set(
        cpu_after["workers"]
    )
    wall = cpu_after["wall"] - cpu_before["wall"]
    share, mean = runqueue_wait([cpu_before["front_sched"]], [cpu_after["front_sched"]], wall)
    result["front_runq_share"], result["front_runq_wait_us"] = share, mean
    pids = sorted(cpu_before["workers_sched"])
    share, mean = runqueue_wait(
        [cpu_before["workers_sched"][p] for p in pids],
        [cpu_after["workers_sched"].get(p) for p in pids],
        wall,
    )
    result["workers_runq_share"], result["workers_runq_wait_us"] = share, mean
    result["front_cpu_s"] = front
    result["workers_cpu_s"] = workers
    result["total_cpu_s"] = workers + (front or 0.0)
    requests = result["requests"]
    if requests:
        result["cpu_per_request_us"] = result["total_cpu_s"] / requests * 1e6
        if workload == "close":
            # One connection per request: wrk's completed requests are the
            # connections served (the few cut off at the end are noise).
            result["cpu_per_connection_us"] = result["cpu_per_request_us"]
            if front is not None:
                result["front_cpu_per_connection_us"] = front / requests * 1e6
    variant.after_run(metrics_before, result)
    return result


# --- summary ------------------------------------------------------------------------

SUMMARY_KEYS = [
    "rps",
    "cpu_per_request_us",
    "cpu_per_connection_us",
    "front_cpu_per_connection_us",
    "broker_cpu_per_handoff_us",
    "handoff_p50_us",
    "handoff_p99_us",
    "front_runq_share",
    "front_runq_wait_us",
    "workers_runq_share",
    "workers_runq_wait_us",
    "wrk_latency_p50_us",
    "wrk_latency_p99_us",
    "errors",
    "non_2xx",
    "request_spread",
    "connection_spread",
]


def medians(runs):
    out = {}
    for run in runs:
        cell = out.setdefault(run["variant"], {}).setdefault(run["workload"], {})
        for key in SUMMARY_KEYS:
            if run.get(key) is not None:
                cell.setdefault(key, []).append(run[key])
    for variant in out.values():
        for workload, cell in variant.items():
            variant[workload] = {k: statistics.median(v) for k, v in cell.items()}
            variant[workload]["rounds"] = max(len(v) for v in cell.values())
    return out


def get(med, variant, workload, key):
    return med.get(variant, {}).get(workload, {}).get(key)


def ratio(a, b):
    return a / b if a is not None and b else None


def ratios(med):
    out = {}
    for workload in WORKLOADS:
        for variant in VARIANTS:
            if variant == "direct":
                continue
            out[f"{variant}/direct {workload} rps"] = ratio(
                get(med, variant, workload, "rps"), get(med, "direct", workload, "rps")
            )
            out[f"{variant}/direct {workload} cpu_per_request"] = ratio(
                get(med, variant, workload, "cpu_per_request_us"),
                get(med, "direct", workload, "cpu_per_request_us"),
            )
        out[f"fdbroker/haproxy {workload} rps"] = ratio(
            get(med, "fdbroker", workload, "rps"), get(med, "haproxy", workload, "rps")
        )
    return {k: v for k, v in out.items() if v is not None}


def targets(med, rat, idle, balance=False):
    """(name, value, goal, PASS|MISS|n/a) for every target of issue 6 (and,
    with --balance, the spread targets of issue 16)."""

    def check(name, value, op, goal, unit=""):
        if value is None:
            verdict = "n/a"
        else:
            verdict = "PASS" if (value >= goal if op == ">=" else value <= goal) else "MISS"
        return {"target": name, "value": value, "goal": f"{op} {goal}{unit}", "verdict": verdict}

    rss = idle.get("broker_rss_mib") if idle else None
    return [
        check("keep-alive throughput vs direct", rat.get("fdbroker/direct keepalive rps"), ">=", 0.95, "x"),
        check("connection-per-request throughput vs direct", rat.get("fdbroker/direct close rps"), ">=", 0.85, "x"),
        check("total server CPU per new connection vs direct", rat.get("fdbroker/direct close cpu_per_request"), "<=", 1.3, "x"),
        check("broker CPU per handed-off connection", get(med, "fdbroker", "close", "broker_cpu_per_handoff_us"), "<=", 10, " us"),
        # Issue 16: --placement=kernel.
        check("kernel placement: keep-alive throughput vs direct", rat.get("fdbroker-kernel/direct keepalive rps"), ">=", 0.97, "x"),
        check("kernel placement: connection-per-request throughput vs direct", rat.get("fdbroker-kernel/direct close rps"), ">=", 0.97, "x"),
        check("kernel placement: total server CPU per new connection vs direct", rat.get("fdbroker-kernel/direct close cpu_per_request"), "<=", 1.05, "x"),
        check("kernel placement: broker CPU per connection", get(med, "fdbroker-kernel", "close", "front_cpu_per_connection_us"), "<=", 1, " us"),
        check("keep-alive throughput vs HAProxy", rat.get("fdbroker/haproxy keepalive rps"), ">=", 1.6, "x"),
        check("connection-per-request throughput vs HAProxy", rat.get("fdbroker/haproxy close rps"), ">=", 1.6, "x"),
        check("hand-off latency p99 (connection per request)", get(med, "fdbroker", "close", "handoff_p99_us"), "<=", 200, " us"),
        check(f"idle connections ({idle.get('connections') if idle else '100k'}): broker RSS", rss, "<=", 64, " MiB"),
    ] if not balance else [
        check(f"{variant}: worker {what} spread, {label}", get(med, variant, workload, key), "<=", 0.10)
        for variant in ("fdbroker", "fdbroker-kernel")
        for workload, key, what, label in (
            ("keepalive", "connection_spread", "connection", "keep-alive"),
            ("close", "request_spread", "connection", "connection per request"),
        )
        if variant in med
    ]


def balance_lines(runs, med, args):
    """The balance runs as markdown: the median spread and its range over
    the rounds, per variant and workload."""
    out = [
        f"Balance, N={args.workers}, wrk -t{args.wrk_threads} -c{args.connections}, "
        f"{args.rounds} round(s) x {args.duration} s, broker flags {' '.join(args.broker_flag) or '(none)'}: "
        "spread = max |worker / mean - 1|, median (min-max over rounds).",
        "",
        "| variant | workload | spread of | median | min-max | per worker (last round) |",
        "| --- | --- | --- | ---: | --- | --- |",
    ]
    for workload in WORKLOADS:
        key, what = (
            ("connection_spread", "active connections")
            if workload == "keepalive"
            else ("request_spread", "connections")
        )
        for variant in VARIANTS:
            values = [r[key] for r in runs if r["variant"] == variant and r["workload"] == workload and r.get(key) is not None]
            if not values:
                continue
            last = [r for r in runs if r["variant"] == variant and r["workload"] == workload][-1]
            counts = last.get("worker_connections") if workload == "keepalive" else sorted(last.get("worker_requests", {}).values())
            out.append(
                f"| {variant} | {'keep-alive' if workload == 'keepalive' else 'connection per request'} | {what} "
                f"| {statistics.median(values) * 100:.1f} % | {min(values) * 100:.1f}-{max(values) * 100:.1f} % "
                f"| {' / '.join(fmt(c, 0) for c in counts)} |"
            )
    return out


def fmt(value, digits=1):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def print_summary(med, rat, tgt, args):
    print(f"\n== medians over {args.rounds} round(s), {args.duration} s each, N={args.workers} workers")
    cols = [
        ("req/s", "rps", 0),
        ("CPU us/req", "cpu_per_request_us", 1),
        ("front us/conn", "front_cpu_per_connection_us", 1),
        ("wrk p50 us", "wrk_latency_p50_us", 0),
        ("wrk p99 us", "wrk_latency_p99_us", 0),
        ("errors", "errors", 0),
    ]
    header = f"{'variant':<14}{'workload':<11}" + "".join(f"{c[0]:>15}" for c in cols)
    print(header)
    for workload in WORKLOADS:
        for variant in VARIANTS:
            if variant not in med or workload not in med[variant]:
                continue
            cell = med[variant][workload]
            print(
                f"{variant:<14}{workload:<11}"
                + "".join(f"{fmt(cell.get(c[1]), c[2]):>15}" for c in cols)
            )
    close = med.get("fdbroker", {}).get("close", {})
    if close:
        print(
            f"fdbroker hand-off latency (close): p50 {fmt(close.get('handoff_p50_us'))} us, "
            f"p99 {fmt(close.get('handoff_p99_us'))} us; broker CPU "
            f"{fmt(close.get('broker_cpu_per_handoff_us'), 2)} us per handed-off connection"
        )
        print(f"  {runqueue_sentence(close)}")
    print("\n== ratios (medians)")
    for key, value in rat.items():
        print(f"  {key:<46}{value:8.3f}")
    print("\n== targets")
    for t in tgt:
        print(f"  {t['verdict']:<5} {t['target']:<50} {fmt(t['value'], 3):>10}  (goal {t['goal']})")


def runqueue_sentence(cell):
    """Time the broker's loop and the workers spent runnable but waiting for
    a CPU (/proc/PID/schedstat): the part of the hand-off latency that is the
    scheduler's."""

    def pct(x):
        return "-" if x is None else f"{x * 100:.0f} %"

    return (
        f"Waiting for a CPU (runnable, not running) during the run: broker loop "
        f"{pct(cell.get('front_runq_share'))} of the time, {fmt(cell.get('front_runq_wait_us'))} us "
        f"per wake-up; each worker {pct(cell.get('workers_runq_share'))}, "
        f"{fmt(cell.get('workers_runq_wait_us'))} us."
    )


def markdown(med, rat, tgt, args):
    """The tables of docs/benchmarks.md, for pasting."""
    out = [
        f"Medians of {args.rounds} round(s) x {args.duration} s, N={args.workers} workers, "
        f"wrk -t{args.wrk_threads} -c{args.connections}.",
        "",
        "| variant | workload | req/s | vs direct | server CPU us/req | front CPU us/conn | wrk p50 / p99 ms |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for workload in WORKLOADS:
        for variant in VARIANTS:
            cell = med.get(variant, {}).get(workload)
            if not cell:
                continue
            vs = rat.get(f"{variant}/direct {workload} rps", 1.0 if variant == "direct" else None)
            p50, p99 = cell.get("wrk_latency_p50_us"), cell.get("wrk_latency_p99_us")
            out.append(
                f"| {variant} | {'keep-alive' if workload == 'keepalive' else 'connection per request'} "
                f"| {fmt(cell.get('rps'), 0)} | {fmt(vs, 2)} | {fmt(cell.get('cpu_per_request_us'))} "
                f"| {fmt(cell.get('front_cpu_per_connection_us'))} "
                f"| {fmt(p50 and p50 / 1000, 2)} / {fmt(p99 and p99 / 1000, 2)} |"
            )
    close = med.get("fdbroker", {}).get("close", {})
    out += [
        "",
        f"fdbroker under connection per request: hand-off latency (accept to Ack) p50 "
        f"{fmt(close.get('handoff_p50_us'))} us, p99 {fmt(close.get('handoff_p99_us'))} us; "
        f"broker CPU {fmt(close.get('broker_cpu_per_handoff_us'), 2)} us per handed-off connection.",
        runqueue_sentence(close),
        "",
        "| target | goal | measured | |",
        "| --- | --- | ---: | --- |",
    ]
    for t in tgt:
        out.append(f"| {t['target']} | {t['goal']} | {fmt(t['value'], 3)} | {t['verdict']} |")
    return "\n".join(out) + "\n"


# --- machine, chart, profile -----------------------------------------------------------


def command_output(argv):
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        return (done.stdout + done.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return None


def wake_cost(workdir, round_trips=20000):
    """wake_cost.c's figures ({mode: {parent_cpu_us, child_cpu_us, wall_us}})
    for same / cross / free placement, or None without a C compiler or with
    fewer than 2 CPUs: what one sleep and wake-up costs on this machine."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or len(os.sched_getaffinity(0)) < 2:
        return None
    binary = os.path.join(workdir, "wake_cost")
    out = {}
    try:
        subprocess.run(
            [compiler, "-O2", "-o", binary, os.path.join(HERE, "wake_cost.c")],
            check=True,
            timeout=60,
        )
        for mode in ("same", "cross", "free"):
            done = subprocess.run(
                [binary, str(round_trips), mode],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            out[mode] = {k: float(v) for k, v in (kv.split("=") for kv in done.stdout.split())}
    except (subprocess.SubprocessError, ValueError) as e:
        # A machine fact, not the benchmark: report it missing, carry on.
        print(f"wake_cost: {e}")
        return None
    return out


def wake_cost_sentence(cost):
    if not cost:
        return "Wake-up cost: not measured (no C compiler, fewer than two CPUs, or it failed)."

    def side(mode):
        c = cost[mode]
        return f"{(c['parent_cpu_us'] + c['child_cpu_us']) / 2:.1f} us of CPU per side, {c['wall_us']:.0f} us wall"

    return (
        "One sleep/wake round trip between two processes (tests/bench/wake_cost.c): "
        f"on one CPU {side('same')}; across CPUs {side('cross')}; unpinned {side('free')}."
    )


def machine_info(args):
    model = None
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "wrk": command_output(["wrk", "-v"]),
        "haproxy": command_output(["haproxy", "-v"]),
        "node": command_output([args.node, "--version"]),
        "python": platform.python_version(),
        "fdbroker_commit": command_output(["git", "-C", ROOT, "describe", "--always", "--dirty"]),
        "loadavg_at_start": open("/proc/loadavg").read().split()[:3],
    }


def draw_chart(med, path, args):
    """Two panels: throughput and server CPU per request, per workload."""
    if not shutil.which("gnuplot"):
        print("chart: gnuplot not found (deploy/setup.sh --bench-tools installs it); skipped")
        return False
    with tempfile.NamedTemporaryFile("w", suffix=".dat", delete=False) as f:
        data = f.name
        # Columns: variant, keep-alive req/s, close req/s, keep-alive CPU, close CPU.
        for v in VARIANTS:
            row = [
                get(med, v, "keepalive", "rps"),
                get(med, v, "close", "rps"),
                get(med, v, "keepalive", "cpu_per_request_us"),
                get(med, v, "close", "cpu_per_request_us"),
            ]
            f.write(v + " " + " ".join("NaN" if x is None else f"{x:.3f}" for x in row) + "\n")
    title = f"N={args.workers} workers, wrk -t{args.wrk_threads} -c{args.connections}, median of {args.rounds} x {args.duration} s"
    script = f"""
set terminal pngcairo size 1200,500 font ",10"
set output "{path}"
set multiplot layout 1,2 title "fdbroker benchmark: {title}"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set boxwidth 0.9
set key top left
set grid ytics
set yrange [0:*]
set title "throughput (requests/s, higher is better)"
plot "{data}" using 2:xtic(1) title "keep-alive", "" using 3 title "connection per request"
set title "server CPU per request (us, front + workers, lower is better)"
plot "{data}" using 4:xtic(1) title "keep-alive", "" using 5 title "connection per request"
unset multiplot
"""
    try:
        done = subprocess.run(["gnuplot"], input=script, text=True, capture_output=True, timeout=60)
    finally:
        os.unlink(data)
    if done.returncode != 0:
        raise BenchError(f"gnuplot failed: {done.stderr}")
    print(f"chart: {path}")
    return True


def profile_broker(args, variant, out_prefix):
    """perf record -g of the broker under connection-per-request load; the
    top symbols of perf report --no-children."""
    if not shutil.which("perf"):
        print("profile: perf not found (deploy/setup.sh --bench-tools installs linux-perf); skipped")
        return None
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    data = out_prefix + ".perf.data"
    seconds = max(2, min(args.duration, 10))
    perf = subprocess.Popen(
        ["perf", "record", "-g", "-F", "999", "-p", str(variant.front_pid()), "-o", data, "--", "sleep", str(seconds)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        load = run_wrk(args, variant.port, "close", seconds)
    finally:
        _, err = perf.communicate(timeout=seconds + 60)
    if perf.returncode != 0:
        print(f"profile: perf record failed: {err.strip()}")
        return None
    report = subprocess.run(
        ["perf", "report", "-i", data, "--no-children", "--stdio", "--sort", "dso,symbol", "-g", "none"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    # Drop perf's empty trailing columns ("-  -") and the padding.
    lines = [
        re.sub(r"(\s+-)*\s*$", "", l)
        for l in report.stdout.splitlines()
        if l.strip() and not l.startswith("#")
    ]
    top = lines[:15]
    m = re.search(r"^# Samples: (\S+)\s+of event '([^']+)'", report.stdout, re.M)
    samples = f"{m.group(1)} samples of {m.group(2)}" if m else "samples: ?"
    with open(out_prefix + ".perf.txt", "w") as f:
        f.write(f"perf record -g -F 999 -p <broker> under wrk -t{args.wrk_threads} -c{args.connections} -H 'Connection: close' for {seconds} s ({load['rps']:.0f} req/s)\n")
        f.write(f"perf report --no-children --sort dso,symbol (top 15 of {samples})\n")
        f.write("\n".join(top) + "\n")
    os.unlink(data)
    print(f"profile: {out_prefix}.perf.txt")
    return {"seconds": seconds, "rps": load["rps"], "samples": samples, "top": top}


# --- main ----------------------------------------------------------------------------------


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin-dir", required=True, help="directory with fdbroker and fdbroker-http-worker")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    p.add_argument("--warmup", type=int, default=2, help="seconds of warm-up before each run (0: none)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--wrk-threads", type=int, default=2)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--broker-flag", action="append", default=[], help="extra fdbroker flag (repeatable)")
    p.add_argument("--node", default="/usr/bin/node")
    p.add_argument("--json", required=True, help="where to write the results")
    p.add_argument("--chart", default="", help="PNG path ('' : no chart)")
    p.add_argument("--profile", default="", help="path prefix for the perf profile ('' : none)")
    p.add_argument("--idle-json", default="", help="results of idle.py to fold into the summary")
    p.add_argument(
        "--balance",
        action="store_true",
        help="measure the spread of the load over the workers (balance.lua; slows wrk down)",
    )
    args = p.parse_args()
    args.variants = choices(p, "--variants", args.variants, VARIANTS)
    args.workloads = choices(p, "--workloads", args.workloads, WORKLOADS)
    if args.rounds < 1 or args.duration < 1 or args.workers < 1:
        p.error("--rounds, --duration and --workers must be at least 1")
    return args


def main():
    args = parse_args()
    procs = Processes()
    workdir = tempfile.mkdtemp(prefix="fdbroker-bench.")
    started = datetime.datetime.now(datetime.timezone.utc)
    runs, variants, profile = [], {}, None
    try:
        info = machine_info(args)
        print(f"machine: {info['nproc']} CPUs, {info['cpu_model']}, kernel {info['kernel']}, load {' '.join(info['loadavg_at_start'])}")
        info["wake_cost"] = wake_cost(workdir)
        print(wake_cost_sentence(info["wake_cost"]))
        for name in args.variants:
            if name == "node-cluster" and not os.access(args.node, os.X_OK):
                print(f"node-cluster: {args.node} not found; variant skipped")
                continue
            if name == "haproxy" and not shutil.which("haproxy"):
                print("haproxy: not found (deploy/setup.sh --bench-tools); variant skipped")
                continue
            variant = VARIANT_CLASSES[name](args, procs, workdir)
            variant.start()
            variants[name] = variant
            print(f"{name}: serving on {HOST}:{variant.port}")
        for rnd in range(1, args.rounds + 1):
            for workload in args.workloads:
                for name, variant in variants.items():
                    result = measure(args, variant, workload)
                    result.update(variant=name, workload=workload, round=rnd)
                    runs.append(result)
                    extra = ""
                    if args.balance:
                        counts = result.get("worker_connections") or sorted(result.get("worker_requests", {}).values())
                        extra = f", per worker {counts}"
                    elif workload == "close" and result.get("handoff_p99_us") is not None:
                        extra = f", hand-off p99 {result['handoff_p99_us']:.0f} us"
                    print(
                        f"round {rnd} {workload:<9} {name:<13} {result['rps']:>10,.0f} req/s, "
                        f"{result.get('cpu_per_request_us', 0):6.1f} us CPU/req, errors {result['errors']}{extra}",
                        flush=True,
                    )
        if args.profile and "fdbroker" in variants:
            profile = profile_broker(args, variants["fdbroker"], args.profile)
    finally:
        for variant in variants.values():
            variant.stop()
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)

    idle = None
    if args.idle_json and os.path.exists(args.idle_json):
        with open(args.idle_json) as f:
            idle = json.load(f)
    med = medians(runs)
    rat = ratios(med)
    tgt = targets(med, rat, idle, args.balance)
    print_summary(med, rat, tgt, args)
    if args.balance:
        print("\n== balance\n" + "\n".join(balance_lines(runs, med, args)))
    print(wake_cost_sentence(info["wake_cost"]))
    result = {
        "started": started.isoformat(timespec="seconds"),
        "machine": info,
        "settings": {
            "rounds": args.rounds,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "workers": args.workers,
            "wrk_threads": args.wrk_threads,
            "wrk_connections": args.connections,
            "wrk_keepalive": " ".join(wrk_argv(args, 0, "keepalive", args.duration)),
            "wrk_close": " ".join(wrk_argv(args, 0, "close", args.duration)),
            "broker_flags": args.broker_flag,
            "balance": args.balance,
            "variants": list(variants),
        },
        "runs": runs,
        "medians": med,
        "ratios": rat,
        "targets": tgt,
        "idle": idle,
        "profile": profile,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    table = os.path.splitext(args.json)[0] + ".md"
    with open(table, "w") as f:
        f.write(markdown(med, rat, tgt, args) + "\n" + wake_cost_sentence(info["wake_cost"]) + "\n")
        if args.balance:
            f.write("\n" + "\n".join(balance_lines(runs, med, args)) + "\n")
    print(f"\nresults: {args.json} (tables: {table})")
    if args.chart:
        draw_chart(med, args.chart, args)


if __name__ == "__main__":
    run_main(main)
