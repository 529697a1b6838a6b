"""The runner under the real `fdbroker --placement=kernel` (§7.10): each
worker accepts from the listening socket the broker grants it with its
framework's own accept loop, and the broker sees its figures only.

FastAPI, Flask and aiohttp apps served through granted listeners (the
broker's kernel_accepted counter and per-worker active figures say so); a
SIGTERM drain under connection-per-request load loses no request, and what
the kernel queued on the drained worker's listener is served by the other;
Rebalance moves keep-alive clients of kernel-accepted connections; a mixed
pool with a worker that takes hand-offs only; a broker SIGKILLed under
load and started again adopts the workers with the listeners they return.
Each test starts its own broker on 127.0.0.1 port 0, waits by polling
(every wait bounded) and kills only what it started, by pid."""

import concurrent.futures
import json
import os
import shutil
import signal
import threading
import time
import unittest
from typing import Optional

from broker_process import Broker, child_pids, get, wait_for
from test_runner_integration import (EXAMPLES, KeepAlive, RunnerBroker,
                                     get_json, runner_cmd, worker_exit_codes)

KERNEL = "--placement=kernel"
KERNEL_ACCEPTED = "fdbroker_connections_kernel_accepted_total"
HANDED_OFF = "fdbroker_connections_handed_off_total"


def fresh_get(port: int, path: str = "/", timeout: float = 10.0
              ) -> tuple[int, Optional[int]]:
    """One request on a fresh connection: (status, the answering pid)."""
    status, body = get_json(port, path, timeout)
    return status, (body or {}).get("pid")


def fresh_load(port: int, results: list[tuple], stop: threading.Event,
               seconds: float) -> None:
    """Connection-per-request load until `stop` is set, for `seconds` at
    most (bounded whatever happens): appends each request's (status, pid),
    or (the error, None)."""
    deadline = time.monotonic() + seconds
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            results.append(fresh_get(port, timeout=20))
        except OSError as error:
            results.append((repr(error), None))


def await_more(results: list[tuple], count: int, what: str) -> int:
    """Waits (20 s at most) until `count` more results came; how many there
    were before."""
    before = len(results)
    wait_for(lambda: len(results) >= before + count, 20, what)
    return before


def listeners_held_by(port: int, pids: set[int]) -> set[int]:
    """Inodes of the TCP listeners on 127.0.0.1:`port` (the SO_REUSEPORT
    group) that any of `pids` holds an fd of."""
    group = set()
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if (fields[1] == "0100007F:%04X" % port and
                    fields[3] == "0A"):  # TCP_LISTEN
                group.add(int(fields[9]))
    held = set()
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except FileNotFoundError:
                continue  # closed meanwhile
            if target.startswith("socket:["):
                held.add(int(target[len("socket:["):-1]))
    return group & held


class KernelRunnerTest(unittest.TestCase):
    def serve(self, app: str, app_dir, *args: str, workers: int = 2,
              flags: tuple[str, ...] = ()) -> tuple[RunnerBroker, set[int]]:
        broker = RunnerBroker(
            self, workers, runner_cmd(app, app_dir, "--timeout-keep-alive=60",
                                      *args),
            KERNEL, *flags, metrics=True)
        pids, _ = broker.wait_for_workers(workers)
        self.wait_kernel_placed(broker)
        return broker, pids

    def handed_total(self, broker: RunnerBroker) -> int:
        return sum(int(w.get("handedTotal", 0)) for w in broker.workers())

    def wait_kernel_placed(self, broker: RunnerBroker) -> None:
        """Until the broker's placement program gives the workers' own
        listeners every connection (it is reloaded at most every 100 ms
        after a worker registers): 10 connections in a row that the broker
        did not hand off."""
        def placed() -> bool:
            before = self.handed_total(broker)
            for _ in range(10):
                self.assertEqual(fresh_get(broker.port)[0], 200)
            return self.handed_total(broker) == before
        wait_for(placed, 20, "connections placed by the kernel only")

    def loads_are(self, broker: RunnerBroker, total: int
                  ) -> Optional[dict[int, int]]:
        loads = broker.loads()
        return loads if sum(loads.values()) == total else None

    def kernel_accepted(self, app: str, app_dir, *args: str) -> None:
        broker, pids = self.serve(app, app_dir, *args)
        before = broker.metric(KERNEL_ACCEPTED)
        served = {pid: 0 for pid in pids}
        for _ in range(60):
            status, pid = fresh_get(broker.port)
            self.assertEqual(status, 200)
            served[pid] += 1
        # Every connection went to a worker's own listener (no worker
        # takes hand-offs, so the broker's socket weighs 0).
        wait_for(lambda: broker.metric(KERNEL_ACCEPTED) >= before + 60, 10,
                 f"{KERNEL_ACCEPTED} to grow by 60 (was {before})")
        self.assertGreater(min(served.values()), 0, served)
        # Keep-alive clients: each worker's active figure (its
        # ListenerLoad) counts its own, and goes back to 0.
        clients = [KeepAlive(broker.port) for _ in range(12)]
        for client in clients:
            self.addCleanup(client.close)
            self.assertEqual(client.get()[0], 200)
        held = {pid: sum(1 for c in clients if c.pid == pid) for pid in pids}
        wait_for(lambda: broker.loads() == held, 10,
                 f"ListWorkers to show {held} ({broker.loads()})")
        # (The metrics are synced from the loop twice a second.)
        wait_for(lambda: broker.metric("fdbroker_connections_active") == 12,
                 10, "fdbroker_connections_active 12")
        for client in clients:
            client.close()
        wait_for(lambda: self.loads_are(broker, 0), 10, "0 active")
        self.assertEqual(broker.stop(), 0, broker.log())
        codes = worker_exit_codes(broker.log())
        self.assertEqual({codes.get(pid) for pid in pids}, {"exit code 0"},
                         broker.log())
        self.assertNotIn("Traceback", broker.log())

    def test_fastapi_uvloop(self) -> None:
        self.kernel_accepted("fastapi_app:app", EXAMPLES,
                             "--loop=uvloop")

    def test_flask_asyncio(self) -> None:
        self.kernel_accepted("flask_app:app", EXAMPLES,
                             "--loop=asyncio")

    def test_aiohttp_uvloop(self) -> None:
        self.kernel_accepted("aiohttp_app:app", EXAMPLES,
                             "--loop=uvloop")

    def test_drain_under_load_loses_no_request(self) -> None:
        """DrainWorker while connection-per-request load runs, the worker
        stopped (SIGSTOP) so that the kernel queues connections on its
        listener meanwhile: every request is answered, the worker exits 0,
        and the other worker serves everything after."""
        broker, pids = self.serve("fastapi_app:app", EXAMPLES)
        victim = min(pids)
        (other,) = pids - {victim}
        handed_before = broker.metric(HANDED_OFF)
        kernel_before = broker.metric(KERNEL_ACCEPTED)
        results: list[tuple] = []
        stop = threading.Event()
        with concurrent.futures.ThreadPoolExecutor(4 + 16) as pool:
            loaders = [pool.submit(fresh_load, broker.port, results, stop, 40)
                       for _ in range(4)]
            try:
                wait_for(lambda: len(results) >= 50, 20, "load")
                wait_for(lambda: broker.metric(KERNEL_ACCEPTED) >=
                         kernel_before + 40, 10, "kernel-accepted load")
                os.kill(victim, signal.SIGSTOP)
                # About half of these wait in the stopped worker's queue.
                queued = [pool.submit(fresh_get, broker.port, "/", 20)
                          for _ in range(16)]
                worker_id = next(w["id"] for w in broker.workers()
                                 if w["pid"] == victim)
                broker.rpc("DrainWorker", {"worker_id": worker_id})
                os.kill(victim, signal.SIGCONT)
                wait_for(lambda: victim not in broker.worker_pids(), 15,
                         f"the drained worker's exit\n{broker.log()}")
                after = await_more(results, 40, "load after the drain")
            finally:
                stop.set()
                if victim in broker.worker_pids():
                    os.kill(victim, signal.SIGCONT)
            for loader in loaders:
                loader.result(timeout=30)
            answers = [future.result(timeout=30) for future in queued]
        failed = [r for r in results + answers if r[0] != 200]
        self.assertEqual(failed, [], f"{len(failed)} of "
                         f"{len(results) + len(answers)} failed")
        self.assertEqual({pid for _, pid in results[after:]}, {other})
        self.assertEqual(worker_exit_codes(broker.log()).get(victim),
                         "exit code 0", broker.log())
        print(f"\n  drain under load: {len(results) + len(answers)} "
              f"requests, 0 failed; the broker handed "
              f"{broker.metric(HANDED_OFF) - handed_before:.0f} from the "
              "drained worker's queue")

    def test_broker_sigkill_under_load_is_adopted_with_the_listeners(
            self) -> None:
        """The broker SIGKILLed under connection-per-request load and
        started again on the same --socket and port: the workers keep
        accepting from their listeners meanwhile and return them with their
        re-registering Hello (§7.10), so the new broker holds every member
        of the group, moves the workers to fresh listeners and the weights
        apply again. No request fails; both workers are listed and accept
        by themselves after."""
        cmd = runner_cmd("fastapi_app:app", EXAMPLES,
                         "--timeout-keep-alive=60")
        first, pids = self.serve("fastapi_app:app", EXAMPLES)
        granted = listeners_held_by(first.port, pids)
        self.assertEqual(len(granted), 2)
        results: list[tuple] = []
        stop = threading.Event()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            loaders = [pool.submit(fresh_load, first.port, results, stop, 60)
                       for _ in range(2)]
            try:
                wait_for(lambda: len(results) >= 50, 20, "load")
                self.assertEqual(first.stop(signal.SIGKILL), -signal.SIGKILL)
                at_kill = len(results)
                second = RunnerBroker(
                    self, 2, cmd, KERNEL, f"--listen=127.0.0.1:{first.port}",
                    metrics=True, socket_path=first.socket_path)
                second.known_workers |= pids
                wait_for(lambda: set(second.loads()) == pids, 20,
                         f"both workers re-registered\n{second.log()}")
                wait_for(lambda: "2 worker(s) moved to fresh listeners; "
                         "weights apply again" in second.log(), 20,
                         f"the layout regained\n{second.log()}")
                await_more(results, 100, "load after the restart")
            finally:
                stop.set()
            for loader in loaders:
                loader.result(timeout=30)
        failed = [r for r in results if r[0] != 200]
        self.assertEqual(failed, [], f"{len(failed)} of {len(results)} "
                         "failed")
        self.assertEqual(child_pids(second.pid), set())  # adopted, none new
        # Returned, so held by the new broker: never left the group (what
        # the kernel queued there was not reset).
        self.assertEqual(second.log().count("adopted the listener it "
                                            "returned"), 2, second.log())
        self.assertLessEqual(granted,
                             listeners_held_by(first.port, {second.pid}))
        # Placed by the kernel on the workers' fresh listeners again: none
        # handed off, both serve, the broker counts what they accept.
        self.wait_kernel_placed(second)
        kernel_before = second.metric(KERNEL_ACCEPTED)
        served = {fresh_get(second.port)[1] for _ in range(40)}
        self.assertEqual(served, pids)
        wait_for(lambda: second.metric(KERNEL_ACCEPTED) >= kernel_before + 40,
                 10, f"{KERNEL_ACCEPTED} to grow by 40")
        print(f"\n  broker SIGKILL under load: {len(results)} requests "
              f"({len(results) - at_kill} after the kill), 0 failed; both "
              "listeners returned, layout regained")
        self.assertEqual(second.stop(), 0, second.log())
        self.assertNotIn("Traceback", second.log())

    def test_rebalance_moves_kernel_accepted_keep_alive_clients(
            self) -> None:
        broker, (first,) = self.serve("fastapi_app:app", EXAMPLES,
                                      workers=1)
        before = broker.metric(KERNEL_ACCEPTED)
        clients = [KeepAlive(broker.port) for _ in range(12)]
        for client in clients:
            self.addCleanup(client.close)
            self.assertEqual(client.get()[0], 200)
        wait_for(lambda: broker.metric(KERNEL_ACCEPTED) >= before + 12, 10,
                 "the 12 clients accepted by the worker itself")
        wait_for(lambda: broker.loads() == {first: 12}, 10,
                 "12 kernel-accepted connections on the worker")
        broker.rpc("ScaleWorkers", {"count": 2})
        wait_for(lambda: len(broker.loads()) == 2, 30, "2 ready workers")
        broker.rpc("Rebalance")
        wait_for(lambda: sorted(broker.loads().values()) == [6, 6], 10,
                 f"6 connections each ({broker.loads()})")
        for client in clients:
            self.assertEqual(client.get()[0], 200)  # same TCP connection
        self.assertEqual(sum(1 for c in clients if c.pid != first), 6)
        for client in clients:
            client.close()
        self.assertEqual(broker.stop(), 0, broker.log())
        self.assertNotIn("Traceback", broker.log())

    def test_mixed_pool_with_a_hand_off_worker(self) -> None:
        broker, (kernel,) = self.serve("fastapi_app:app", EXAMPLES,
                                       workers=1)
        external, _ = broker.start_external("fastapi_app:app", EXAMPLES,
                                            "--no-listener-grant")
        kernel_before = broker.metric(KERNEL_ACCEPTED)
        handed_before = broker.metric(HANDED_OFF)
        served = {kernel: 0, external.pid: 0}

        def both_served() -> bool:
            # The placement program gives the broker's socket its weight
            # within 100 ms of the registration: batches until it has.
            for _ in range(40):
                status, pid = fresh_get(broker.port)
                self.assertEqual(status, 200)
                served[pid] += 1
            return min(served.values()) > 0
        wait_for(both_served, 20, "both workers served")
        wait_for(lambda: broker.metric(KERNEL_ACCEPTED) > kernel_before, 10,
                 "kernel-accepted connections")
        self.assertGreater(broker.metric(HANDED_OFF), handed_before)
        self.assertEqual(broker.stop(), 0, broker.log())
        self.assertEqual(external.wait(timeout=30), 0)


class KernelStreamsTest(unittest.TestCase):
    def test_start_server_example_accepts_itself(self) -> None:
        """The example worker (start_server(), the streams API) under
        --placement=kernel: both workers answer, every connection after
        the placement settles is accepted by a worker itself."""
        broker = Broker(2, extra_flags=(KERNEL,), metrics=True)
        self.addCleanup(shutil.rmtree, broker.dir, ignore_errors=True)
        self.addCleanup(broker.cleanup)
        pids = broker.wait_for_workers(2)

        def handed_total() -> int:
            return sum(int(w.get("handedTotal", 0)) for w in
                       json.loads(broker.rpc("ListWorkers"))["workers"])

        def kernel_only() -> bool:
            before = handed_total()
            answered = {int(get(broker.port)[1]["X-Worker-Pid"])
                        for _ in range(20)}
            return answered == pids and handed_total() == before

        wait_for(kernel_only, 20, "both workers serving by themselves")
        wait_for(lambda: broker.metric(KERNEL_ACCEPTED) >= 20, 10,
                 f"{KERNEL_ACCEPTED} >= 20")
        self.assertEqual(broker.stop(), 0, broker.log())


if __name__ == "__main__":
    unittest.main()
