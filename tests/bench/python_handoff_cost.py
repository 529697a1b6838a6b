#!/usr/bin/python3
"""What the Python side of a hand-off costs, per connection.

One Python process serves `wrk -H 'Connection: close'` with a protocol that
answers a fixed response to its first bytes and closes (no HTTP parsing, no
framework: only the per-connection path is left), three ways, interleaved:

  direct    uvloop's own accept loop: loop.create_server(protocol, sock=)
            (what uvicorn and gunicorn's uvicorn workers do)
  handoff   fdbroker_worker.create_server(protocol) behind a real fdbroker:
            recvmsg of the broker's message and fd, Ack, the transport,
            Closed
  kernel    the same fdbroker_worker.create_server(protocol) behind a
            second fdbroker with --placement=kernel: the worker accepts from
            the listener the broker grants it with uvloop's accept loop
            (§7.10), and the SDK only notes each connection

The figure is the serving process's CPU (utime + stime from
/proc/PID/stat) per connection; the difference between the two is what the
SDK adds in the worker. The brokers' own CPU per connection is shown apart.

    tests/bench/python_handoff_cost.py [--rounds=3] [--duration=4]
        [--loop=uvloop|asyncio] [--bin-dir=build/test/bin]

Environment as for the SDK's tests: PYTHONPATH with worker/python and
FDBROKER_PYTHON_PROTO_DIR (as ctest's bench_python_handoff_cost_smoke sets
them), e.g.

    PYTHONPATH=worker/python FDBROKER_PYTHON_PROTO_DIR=build/test/gen/python \
        tests/bench/python_handoff_cost.py --rounds=5
"""

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n"
            b"\r\nok")


class Answer(asyncio.Protocol):
    """Answers the first bytes with RESPONSE and closes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(RESPONSE)
        self.transport.close()


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def serve(mode: str, loop_kind: str, address: str) -> None:
    """The serving process: prints 'ready HOST:PORT', serves until SIGTERM."""
    loop = new_loop(loop_kind)
    asyncio.set_event_loop(loop)
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)

    async def main() -> None:
        if mode == "direct":
            sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
            server = await loop.create_server(Answer, sock=sock)
            print(f"ready 127.0.0.1:{sock.getsockname()[1]}", flush=True)
            await stop
            server.close()
        else:
            import fdbroker_worker
            server = await fdbroker_worker.create_server(Answer)
            print(f"ready {address}", flush=True)
            await stop

    loop.run_until_complete(main())


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_wrk(address: str, duration: float, connections: int) -> int:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{int(duration)}s", "-H",
         "Connection: close", f"http://{address}/"],
        capture_output=True, text=True, check=True,
        timeout=duration + 30).stdout
    for line in out.splitlines():
        if "requests in" in line:
            return int(line.split()[0])
    raise RuntimeError(f"no request count in wrk's output:\n{out}")


def start_broker(args: argparse.Namespace, directory: str, name: str,
                 *flags: str) -> tuple[subprocess.Popen, str, str]:
    """A broker without workers; (the process, its --listen address, its
    hand-off socket)."""
    ready = os.path.join(directory, f"{name}.ready")
    sock_path = os.path.join(directory, f"{name}.sock")
    broker = subprocess.Popen(
        [os.path.join(args.bin_dir, "fdbroker"), "--listen=127.0.0.1:0",
         "--workers=0", "--control=", "--metrics=", f"--socket={sock_path}",
         f"--ready_file={ready}", *flags], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not os.path.exists(ready):
        if time.monotonic() > deadline or broker.poll() is not None:
            broker.kill()
            raise RuntimeError(f"the {name} broker did not start")
        time.sleep(0.05)
    with open(ready) as file:
        listen = dict(line.strip().split("=", 1)
                      for line in file if "=" in line)["listen"]
    return broker, listen, sock_path


def start(args: argparse.Namespace, mode: str, env: dict,
          address: str = "") -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve", mode, f"--loop={args.loop}",
         f"--address={address}"], stdout=subprocess.PIPE, text=True,
        env=env)
    line = process.stdout.readline()
    if not line.startswith("ready "):
        process.kill()
        raise RuntimeError(f"{mode} did not start: {line!r}")
    return process, line.split()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=4)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"),
                        default="uvloop")
    parser.add_argument("--bin-dir", default="build/test/bin")
    parser.add_argument("--serve", choices=("direct", "handoff", "kernel"))
    parser.add_argument("--address", default="")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.loop, args.address)
        return 0

    scratch = tempfile.TemporaryDirectory(prefix="fdbroker-handoff-cost.")
    processes: list[subprocess.Popen] = []
    try:
        brokers = {}  # mode -> (broker, its listen address)
        for mode, flags in (("handoff", ()),
                            ("kernel", ("--placement=kernel",))):
            broker, listen, sock_path = start_broker(args, scratch.name,
                                                     mode, *flags)
            processes.append(broker)
            brokers[mode] = (broker, listen, {**os.environ,
                                              "FDBROKER_SOCKET": sock_path})
        direct, direct_address = start(args, "direct", dict(os.environ))
        ways = [("direct", direct, direct_address, None)]
        processes.append(direct)
        for mode, (broker, listen, env) in brokers.items():
            server, _ = start(args, mode, env, listen)
            processes.append(server)
            ways.append((mode, server, listen, broker))
        results: dict[str, list[float]] = {way[0]: [] for way in ways}
        broker_us: dict[str, list[float]] = {mode: [] for mode in brokers}
        for round_ in range(args.rounds):
            # The order rotates between rounds.
            shift = round_ % len(ways)
            for mode, process, address, broker in ways[shift:] + ways[:shift]:
                before = cpu_seconds(process.pid)
                broker_before = cpu_seconds(broker.pid) if broker else 0.0
                count = run_wrk(address, args.duration, args.connections)
                used = cpu_seconds(process.pid) - before
                results[mode].append(used / count * 1e6)
                if broker is not None:
                    broker_us[mode].append((cpu_seconds(broker.pid) -
                                            broker_before) / count * 1e6)
                print(f"round {round_ + 1} {mode:8} {count:7d} connections "
                      f"{used / count * 1e6:6.1f} us CPU each", flush=True)
        medians = {mode: statistics.median(values)
                   for mode, values in results.items()}
        spread = {mode: f"{min(values):.1f}-{max(values):.1f}"
                  for mode, values in results.items()}
        direct_us = medians["direct"]
        print(f"\nmedians (min-max) of {args.rounds} rounds ({args.loop}), "
              "CPU per connection in the serving process: direct "
              f"{direct_us:.1f} us ({spread['direct']})")
        for mode in brokers:
            print(f"  {mode:8} {medians[mode]:.1f} us ({spread[mode]}): the "
                  f"SDK adds {medians[mode] - direct_us:.1f} us; the broker "
                  f"{statistics.median(broker_us[mode]):.1f} us")
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
