"""Channel: the framing rules of docs/protocol.md sections 2 to 4, over a
real SOCK_SEQPACKET socketpair with real fds."""

import os
import socket
import unittest

from fake_broker import open_fds
from fdbroker_worker._proto import pb
from fdbroker_worker.channel import (MAX_PACKET_BYTES, Channel, ChannelClosed,
                                     ProtocolError)


def heartbeat(sequence: int) -> bytes:
    return pb.HandoffMessage(sequence=sequence,
                             heartbeat=pb.Heartbeat()).SerializeToString()


class ChannelTest(unittest.TestCase):
    def setUp(self) -> None:
        ours, self.peer = socket.socketpair(socket.AF_UNIX,
                                            socket.SOCK_SEQPACKET)
        self.channel = Channel(ours)
        self.addCleanup(self.channel.close)
        self.addCleanup(self.peer.close)

    def test_sends_the_fd_with_its_message(self) -> None:
        reader, writer = os.pipe()
        self.addCleanup(os.close, reader)
        self.channel.send(pb.HandoffMessage(release=pb.Release()), writer)
        os.close(writer)
        _, fds, _, _ = socket.recv_fds(self.peer, 65536, 4)
        self.assertEqual(len(fds), 1)
        os.write(fds[0], b"x")  # the same pipe
        os.close(fds[0])
        self.assertEqual(os.read(reader, 1), b"x")

    def test_full_buffer_sends_nothing_and_keeps_the_number(self) -> None:
        sent = 0
        while self.channel.send(pb.HandoffMessage(heartbeat=pb.Heartbeat())):
            sent += 1
        self.assertGreater(sent, 0)
        for expected in range(1, sent + 1):
            message = pb.HandoffMessage.FromString(self.peer.recv(65536))
            self.assertEqual(message.sequence, expected)
        self.assertTrue(self.channel.send(pb.HandoffMessage(
            heartbeat=pb.Heartbeat())))
        self.assertEqual(
            pb.HandoffMessage.FromString(self.peer.recv(65536)).sequence,
            sent + 1)

    def test_receives_connection_with_its_fd_close_on_exec(self) -> None:
        client, server = socket.socketpair()
        self.addCleanup(client.close)
        data = pb.HandoffMessage(sequence=1, connection=pb.Connection(
            connection_id=3)).SerializeToString()
        socket.send_fds(self.peer, [data], [server.fileno()])
        server.close()
        message, fd = self.channel.receive()
        self.assertEqual(message.connection.connection_id, 3)
        self.assertFalse(os.get_inheritable(fd))
        os.write(fd, b"y")
        os.close(fd)
        self.assertEqual(client.recv(1), b"y")

    def test_batch_brings_one_fd_per_connection_in_order(self) -> None:
        pairs = [socket.socketpair() for _ in range(3)]
        batch = pb.ConnectionBatch(connections=[
            pb.Connection(connection_id=i) for i in (4, 5, 6)])
        socket.send_fds(self.peer, [pb.HandoffMessage(
            sequence=1, connection_batch=batch).SerializeToString()],
            [server.fileno() for _, server in pairs])
        message, fds = self.channel.receive()
        self.assertEqual(len(fds), 3)
        for (client, server), fd, byte in zip(pairs, fds, b"abc"):
            os.write(fd, bytes([byte]))
            self.assertEqual(client.recv(1), bytes([byte]))
            os.close(fd)
            client.close()
            server.close()

    def test_batch_of_one_is_an_error(self) -> None:
        batch = pb.ConnectionBatch(connections=[pb.Connection(
            connection_id=1)])
        self.assert_rejected(pb.HandoffMessage(
            sequence=1, connection_batch=batch).SerializeToString(), fds=1)

    def test_nothing_queued_is_none(self) -> None:
        self.assertIsNone(self.channel.receive())

    def test_eof_is_channel_closed(self) -> None:
        self.peer.close()
        with self.assertRaises(ChannelClosed):
            self.channel.receive()

    def assert_rejected(self, data: bytes, fds: int = 0) -> None:
        """`data` with `fds` attached is a ProtocolError; no fd leaks."""
        pairs = [socket.socketpair() for _ in range(fds)]
        before = open_fds()
        socket.send_fds(self.peer, [data], [a.fileno() for a, _ in pairs])
        with self.assertRaises(ProtocolError):
            self.channel.receive()
        self.assertEqual(open_fds(), before)
        for a, b in pairs:
            a.close()
            b.close()

    def test_garbage_is_an_error(self) -> None:
        self.assert_rejected(b"\xff\xff\xff", fds=1)

    def test_foreign_ancillary_data_is_an_error(self) -> None:
        # SO_PASSCRED makes the kernel attach SCM_CREDENTIALS to each packet.
        self.channel.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.assert_rejected(heartbeat(1), fds=1)

    def test_oversized_message_is_not_sent(self) -> None:
        with self.assertRaises(ProtocolError):
            self.channel.send(pb.HandoffMessage(release=pb.Release(
                unread_data=b"x" * MAX_PACKET_BYTES)))


if __name__ == "__main__":
    unittest.main()
