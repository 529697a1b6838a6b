#!/usr/bin/env python3
"""A deliberately broken fdbroker worker: the conformance kit must fail it.

    python3 broken_worker.py DEFECT     (DEFECT "none" breaks nothing)

Standard library plus the generated handoff_pb2, like the worker in
docs/protocol.md section 9; each DEFECT breaks one rule of that page:

  no-ack          never acks a Connection (§7.2)
  wrong-ack-id    acks id + 1000 instead of the id it got (§5 Ack)
  no-closed       never reports Closed (§7.3)
  double-closed   reports Closed twice (§7.3)
  ignore-drain    ignores Drain: no Goodbye, no exit (§7.7)
  bad-version     says Hello{version 2.0} (§5 ProtocolVersion)
  no-heartbeat    never sends Heartbeat (§7.6)
  no-sequence-check  accepts any sequence number (§4)
  touch-rejected  reads a Connection's socket before rejecting it (§5 Reject)
  stray-release   sends Release without supports_release (§5 Release)
  slow-closed     reports Closed 1 s after the close (§7.3)
  drain-no-grace  on Drain, closes a connection that sent nothing yet at
                  once (§7.7)
  drain-grace-all on Drain, gives served idle connections the first-request
                  grace too (§7.7)
  ignore-release-request  ignores a ReleaseRequest although its Hello did
                  not set supports_release (§5 ReleaseRequest: a protocol
                  error)
  ignore-unexpected  ignores any message in the wrong direction or state,
                  e.g. a second Welcome (§6)
  no-fd-check     takes any fd in a Connection for the client's socket, a
                  pipe too (§3)
  liveness-only-when-silent  reports liveness (Hello.reports_liveness) but,
                  with the watchdog on, heartbeats only when silent, not
                  every interval on a busy channel (§7.11)
  cut-as-closed   keeps busy connections through a Drain and closes them
                  just before its deadline, reported as an ordinary Closed
                  instead of cut_connection_ids (§7.3, minor 4)

It says minor 4 in its Hello (for the cut and liveness rules).
"""
import os, select, socket, stat, sys, threading, time
from fdbroker.v1 import handoff_pb2 as pb

DEFECT = sys.argv[1]
REPLY = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhello\n"
GRACE = 2.0
lock, live, fresh = threading.Lock(), {}, {}


class Channel:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.connect(path)
        self.sent = self.received = 0
        self.send_lock = threading.Lock()
        self.last_sent = self.last_received = time.monotonic()

    def send(self, fds=(), **body):
        with self.send_lock:
            self.sent += 1
            msg = pb.HandoffMessage(sequence=self.sent, **body)
            socket.send_fds(self.sock, [msg.SerializeToString()], list(fds))
            self.last_sent = time.monotonic()

    def receive(self):
        data, fds, flags, _ = socket.recv_fds(self.sock, 65537, 253,
                                              socket.MSG_CMSG_CLOEXEC)
        if not data and not fds:
            sys.exit("broker closed the channel")
        msg = pb.HandoffMessage.FromString(data)
        kind, self.received = msg.WhichOneof("body"), self.received + 1
        bad_sequence = (msg.sequence != self.received and
                        DEFECT != "no-sequence-check")
        not_a_socket = (fds and DEFECT != "no-fd-check" and
                        not stat.S_ISSOCK(os.fstat(fds[0]).st_mode))
        if (kind is None or bad_sequence or not_a_socket
                or len(fds) != (kind in ("connection", "release"))
                or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)):
            for fd in fds:
                os.close(fd)
            sys.exit(f"protocol error: {kind} #{msg.sequence}")
        self.last_received = time.monotonic()
        return msg, kind, (fds[0] if fds else None)


def serve(chan, cid, conn, data):
    try:
        while True:
            if data:
                with lock:
                    fresh.pop(cid, None)
            while b"\r\n\r\n" in data:
                _, data = data.split(b"\r\n\r\n", 1)
                conn.sendall(REPLY)
            more = conn.recv(65536)
            if not more:
                break
            data += more
    except OSError:
        pass
    finally:
        with lock:
            del live[cid]
            conn.close()
    if DEFECT == "slow-closed":
        time.sleep(1.0)  # as if waiting for an Ack to ride on
    if DEFECT != "no-closed":
        chan.send(closed=pb.Closed(connection_ids=[cid]))
    if DEFECT == "double-closed":
        chan.send(closed=pb.Closed(connection_ids=[cid]))


def main():
    chan = Channel(os.environ["FDBROKER_SOCKET"])
    major = 2 if DEFECT == "bad-version" else 1
    chan.send(hello=pb.Hello(version=pb.ProtocolVersion(major=major, minor=4),
                             pid=os.getpid(), reports_liveness=True))
    msg, kind, _ = chan.receive()
    if kind != "welcome":
        sys.exit(f"refused: {msg.refusal.message}")
    interval = msg.welcome.heartbeat_interval_ms / 1000
    timeout = msg.welcome.heartbeat_timeout_ms / 1000
    # With the watchdog on (§7.11), a Heartbeat every interval, busy or not.
    watched = (msg.welcome.worker_timeout_ms > 0 and
               DEFECT != "liveness-only-when-silent")
    last_heartbeat = time.monotonic()
    threads, draining, linger_until, deadline = [], False, 0.0, None
    # touch-rejected lingers after Drain, so that it reads (and rejects) a
    # Connection that follows the Drain.
    while not (draining and not any(t.is_alive() for t in threads)
               and time.monotonic() >= linger_until):
        due = min(chan.last_sent, last_heartbeat) if watched else (
            chan.last_sent)
        wait = max(0, due + interval - time.monotonic())
        if draining:
            wait = min(wait, 0.05)
        if select.select([chan.sock], [], [], wait)[0]:
            msg, kind, fd = chan.receive()
            if kind == "connection" and draining:
                if DEFECT == "touch-rejected":
                    os.read(fd, 65536)
                os.close(fd)
                chan.send(reject=pb.Reject(
                    connection_ids=[msg.connection.connection_id]))
            elif kind == "connection":
                cid = msg.connection.connection_id
                if DEFECT == "no-ack":
                    os.close(fd)
                    continue
                acked = cid + 1000 if DEFECT == "wrong-ack-id" else cid
                chan.send(ack=pb.Ack(connection_ids=[acked]))
                if DEFECT == "stray-release":
                    chan.send(fds=[fd], release=pb.Release(connection_id=cid))
                    os.close(fd)
                    continue
                conn = socket.socket(fileno=fd)
                conn.setblocking(True)
                with lock:
                    live[cid], fresh[cid] = conn, time.monotonic()
                threads.append(threading.Thread(target=serve, args=(
                    chan, cid, conn, msg.connection.initial_data),
                    daemon=True))  # sys.exit() does not wait for them
                threads[-1].start()
            elif kind == "drain":
                if DEFECT != "ignore-drain":
                    draining = True
                if msg.drain.deadline_unix_nanos:
                    deadline = msg.drain.deadline_unix_nanos / 1e9
                if DEFECT == "touch-rejected":
                    linger_until = time.monotonic() + 0.5
            elif kind == "heartbeat" or DEFECT == "ignore-unexpected" or (
                    kind == "release_request" and
                    DEFECT == "ignore-release-request"):
                pass  # (its Hello did not set supports_release)
            else:  # wrong direction or state (§7.5)
                sys.exit(f"protocol error: unexpected {kind}")
        now = time.monotonic()
        if draining:
            # drain-no-grace closes a connection that sent nothing yet at
            # once; drain-grace-all gives the grace to served ones too.
            grace = 0 if DEFECT == "drain-no-grace" else GRACE
            cut = (DEFECT == "cut-as-closed" and deadline is not None and
                   time.time() >= deadline - 0.1)
            with lock:
                for cid, conn in live.items():
                    if DEFECT == "cut-as-closed":
                        if cut:  # reported by serve() as an ordinary Closed
                            conn.shutdown(socket.SHUT_RDWR)
                        continue
                    since = fresh.get(cid, 0)
                    if DEFECT == "drain-grace-all":
                        since = fresh.setdefault(cid, now)
                    if since + grace <= now:
                        try:
                            conn.shutdown(socket.SHUT_RD)
                        except OSError:
                            pass
        due = min(chan.last_sent, last_heartbeat) if watched else (
            chan.last_sent)
        if now - due >= interval and DEFECT != "no-heartbeat":
            # The loop is the application's thread: alive (app_silent_ms 0).
            chan.send(heartbeat=pb.Heartbeat(sent_unix_nanos=time.time_ns()))
            last_heartbeat = now
        if now - chan.last_received > timeout:
            sys.exit("broker silent for too long: declared dead")
    chan.send(goodbye=pb.Goodbye(reason="drained"))


if __name__ == "__main__":
    main()
