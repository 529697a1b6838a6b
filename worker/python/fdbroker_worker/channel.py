"""The broker channel: framing of docs/protocol.md sections 2 to 4.

One serialized HandoffMessage per SOCK_SEQPACKET packet, at most 65536
bytes; fds as SCM_RIGHTS on the packet of their message (exactly one on
Connection and Release, none elsewhere); each side numbers its own messages
from 1. Any violation is a ProtocolError, after which the channel is useless:
the caller closes it (it never resynchronises).
"""

import array
import os
import socket
import struct
from typing import Optional

from ._proto import DecodeError, pb

MAX_PACKET_BYTES = 65536
# Room for the kernel's SCM_MAX_FD (253) fds: shows every fd that was sent.
_CONTROL_BYTES = socket.CMSG_SPACE(253 * array.array("i").itemsize)
# Bodies that carry exactly one fd; every other body carries none.
_FD_BODIES = frozenset({"connection", "release", "listener_grant"})


class ProtocolError(Exception):
    """The peer broke the protocol; the channel must be closed."""


class FdsTruncated(ProtocolError):
    """A Connection or ConnectionBatch whose fds the kernel could not give
    this process (MSG_CTRUNC: out of file descriptors, §4.3). The message is
    valid and counted; `message` holds it, whatever fds did arrive are
    closed. The worker Rejects what it offered and keeps the channel; a
    caller that does not expect it sees a ProtocolError."""

    def __init__(self, message: "pb.HandoffMessage") -> None:
        super().__init__(
            f"{message.WhichOneof('body')} #{message.sequence}: out of file "
            "descriptors, the kernel truncated its fds (MSG_CTRUNC)")
        self.message = message


class ChannelClosed(Exception):
    """The peer closed the channel (a read of 0 bytes and no fds)."""


class UntrustedBroker(PermissionError):
    """The process serving the hand-off socket runs under a uid that is
    neither this worker's nor root's (§1): retrying cannot help."""


def check_broker_uid(sock: socket.socket, path: str) -> None:
    """UntrustedBroker unless SO_PEERCRED names our effective uid or root.
    A broker of another uid could be anyone's: a socket planted at the path
    (say under /tmp) would otherwise get the clients, and every released
    socket with its unread bytes."""
    # struct ucred: pid_t pid; uid_t uid; gid_t gid.
    pid, uid, _ = struct.unpack(
        "iII", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                               struct.calcsize("iII")))
    own = os.geteuid()
    if uid not in (own, 0):
        raise UntrustedBroker(
            f"the hand-off socket at {path} is served by uid {uid} (pid "
            f"{pid}), not by this worker's uid {own} or root: refusing to "
            "register")


def check_client_socket(sock: socket.socket) -> None:
    """ProtocolError unless `sock` is what a Connection carries (§3): a
    stream socket that is not listening. Not whether it is still connected:
    a client may have gone already, which is no fault of the broker."""
    try:
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as error:  # ENOTSOCK: a pipe, a file, ...
        raise ProtocolError(f"not a socket ({error.strerror})") from None
    if kind != socket.SOCK_STREAM:
        raise ProtocolError(f"a socket of type {kind}, not SOCK_STREAM")
    if listening:
        raise ProtocolError("a listening socket")


class Channel:
    """A connected, non-blocking hand-off channel; owns its socket."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._sent = 0
        self._received = 0

    @classmethod
    def connect(cls, path: str) -> "Channel":
        """Connects to the broker at `path`; OSError if nobody listens,
        UntrustedBroker if another user's process does."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.setblocking(False)
            sock.connect(path)
            check_broker_uid(sock, path)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def send(self, message: "pb.HandoffMessage",
             fd: Optional[int] = None) -> bool:
        """Numbers and sends `message` (with `fd` attached, if given).

        False if the socket buffer is full (EAGAIN): nothing was sent and the
        number is not used, so the same message may be sent again later.
        OSError (EPIPE, ...) if the channel is broken.
        """
        message.sequence = self._sent + 1
        data = message.SerializeToString()
        if len(data) > MAX_PACKET_BYTES:
            raise ProtocolError(
                f"{message.WhichOneof('body')} of {len(data)} bytes exceeds "
                f"{MAX_PACKET_BYTES}")
        try:
            if fd is None:
                self.sock.send(data, socket.MSG_NOSIGNAL)
            else:
                socket.send_fds(self.sock, [data], [fd], socket.MSG_NOSIGNAL)
        except BlockingIOError:
            return False
        self._sent += 1
        return True

    def receive(self) -> Optional[tuple["pb.HandoffMessage", Optional[int]]]:
        """The next message and its fd (owned by the caller), or None if
        nothing is queued. ChannelClosed on EOF, ProtocolError on a bad
        packet (its fds already closed), OSError on a socket error. A
        ConnectionBatch comes with a list of fds, one per connection, in
        order."""
        # Not socket.recv_fds(): in 3.11 it drops its flags argument (no
        # MSG_CMSG_CLOEXEC) and ignores foreign ancillary data.
        try:
            data, ancillary, flags, _ = self.sock.recvmsg(
                MAX_PACKET_BYTES + 1, _CONTROL_BYTES, socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            return None
        fds = array.array("i")
        foreign = 0
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) -
                                      len(payload) % fds.itemsize])
            else:
                foreign += 1
        try:
            if foreign:
                raise ProtocolError(
                    f"{foreign} ancillary messages other than SCM_RIGHTS")
            if not data and not fds:
                raise ChannelClosed("the broker closed the channel")
            return self._validate(data, list(fds), flags)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise

    def _validate(self, data: bytes, fds: list[int],
                  flags: int) -> tuple["pb.HandoffMessage", Optional[int]]:
        if flags & socket.MSG_TRUNC or len(data) > MAX_PACKET_BYTES:
            raise ProtocolError(f"packet over {MAX_PACKET_BYTES} bytes")
        truncated = bool(flags & socket.MSG_CTRUNC)
        message = pb.HandoffMessage()
        try:
            message.ParseFromString(data)
        except DecodeError as error:
            raise ProtocolError(f"unparseable packet: {error}") from None
        body = message.WhichOneof("body")
        if body is None:
            raise ProtocolError(
                f"message #{message.sequence} has no (known) body")
        if message.sequence != self._received + 1:
            raise ProtocolError(
                f"{body} has sequence {message.sequence}, expected "
                f"{self._received + 1}")
        if body == "connection_batch":
            want_fds = len(message.connection_batch.connections)
            if want_fds < 2:
                raise ProtocolError(
                    f"connection_batch #{message.sequence} of {want_fds} "
                    "connections (at least 2)")
        else:
            want_fds = 1 if body in _FD_BODIES else 0
        if truncated:
            if body not in ("connection", "connection_batch") or \
                    len(fds) >= want_fds:
                raise ProtocolError("truncated control data (MSG_CTRUNC)")
            self._received += 1
            raise FdsTruncated(message)
        if len(fds) != want_fds:
            raise ProtocolError(
                f"{body} #{message.sequence} carries {len(fds)} fds, "
                f"expected {want_fds}")
        self._received += 1
        if body == "connection_batch":
            return message, fds
        return message, (fds[0] if fds else None)

