"""Helpers shared by the benchmark (bench.py) and the scale run (idle.py):
processes we start and stop by pid, /proc readings, the broker's metrics."""

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    pass


def run_main(main):
    """Runs main(); a BenchError is one line on stderr and exit code 1."""
    try:
        main()
    except BenchError as e:
        print(f"{os.path.basename(sys.argv[0])}: {e}", file=sys.stderr)
        sys.exit(1)


def choices(parser, option, value, allowed):
    """A comma-separated list option, each item one of `allowed` (else a
    usage error naming the option)."""
    items = [item for item in value.split(",") if item]
    for item in items:
        if item not in allowed:
            parser.error(f"{option}: unknown {item} (one of {', '.join(allowed)})")
    return items


def wait_for(predicate, timeout, what, interval=0.05, alive=None):
    """Polls predicate() until it returns a true value; raises after timeout.
    alive() (optional) is checked too, so a process that died fails at once."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if alive is not None and not alive():
            raise BenchError(f"{what}: the process exited")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not within {timeout} s")
        time.sleep(interval)


def read_key_values(path):
    try:
        with open(path) as f:
            return dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)
    except FileNotFoundError:
        return None


def free_port(host="127.0.0.1"):
    """A port that was free a moment ago (for servers that cannot report the
    port they bound; callers retry if they lose the race)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http_ok(host, port, timeout=2.0):
    """True if GET / on host:port answers 200."""
    try:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        conn.request("GET", "/", headers={"Connection": "close"})
        status = conn.getresponse().status
        conn.close()
        return status == 200
    except OSError:
        return False


# --- /proc -----------------------------------------------------------------


def _stat_fields(pid):
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    # The command name may contain spaces and parentheses: split after the last ')'.
    return data[data.rindex(")") + 2 :].split()


def cpu_seconds(pid):
    """utime + stime of the whole process (all threads), in seconds; None if
    it is gone."""
    try:
        fields = _stat_fields(pid)
    except (FileNotFoundError, ProcessLookupError):
        return None
    # fields[0] is field 3 (state): utime is field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def sched_stat(pid):
    """(seconds on a CPU, seconds runnable but waiting for one, times run) of
    the process's main thread, from /proc/PID/schedstat; None if it is gone.
    For the broker the main thread is the event loop."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            on_cpu, waiting, slices = (int(x) for x in f.read().split()[:3])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return on_cpu / 1e9, waiting / 1e9, slices


def children(pid):
    """Pids whose parent is pid (no /proc/PID/task/*/children here)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if int(_stat_fields(entry)[1]) == pid:
                out.append(int(entry))
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
    return sorted(out)


def rss_bytes(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


# --- processes -------------------------------------------------------------


class Processes:
    """Every process this run started, stopped by pid (never by name)."""

    def __init__(self):
        self.procs = []

    def start(self, argv, log_path, **kwargs):
        log = open(log_path, "ab")
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, **kwargs
            )
        finally:
            log.close()
        self.procs.append(proc)
        return proc

    def stop(self, proc, timeout=10.0, extra_pids=()):
        """SIGTERM, then SIGKILL after timeout. extra_pids: processes proc
        started (a broker's workers) that must not outlive it."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in extra_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self):
        for proc in reversed(list(self.procs)):
            self.stop(proc, timeout=5.0)


# --- the broker's metrics ------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def scrape(address, timeout=5.0):
    """Prometheus text of http://address/metrics as {'name{labels}': value}."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout) as r:
        text = r.read().decode()
    samples = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return samples


def scrape_settled(address, key="fdbroker_connections_handed_off_total", timeout=10.0):
    """A scrape after the broker's counters stopped moving. The event loop
    copies its counters into prometheus-cpp twice a second, so a scrape right
    after the load ends can miss the last half second: wait until two scrapes
    0.6 s apart agree."""
    previous = scrape(address)
    deadline = time.monotonic() + timeout
    while True:
        time.sleep(0.6)
        current = scrape(address)
        if current.get(key) == previous.get(key):
            return current
        if time.monotonic() > deadline:
            raise BenchError(f"{key} kept moving for {timeout} s after the load")
        previous = current


def histogram_delta(before, after, name="fdbroker_handoff_latency_seconds"):
    """[(upper bound, count in this bucket range, cumulative)] of after - before."""
    pattern = re.compile(re.escape(name) + r'_bucket\{le="([^"]+)"\}')
    buckets = []
    for key, value in after.items():
        m = pattern.fullmatch(key)
        if m:
            bound = float("inf") if m.group(1) == "+Inf" else float(m.group(1))
            buckets.append((bound, value - before.get(key, 0.0)))
    return sorted(buckets)


def histogram_quantile(q, buckets):
    """Prometheus' histogram_quantile over cumulative (bound, count) pairs:
    linear interpolation inside the bucket. None without observations."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, cumulative in buckets:
        if cumulative >= rank:
            if bound == float("inf"):
                return lower  # beyond the last finite bound
            inside = cumulative - below
            fraction = (rank - below) / inside if inside > 0 else 1.0
            return lower + (bound - lower) * fraction
        lower, below = bound, cumulative
    return lower
