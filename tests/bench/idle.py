#!/usr/bin/python3
"""Scale run: many concurrent idle keep-alive connections through fdbroker
(tests/bench/idle_connections.sh runs this).

Opens --connections client connections to a broker with supervised
fdbroker-http-worker workers, waits until every one is handed off and owned
by a worker, reads the broker's RSS and fd count from /proc, then sends one
request on each of --sample connections (all by default) and checks that
each gets its 200. Everything is bounded by --timeout; every socket is closed
and every process stopped by pid at the end.

Limits: each client process and each worker holds its connections' fds, so
with a hard RLIMIT_NOFILE below the total (raising it needs
CAP_SYS_RESOURCE), the connections are spread over several client
processes and at least as many workers. Client sockets bind to source
addresses across 127.0.0.0/8 (IP_BIND_ADDRESS_NO_PORT, so the port is chosen
at connect) so that no source address runs out of ephemeral ports.
"""

import argparse
import json
import math
import multiprocessing
import os
import random
import resource
import select
import shutil
import socket
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (  # noqa: E402
    BenchError,
    Processes,
    children,
    fd_count,
    read_key_values,
    run_main,
    rss_bytes,
    scrape,
    wait_for,
)

HOST = "127.0.0.1"
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
PER_SOURCE = 1000  # connections per client source address
FD_HEADROOM = 200  # fds a process needs besides its connections
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


def source_address(index):
    """127.1.0.1, 127.1.0.2, ... : one address per PER_SOURCE connections."""
    n = (127 << 24) + (1 << 16) + 1 + index // PER_SOURCE
    return socket.inet_ntoa(n.to_bytes(4, "big"))


# --- a client process -------------------------------------------------------------------


def client(port, first, count, pipe, deadline):
    """Holds connections first..first+count-1; obeys commands on pipe."""
    socks = []
    try:
        ep = select.epoll()
        pending = {}
        index = first
        batch = 256  # connects in flight at once, below the listen backlog
        while index < first + count or pending:
            if time.monotonic() > deadline:
                raise BenchError(f"client {first}: connect deadline ({len(socks)} of {count})")
            while index < first + count and len(pending) < batch:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                s.bind((source_address(index), 0))
                s.setblocking(False)
                err = s.connect_ex((HOST, port))
                if err not in (0, 115):  # EINPROGRESS
                    raise BenchError(f"connect: {os.strerror(err)}")
                pending[s.fileno()] = s
                ep.register(s.fileno(), select.EPOLLOUT)
                index += 1
            for fd, _ in ep.poll(1.0):
                s = pending.pop(fd)
                ep.unregister(fd)
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise BenchError(f"connect from {s.getsockname()}: {os.strerror(err)}")
                socks.append(s)
        pipe.send(("connected", len(socks)))

        while True:
            command, arg = pipe.recv()
            if command == "close":
                break
            if command == "request":
                chosen = random.sample(socks, min(arg, len(socks)))
                pipe.send(("answered",) + request_all(ep, chosen, deadline))
        pipe.send(("closed", 0))
    except Exception as e:  # reported to the parent, which fails the run
        pipe.send(("error", str(e)))
    finally:
        for s in socks:
            s.close()


def request_all(ep, socks, deadline):
    """Sends one GET on each socket; (answered 200, failed) once all are in."""
    byfd = {}
    for s in socks:
        s.sendall(REQUEST)  # 33 bytes into an empty send buffer: no wait
        byfd[s.fileno()] = [s, b""]
        ep.register(s.fileno(), select.EPOLLIN)
    ok = failed = 0
    while byfd and time.monotonic() < deadline:
        for fd, _ in ep.poll(1.0):
            entry = byfd[fd]
            data = entry[0].recv(4096)
            entry[1] += data
            head, sep, body = entry[1].partition(b"\r\n\r\n")
            length = None
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            done = not data or (sep and length is not None and len(body) >= length)
            if done:
                if data and head.startswith(b"HTTP/1.1 200"):
                    ok += 1
                else:
                    failed += 1
                ep.unregister(fd)
                del byfd[fd]
    return ok, failed + len(byfd)


# --- the run ---------------------------------------------------------------------------------


def read_sysctl(path):
    try:
        with open(path) as f:
            return f.read().split()
    except OSError:
        return None


def raise_fd_limit(want):
    """Soft limit up to the hard one; the hard one up to want if allowed.
    Children (broker, workers, clients) inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
        except (ValueError, OSError):
            pass
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin-dir", required=True)
    p.add_argument("--connections", type=int, default=100000)
    p.add_argument("--workers", type=int, default=2, help="at least this many (more if fds require)")
    p.add_argument("--sample", type=int, default=0, help="connections to send a request on (0: all)")
    p.add_argument("--timeout", type=float, default=300, help="bound on the whole run, seconds")
    p.add_argument("--json", default="")
    args = p.parse_args()
    deadline = time.monotonic() + args.timeout
    total = args.connections

    nofile = raise_fd_limit(total + FD_HEADROOM)
    per_process = nofile - FD_HEADROOM
    clients = math.ceil(total / per_process)
    # least_conn spreads evenly; 10 % room for imbalance.
    workers = max(args.workers, math.ceil(total * 1.1 / per_process))
    nr_open = read_sysctl("/proc/sys/fs/nr_open")
    ports = read_sysctl("/proc/sys/net/ipv4/ip_local_port_range")
    print(
        f"RLIMIT_NOFILE {nofile} (fs.nr_open {nr_open[0] if nr_open else '?'}), "
        f"ip_local_port_range {' '.join(ports or ['?'])}: "
        f"{clients} client process(es), {workers} workers, "
        f"{math.ceil(total / PER_SOURCE)} source addresses from {source_address(0)}"
    )
    if ports and int(ports[1]) - int(ports[0]) < PER_SOURCE:
        raise BenchError("ip_local_port_range is narrower than connections per source address")

    procs = Processes()
    workdir = tempfile.mkdtemp(prefix="fdbroker-idle.")
    broker = None
    pipes, client_procs = [], []
    result = {"connections": total, "workers": workers, "client_processes": clients, "rlimit_nofile": nofile}
    try:
        ready = os.path.join(workdir, "ready")
        broker = procs.start(
            [
                os.path.join(args.bin_dir, "fdbroker"),
                f"--listen={HOST}:0",
                f"--control={HOST}:0",
                f"--metrics={HOST}:0",
                f"--socket={workdir}/handoff.sock",
                f"--workers={workers}",
                "--drain_timeout=3s",
                f"--ready_file={ready}",
            ],
            os.path.join(workdir, "broker.log"),
        )
        alive = lambda: broker.poll() is None  # noqa: E731
        values = wait_for(lambda: read_key_values(ready), 30, "broker ready file", alive=alive)
        port = int(values["listen"].rsplit(":", 1)[1])
        metrics = values["metrics"]
        wait_for(
            lambda: scrape(metrics).get('fdbroker_workers{state="ready"}') == workers,
            60, f"{workers} ready workers", alive=alive,
        )
        base_fds, base_rss = fd_count(broker.pid), rss_bytes(broker.pid)
        result["broker_fds_idle"] = base_fds
        result["broker_rss_idle_mib"] = base_rss / 2**20

        start = time.monotonic()
        ctx = multiprocessing.get_context("fork")
        per_client = math.ceil(total / clients)
        for i in range(clients):
            first = i * per_client
            count = min(per_client, total - first)
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=client, args=(port, first, count, child_end, deadline), daemon=True)
            proc.start()
            pipes.append(parent_end)
            client_procs.append(proc)

        def expect(reply_kind):
            replies = []
            for pipe in pipes:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not pipe.poll(remaining):
                    raise BenchError(f"a client did not answer '{reply_kind}' in time")
                reply = pipe.recv()
                if reply[0] == "error":
                    raise BenchError(f"client: {reply[1]}")
                replies.append(reply)
            return replies

        connected = sum(r[1] for r in expect("connected"))
        result["connect_seconds"] = time.monotonic() - start
        print(f"{connected} connections open after {result['connect_seconds']:.1f} s")
        # Every connection accepted, handed off and acked: owned by a worker.
        wait_for(
            lambda: scrape(metrics).get("fdbroker_connections_active", 0) >= total,
            max(1, deadline - time.monotonic()),
            f"fdbroker_connections_active reaching {total}",
            interval=0.5, alive=alive,
        )
        m = scrape(metrics)
        result["broker_rss_mib"] = rss_bytes(broker.pid) / 2**20
        result["broker_rss_peak_mib"] = rss_bytes(broker.pid, "VmHWM") / 2**20
        result["broker_fds"] = fd_count(broker.pid)
        result["metrics_connections_active"] = m.get("fdbroker_connections_active")
        result["metrics_resident_memory_mib"] = m.get("process_resident_memory_bytes", 0) / 2**20
        result["handoff_failures"] = sum(v for k, v in m.items() if k.startswith("fdbroker_handoff_failures_total"))
        worker_pids = children(broker.pid)
        result["worker_fds"] = {str(pid): fd_count(pid) for pid in worker_pids}
        result["worker_rss_mib"] = {str(pid): round(rss_bytes(pid) / 2**20, 1) for pid in worker_pids}
        print(
            f"at {total} connections: broker RSS {result['broker_rss_mib']:.1f} MiB "
            f"(peak {result['broker_rss_peak_mib']:.1f}, idle {result['broker_rss_idle_mib']:.1f}), "
            f"broker fds {result['broker_fds']} (idle {base_fds}); worker fds {sorted(result['worker_fds'].values())}"
        )

        sample = args.sample or total
        per_client_sample = math.ceil(sample / clients)
        for pipe in pipes:
            pipe.send(("request", per_client_sample))
        start = time.monotonic()
        answers = expect("answered")
        result["requests_sent"] = min(sample, per_client_sample * clients)
        result["requests_ok"] = sum(r[1] for r in answers)
        result["requests_failed"] = sum(r[2] for r in answers)
        result["request_seconds"] = time.monotonic() - start
        print(
            f"requests on {result['requests_sent']} of them: {result['requests_ok']} answered 200, "
            f"{result['requests_failed']} failed ({result['request_seconds']:.1f} s)"
        )
        result["broker_rss_after_requests_mib"] = rss_bytes(broker.pid) / 2**20

        for pipe in pipes:
            pipe.send(("close", 0))
        expect("closed")
        # The broker learns of each close from the workers' Closed messages.
        try:
            wait_for(
                lambda: scrape(metrics).get("fdbroker_connections_active", 1) == 0,
                min(30, max(1, deadline - time.monotonic())),
                "connections_active back to 0", interval=0.5, alive=alive,
            )
        except BenchError as e:
            print(f"note: {e}")
        result["broker_fds_after_close"] = fd_count(broker.pid)
        result["ok"] = result["requests_ok"] == result["requests_sent"]
    finally:
        for proc in client_procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        if broker is not None:
            procs.stop(broker, extra_pids=children(broker.pid) if broker.poll() is None else [])
        procs.stop_all()
        for name in ("broker.log",):
            path = os.path.join(workdir, name)
            if os.path.exists(path) and not result.get("ok"):
                with open(path, errors="replace") as f:
                    tail = f.readlines()[-20:]
                print("broker log (last lines):\n" + "".join(tail), file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if not result.get("ok"):
        raise BenchError("not every sampled connection was answered")
    print(f"ok: {total} idle connections held, every sampled one answered")


if __name__ == "__main__":
    run_main(main)
