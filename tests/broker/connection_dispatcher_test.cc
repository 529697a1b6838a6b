#include "broker/connection_dispatcher.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <memory>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"
#include "wire/message_channel.h"

namespace fdbroker {
namespace {

// Real syscalls, except that sendmsg on chosen fds fails with a chosen errno:
// the seam that lets a test make one worker's channel look full or broken.
class FailingSysCalls : public wire::SysCalls {
 public:
  ssize_t SendMsg(int fd, const msghdr* msg, int flags) override {
    auto it = send_errno_.find(fd);
    if (it != send_errno_.end()) {
      errno = it->second;
      return -1;
    }
    return ::sendmsg(fd, msg, flags);
  }
  ssize_t RecvMsg(int fd, msghdr* msg, int flags) override {
    return ::recvmsg(fd, msg, flags);
  }
  int Accept4(int fd, sockaddr* addr, socklen_t* len, int flags) override {
    return ::accept4(fd, addr, len, flags);
  }
  std::map<int, int> send_errno_;
};

class NullDelegate : public HandoffChannel::Delegate {
 public:
  void OnMessage(HandoffChannel&, v1::HandoffMessage&,
                 wire::UniqueFd) override {}
  void OnChannelClosed(HandoffChannel&, const absl::Status&) override {
    ++closed;
  }
  void OnWritable(HandoffChannel&) override {}
  int closed = 0;
};

// The worker's end of a channel, driven by the test.
struct FakeWorker {
  Worker* worker;
  std::unique_ptr<wire::MessageChannel> end;
  int broker_fd;  // The broker's end, owned by the HandoffChannel.

  // The next ConnectionBatch the broker sent, with its fds.
  bool ReceiveBatch(v1::ConnectionBatch& batch,
                    std::vector<wire::UniqueFd>& fds) {
    v1::HandoffMessage message;
    absl::StatusOr<wire::ReceiveResult> r = end->Receive(message, fds);
    if (!r.ok() || *r != wire::ReceiveResult::kReceived) return false;
    if (message.body_case() != v1::HandoffMessage::kConnectionBatch) {
      return false;
    }
    batch = message.connection_batch();
    return true;
  }
  // Nothing more was sent.
  bool Quiet() {
    v1::HandoffMessage message;
    std::vector<wire::UniqueFd> fds;
    absl::StatusOr<wire::ReceiveResult> r = end->Receive(message, fds);
    return r.ok() && *r == wire::ReceiveResult::kWouldBlock;
  }

  // The next Connection the broker sent, with its fd.
  bool ReceiveConnection(v1::Connection& connection, wire::UniqueFd& fd) {
    v1::HandoffMessage message;
    absl::StatusOr<wire::ReceiveResult> r = end->Receive(message, fd);
    if (!r.ok() || *r != wire::ReceiveResult::kReceived) return false;
    if (message.body_case() != v1::HandoffMessage::kConnection) return false;
    connection = message.connection();
    return true;
  }
};

class DispatcherTest : public ::testing::Test {
 protected:
  void SetUp() override {
    loop_ = *EventLoop::Create();
    dispatcher_ = std::make_unique<ConnectionDispatcher>(*loop_, registry_,
                                                         policy_, options_);
  }

  // Runs what the loop does at the end of a turn (batches are sent there).
  void EndTurn() {
    loop_->RunSoon([this] { loop_->Stop(); });
    loop_->Run();
  }

  FakeWorker AddWorker(uint32_t capacity = 0) {
    int sv[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv), 0);
    Worker& worker = registry_.Add(1000 + registry_.size(), false,
                                   WorkerState::kReady, absl::Now(), 0);
    worker.capacity = capacity;
    ucred cred{};
    worker.channel = *HandoffChannel::Create(*loop_, wire::UniqueFd(sv[0]),
                                             cred, sys_, delegate_);
    worker.channel->worker_id = worker.id;
    return FakeWorker{
        &worker, std::make_unique<wire::MessageChannel>(wire::UniqueFd(sv[1])),
        sv[0]};
  }

  // A connected TCP-like pair: the broker gets one end as the "client
  // socket"; the test keeps the other to observe when every copy is closed.
  AcceptedConnection NewClient(wire::UniqueFd& client_end) {
    int sv[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    client_end.Reset(sv[1]);
    AcceptedConnection conn;
    conn.fd.Reset(sv[0]);
    conn.peer = *wire::SocketAddress::Parse("127.0.0.1:5555");
    conn.local = *wire::SocketAddress::Parse("127.0.0.1:8080");
    conn.accept_mono_nanos = loop_->clock().MonotonicNanos();
    return conn;
  }

  static v1::Ack AckOf(uint64_t id) {
    v1::Ack ack;
    ack.add_connection_ids(id);
    return ack;
  }

  // True once every copy of the server side is closed (client sees EOF).
  static bool PeerClosed(const wire::UniqueFd& client_end) {
    char c;
    return ::recv(client_end.get(), &c, 1, MSG_DONTWAIT) == 0;
  }

  FailingSysCalls sys_;
  NullDelegate delegate_;
  std::unique_ptr<EventLoop> loop_;
  WorkerRegistry registry_;
  LeastConnectionsPolicy policy_;
  ConnectionDispatcher::Options options_;
  std::unique_ptr<ConnectionDispatcher> dispatcher_;
};

TEST_F(DispatcherTest, BrokerKeepsTheFdUntilAckThenClosesIt) {
  FakeWorker w = AddWorker();
  wire::UniqueFd client;
  dispatcher_->Dispatch(NewClient(client));
  v1::Connection connection;
  wire::UniqueFd received;
  ASSERT_TRUE(w.ReceiveConnection(connection, received));
  EXPECT_EQ(connection.peer_address(), "127.0.0.1:5555");
  EXPECT_EQ(connection.local_address(), "127.0.0.1:8080");
  EXPECT_EQ(dispatcher_->in_flight(), 1u);
  EXPECT_EQ(w.worker->load(), 1);

  // The worker's copy is the same socket: bytes written by the client
  // arrive through it.
  ASSERT_EQ(::write(client.get(), "hi", 2), 2);
  char buf[2];
  ASSERT_EQ(::read(received.get(), buf, 2), 2);

  // Worker closes its copy before acking: the broker's copy keeps it open.
  received.Reset();
  EXPECT_FALSE(PeerClosed(client));
  ASSERT_TRUE(
      dispatcher_->OnAck(*w.worker, AckOf(connection.connection_id())).ok());
  EXPECT_EQ(dispatcher_->in_flight(), 0u);
  EXPECT_TRUE(PeerClosed(client)) << "broker closed its copy on Ack";
  EXPECT_EQ(w.worker->active(), 1);
  EXPECT_EQ(dispatcher_->stats().handed_off, 1u);

  v1::Closed closed;
  closed.add_connection_ids(connection.connection_id());
  ASSERT_TRUE(dispatcher_->OnClosed(*w.worker, closed).ok());
  EXPECT_EQ(w.worker->load(), 0);
}

TEST_F(DispatcherTest, UnackedConnectionsOfALostWorkerGoToAnother) {
  FakeWorker a = AddWorker();
  FakeWorker b = AddWorker();
  wire::UniqueFd c1, c2;
  dispatcher_->Dispatch(NewClient(c1));
  dispatcher_->Dispatch(NewClient(c2));
  // least_conn spreads them: one each.
  v1::Connection ca, cb;
  wire::UniqueFd fa, fb;
  ASSERT_TRUE(a.ReceiveConnection(ca, fa));
  ASSERT_TRUE(b.ReceiveConnection(cb, fb));

  // Worker a dies before acking: its copy is gone, its channel closes.
  fa.Reset();
  a.end.reset();
  a.worker->channel->Close(absl::UnavailableError("peer closed"));
  dispatcher_->ReclaimUnacked(*a.worker);
  EXPECT_EQ(a.worker->load(), 0);
  EXPECT_EQ(dispatcher_->stats().worker_lost, 1u);

  v1::Connection again;
  wire::UniqueFd f_again;
  ASSERT_TRUE(b.ReceiveConnection(again, f_again));
  EXPECT_EQ(again.connection_id(), ca.connection_id());
  ASSERT_EQ(::write(c1.get(), "x", 1), 1);
  char ch;
  EXPECT_EQ(::read(f_again.get(), &ch, 1), 1) << "same client socket";
  EXPECT_FALSE(PeerClosed(c1));
}

TEST_F(DispatcherTest, FullWorkerChannelIsBypassedNotWaitedOn) {
  FakeWorker a = AddWorker();
  FakeWorker b = AddWorker();
  // Worker a stopped reading: its socket buffer is full.
  sys_.send_errno_[a.broker_fd] = EAGAIN;
  wire::UniqueFd c1, c2;
  dispatcher_->Dispatch(NewClient(c1));
  dispatcher_->Dispatch(NewClient(c2));
  EXPECT_EQ(b.worker->load(), 2);
  EXPECT_EQ(a.worker->load(), 0);
  EXPECT_TRUE(a.worker->channel->congested());
  EXPECT_FALSE(a.worker->Available());
  EXPECT_GE(dispatcher_->stats().send_would_block, 1u);
  v1::Connection connection;
  wire::UniqueFd fd;
  EXPECT_TRUE(b.ReceiveConnection(connection, fd));
  EXPECT_TRUE(b.ReceiveConnection(connection, fd));
}

TEST_F(DispatcherTest, BrokenWorkerChannelIsClosedAndTheConnectionPlaced) {
  FakeWorker a = AddWorker();
  FakeWorker b = AddWorker();
  sys_.send_errno_[a.broker_fd] = EPIPE;
  sys_.send_errno_[b.broker_fd] = EPIPE;
  wire::UniqueFd client;
  dispatcher_->Dispatch(NewClient(client));
  // Both failed: closed, and the connection waits for a worker.
  EXPECT_TRUE(a.worker->channel->closed());
  EXPECT_TRUE(b.worker->channel->closed());
  EXPECT_EQ(dispatcher_->pending(), 1u);
  EXPECT_EQ(dispatcher_->stats().send_errors, 2u);
  FakeWorker c = AddWorker();
  dispatcher_->PlacePending();
  v1::Connection connection;
  wire::UniqueFd fd;
  EXPECT_TRUE(c.ReceiveConnection(connection, fd));
  EXPECT_EQ(dispatcher_->pending(), 0u);
}

TEST_F(DispatcherTest, RejectedConnectionGoesToAnotherWorker) {
  FakeWorker a = AddWorker();
  FakeWorker b = AddWorker();
  wire::UniqueFd client;
  dispatcher_->Dispatch(NewClient(client));
  v1::Connection first;
  wire::UniqueFd fd;
  FakeWorker* got = a.ReceiveConnection(first, fd) ? &a : nullptr;
  FakeWorker* other = &b;
  if (got == nullptr) {
    ASSERT_TRUE(b.ReceiveConnection(first, fd));
    got = &b;
    other = &a;
  }
  fd.Reset();
  v1::Reject reject;
  reject.add_connection_ids(first.connection_id());
  ASSERT_TRUE(dispatcher_->OnReject(*got->worker, reject).ok());
  v1::Connection second;
  ASSERT_TRUE(other->ReceiveConnection(second, fd));
  EXPECT_EQ(second.connection_id(), first.connection_id());
  EXPECT_EQ(got->worker->load(), 0);
  EXPECT_EQ(other->worker->load(), 1);
}

TEST_F(DispatcherTest, AckOrClosedForAConnectionNotSentThereIsAnError) {
  FakeWorker a = AddWorker();
  FakeWorker b = AddWorker();
  wire::UniqueFd client;
  dispatcher_->Dispatch(NewClient(client));
  v1::Connection connection;
  wire::UniqueFd fd;
  FakeWorker* got = a.ReceiveConnection(connection, fd) ? &a : &b;
  FakeWorker* other = got == &a ? &b : &a;
  EXPECT_FALSE(
      dispatcher_->OnAck(*other->worker, AckOf(connection.connection_id()))
          .ok());
  EXPECT_FALSE(dispatcher_->OnAck(*got->worker, AckOf(424242)).ok());
  v1::Closed closed;
  closed.add_connection_ids(connection.connection_id());
  EXPECT_FALSE(dispatcher_->OnClosed(*got->worker, closed).ok())
      << "not acked yet, so not owned";
}

TEST_F(DispatcherTest, CapacityQueuesAndTheQueueIsBounded) {
  options_.max_pending = 2;
  dispatcher_ = std::make_unique<ConnectionDispatcher>(*loop_, registry_,
                                                       policy_, options_);
  FakeWorker a = AddWorker(/*capacity=*/1);
  wire::UniqueFd c[4];
  for (auto& client : c) dispatcher_->Dispatch(NewClient(client));
  // One sent, two queued, one closed as overload.
  EXPECT_EQ(dispatcher_->in_flight(), 1u);
  EXPECT_EQ(dispatcher_->pending(), 2u);
  EXPECT_EQ(dispatcher_->stats().rejected_overload, 1u);
  EXPECT_TRUE(PeerClosed(c[3]));

  v1::Connection connection;
  wire::UniqueFd fd;
  ASSERT_TRUE(a.ReceiveConnection(connection, fd));
  ASSERT_TRUE(
      dispatcher_->OnAck(*a.worker, AckOf(connection.connection_id())).ok());
  EXPECT_EQ(dispatcher_->pending(), 2u) << "still at capacity";
  v1::Closed closed;
  closed.add_connection_ids(connection.connection_id());
  ASSERT_TRUE(dispatcher_->OnClosed(*a.worker, closed).ok());
  EXPECT_EQ(dispatcher_->pending(), 1u) << "room again: next one placed";
  ASSERT_TRUE(a.ReceiveConnection(connection, fd));
}

TEST_F(DispatcherTest, ABurstGoesToABatchingWorkerInOnePacket) {
  FakeWorker w = AddWorker();
  w.worker->max_connections_per_message = 8;
  wire::UniqueFd clients[5];
  for (auto& client : clients) dispatcher_->Dispatch(NewClient(client));
  // Staged: counted in the load and held, but not sent before the turn ends.
  EXPECT_EQ(w.worker->load(), 5);
  EXPECT_EQ(dispatcher_->in_flight(), 5u);
  EXPECT_TRUE(w.Quiet());
  // An Ack cannot name a connection the worker was never sent.
  v1::Ack early;
  early.add_connection_ids(424242);
  EXPECT_FALSE(dispatcher_->OnAck(*w.worker, early).ok());

  EndTurn();
  v1::ConnectionBatch batch;
  std::vector<wire::UniqueFd> fds;
  ASSERT_TRUE(w.ReceiveBatch(batch, fds));
  ASSERT_EQ(batch.connections_size(), 5);
  ASSERT_EQ(fds.size(), 5u);
  EXPECT_TRUE(w.Quiet());
  EXPECT_EQ(dispatcher_->stats().batches_sent, 1u);
  // Each fd is the socket its Connection names, in order.
  v1::Ack ack;
  for (int i = 0; i < 5; ++i) {
    ASSERT_EQ(::write(clients[i].get(), &i, 1), 1);
    char got;
    ASSERT_EQ(::read(fds[i].get(), &got, 1), 1);
    EXPECT_EQ(got, static_cast<char>(i));
    EXPECT_EQ(batch.connections(i).peer_address(), "127.0.0.1:5555");
    ack.add_connection_ids(batch.connections(i).connection_id());
  }
  ASSERT_TRUE(dispatcher_->OnAck(*w.worker, ack).ok());
  EXPECT_EQ(dispatcher_->in_flight(), 0u);
  EXPECT_EQ(w.worker->active(), 5);
}

TEST_F(DispatcherTest, AFullBatchIsSentAtOnceAndASingleOneAsConnection) {
  FakeWorker w = AddWorker();
  w.worker->max_connections_per_message = 2;
  wire::UniqueFd clients[3];
  for (auto& client : clients) dispatcher_->Dispatch(NewClient(client));
  v1::ConnectionBatch batch;
  std::vector<wire::UniqueFd> fds;
  ASSERT_TRUE(w.ReceiveBatch(batch, fds)) << "sent when the batch filled";
  EXPECT_EQ(batch.connections_size(), 2);
  EXPECT_TRUE(w.Quiet());
  EndTurn();
  v1::Connection connection;
  wire::UniqueFd fd;
  ASSERT_TRUE(w.ReceiveConnection(connection, fd)) << "the lone third";
  EXPECT_EQ(w.worker->load(), 3);
}

TEST_F(DispatcherTest, ABatchThatCannotBeSentIsPlacedElsewhere) {
  FakeWorker a = AddWorker();
  FakeWorker b = AddWorker();
  a.worker->max_connections_per_message = 8;
  b.worker->max_connections_per_message = 8;
  sys_.send_errno_[a.broker_fd] = EAGAIN;  // a stopped reading.
  wire::UniqueFd clients[4];
  for (auto& client : clients) dispatcher_->Dispatch(NewClient(client));
  EXPECT_EQ(a.worker->load(), 2);  // least_conn staged two on each.
  EndTurn();
  EXPECT_EQ(a.worker->load(), 0);
  EXPECT_TRUE(a.worker->channel->congested());
  EXPECT_EQ(b.worker->load(), 4);
  EXPECT_EQ(dispatcher_->in_flight(), 4u);
  EXPECT_EQ(dispatcher_->pending(), 0u);
  // b got its own two first, then a's two in a second batch.
  v1::ConnectionBatch batch;
  std::vector<wire::UniqueFd> fds;
  size_t received = 0;
  while (b.ReceiveBatch(batch, fds)) received += fds.size();
  EXPECT_EQ(received, 4u);
  for (auto& client : clients) EXPECT_FALSE(PeerClosed(client));
}

TEST_F(DispatcherTest, StagedConnectionsOfALostWorkerAreNotSentToIt) {
  FakeWorker a = AddWorker();
  FakeWorker b = AddWorker();
  a.worker->max_connections_per_message = 8;
  wire::UniqueFd clients[2];
  for (auto& client : clients) dispatcher_->Dispatch(NewClient(client));
  ASSERT_EQ(a.worker->load(), 1);
  // a's channel dies before the turn ends: its staged connection is
  // re-queued and placed on b, and never sent to a.
  a.worker->channel->Close(absl::UnavailableError("peer closed"));
  dispatcher_->ReclaimUnacked(*a.worker);
  EndTurn();
  EXPECT_EQ(b.worker->load(), 2);
  v1::Connection connection;
  wire::UniqueFd fd;
  EXPECT_TRUE(b.ReceiveConnection(connection, fd));
  EXPECT_TRUE(b.ReceiveConnection(connection, fd));
  for (auto& client : clients) EXPECT_FALSE(PeerClosed(client));
}

// Hands one client to `w` and acks it: `w` owns it. Returns the id; `fd` is
// the worker's copy (what a Release would send back).
uint64_t OwnConnection(ConnectionDispatcher& dispatcher, FakeWorker& w,
                       wire::UniqueFd& fd) {
  v1::Connection connection;
  if (!w.ReceiveConnection(connection, fd)) return 0;
  v1::Ack ack;
  ack.add_connection_ids(connection.connection_id());
  if (!dispatcher.OnAck(*w.worker, ack).ok()) return 0;
  return connection.connection_id();
}

v1::Release ReleaseOf(uint64_t id, const std::string& unread,
                      v1::ReleaseReason reason) {
  v1::Release release;
  release.set_connection_id(id);
  release.set_unread_data(unread);
  release.set_reason(reason);
  return release;
}

// Two workers that own one connection each (a_ owns ida_, b_ owns idb_);
// fa_ and fb_ are their copies, which a Release hands back.
class ReleaseTest : public DispatcherTest {
 protected:
  void OwnOneEach(uint32_t b_capacity = 0) {
    a_ = AddWorker();
    b_ = AddWorker(b_capacity);
    dispatcher_->Dispatch(NewClient(c1_));
    dispatcher_->Dispatch(NewClient(c2_));
    ida_ = OwnConnection(*dispatcher_, a_, fa_);
    idb_ = OwnConnection(*dispatcher_, b_, fb_);
    ASSERT_NE(ida_, 0u);
    ASSERT_NE(idb_, 0u);
  }

  FakeWorker a_, b_;
  wire::UniqueFd c1_, c2_, fa_, fb_;
  uint64_t ida_ = 0, idb_ = 0;
};

TEST_F(DispatcherTest, ReleasedConnectionMovesWithItsUnreadBytes) {
  FakeWorker a = AddWorker();
  FakeWorker b = AddWorker();
  wire::UniqueFd client;
  dispatcher_->Dispatch(NewClient(client));
  FakeWorker* from = a.worker->load() == 1 ? &a : &b;
  FakeWorker* to = from == &a ? &b : &a;
  wire::UniqueFd fd;
  const uint64_t id = OwnConnection(*dispatcher_, *from, fd);
  ASSERT_NE(id, 0u);
  std::vector<std::tuple<uint64_t, uint64_t, v1::ReleaseReason>> migrations;
  dispatcher_->set_migration_observer(
      [&](uint64_t f, uint64_t t, v1::ReleaseReason r) {
        migrations.emplace_back(f, t, r);
      });

  // The worker gives the socket back with a pipelined request it read.
  ASSERT_TRUE(dispatcher_
                  ->OnRelease(*from->worker,
                              ReleaseOf(id, "GET /next HTTP/1.1\r\n\r\n",
                                        v1::RELEASE_REASON_REBALANCE),
                              std::move(fd))
                  .ok());
  EXPECT_EQ(from->worker->active(), 0);
  EXPECT_FALSE(PeerClosed(client)) << "the broker holds it now";
  v1::Connection moved;
  wire::UniqueFd moved_fd;
  ASSERT_TRUE(to->ReceiveConnection(moved, moved_fd));
  EXPECT_EQ(moved.connection_id(), id);
  EXPECT_EQ(moved.initial_data(), "GET /next HTTP/1.1\r\n\r\n");
  ASSERT_EQ(::write(client.get(), "z", 1), 1);
  char ch;
  EXPECT_EQ(::read(moved_fd.get(), &ch, 1), 1) << "same client socket";
  EXPECT_TRUE(migrations.empty()) << "complete only on the Ack";

  ASSERT_TRUE(dispatcher_->OnAck(*to->worker, AckOf(id)).ok());
  EXPECT_EQ(to->worker->active(), 1);
  EXPECT_EQ(dispatcher_->stats().migrated_rebalance, 1u);
  EXPECT_EQ(dispatcher_->stats().migrated_drain, 0u);
  EXPECT_EQ(dispatcher_->stats().handed_off, 1u) << "not a second hand-off";
  ASSERT_EQ(migrations.size(), 1u);
  EXPECT_EQ(std::get<0>(migrations[0]), from->worker->id);
  EXPECT_EQ(std::get<1>(migrations[0]), to->worker->id);
  EXPECT_EQ(std::get<2>(migrations[0]), v1::RELEASE_REASON_REBALANCE);
  moved_fd.Reset();
  EXPECT_TRUE(PeerClosed(client)) << "exactly one owner left, now closed";
}

// A worker whose Hello label "listeners" names some listeners gets only
// their connections (one broker, two pools); a connection no worker serves
// waits in the queue.
TEST_F(DispatcherTest, AWorkerGetsOnlyTheListenersItServes) {
  FakeWorker a = AddWorker();
  FakeWorker b = AddWorker();
  a.worker->labels[kListenersLabel] = "127.0.0.1:8080";
  b.worker->labels[kListenersLabel] = "unix:/run/b.sock, [::1]:8080";
  const std::string l_a = "127.0.0.1:8080", l_b = "[::1]:8080",
                    l_none = "127.0.0.1:9090";
  std::vector<wire::UniqueFd> clients(5);
  for (int i = 0; i < 4; ++i) {
    AcceptedConnection c = NewClient(clients[i]);
    c.listener = i % 2 == 0 ? &l_a : &l_b;
    dispatcher_->Dispatch(std::move(c));
  }
  EXPECT_EQ(a.worker->load(), 2);
  EXPECT_EQ(b.worker->load(), 2);
  v1::Connection connection;
  wire::UniqueFd fd;
  ASSERT_TRUE(a.ReceiveConnection(connection, fd));
  EXPECT_EQ(connection.listener(), l_a);
  ASSERT_TRUE(b.ReceiveConnection(connection, fd));
  EXPECT_EQ(connection.listener(), l_b);
  AcceptedConnection unserved = NewClient(clients[4]);
  unserved.listener = &l_none;
  dispatcher_->Dispatch(std::move(unserved));
  EXPECT_EQ(dispatcher_->pending(), 1u);
  // A worker without the label serves every listener.
  FakeWorker c = AddWorker();
  dispatcher_->PlacePending();
  EXPECT_EQ(dispatcher_->pending(), 0u);
  ASSERT_TRUE(c.ReceiveConnection(connection, fd));
  EXPECT_EQ(connection.listener(), l_none);
}

// Behind a PROXY-protocol listener the socket names the balancer; the
// addresses the header gave move with a released connection (the socket
// cannot tell them again), and are forgotten once it is Closed.
TEST_F(DispatcherTest, AReleasedProxiedConnectionKeepsTheHeadersAddresses) {
  FakeWorker a = AddWorker();
  FakeWorker b = AddWorker();
  wire::UniqueFd client;
  AcceptedConnection accepted = NewClient(client);
  accepted.peer = *wire::SocketAddress::Parse("192.0.2.9:4444");
  accepted.local = *wire::SocketAddress::Parse("198.51.100.1:443");
  accepted.proxied = true;
  dispatcher_->Dispatch(std::move(accepted));
  FakeWorker* from = a.worker->load() == 1 ? &a : &b;
  FakeWorker* to = from == &a ? &b : &a;
  wire::UniqueFd fd;
  const uint64_t id = OwnConnection(*dispatcher_, *from, fd);
  ASSERT_NE(id, 0u);
  ASSERT_TRUE(dispatcher_
                  ->OnRelease(*from->worker,
                              ReleaseOf(id, "", v1::RELEASE_REASON_REBALANCE),
                              std::move(fd))
                  .ok());
  v1::Connection moved;
  wire::UniqueFd moved_fd;
  ASSERT_TRUE(to->ReceiveConnection(moved, moved_fd));
  EXPECT_EQ(moved.peer_address(), "192.0.2.9:4444");
  EXPECT_EQ(moved.local_address(), "198.51.100.1:443");
  EXPECT_TRUE(from->worker->proxied.empty());
  ASSERT_TRUE(dispatcher_->OnAck(*to->worker, AckOf(id)).ok());
  EXPECT_EQ(to->worker->proxied.size(), 1u);
  v1::Closed closed;
  closed.add_connection_ids(id);
  ASSERT_TRUE(dispatcher_->OnClosed(*to->worker, closed).ok());
  EXPECT_TRUE(to->worker->proxied.empty());
}

TEST_F(ReleaseTest, ReleasedConnectionNeverGoesBackWhileAnotherCanTakeIt) {
  ASSERT_NO_FATAL_FAILURE(OwnOneEach());
  // After the release a has 0 and b 1: least_conn alone would pick a.
  ASSERT_TRUE(dispatcher_
                  ->OnRelease(*a_.worker,
                              ReleaseOf(ida_, "", v1::RELEASE_REASON_DRAIN),
                              std::move(fa_))
                  .ok());
  v1::Connection moved;
  wire::UniqueFd fd;
  ASSERT_TRUE(b_.ReceiveConnection(moved, fd));
  EXPECT_EQ(moved.connection_id(), ida_);
  EXPECT_TRUE(moved.initial_data().empty());
  EXPECT_TRUE(a_.Quiet());
  ASSERT_TRUE(dispatcher_->OnAck(*b_.worker, AckOf(ida_)).ok());
  EXPECT_EQ(dispatcher_->stats().migrated_drain, 1u);
  EXPECT_EQ(b_.worker->active(), 2);
}

TEST_F(ReleaseTest, ReleasedConnectionGoesBackWhenNobodyElseHasRoom) {
  ASSERT_NO_FATAL_FAILURE(OwnOneEach(/*b_capacity=*/1));
  ASSERT_FALSE(b_.worker->HasRoom());
  ASSERT_TRUE(
      dispatcher_
          ->OnRelease(*a_.worker,
                      ReleaseOf(ida_, "x", v1::RELEASE_REASON_REBALANCE),
                      std::move(fa_))
          .ok());
  v1::Connection back;
  wire::UniqueFd fd;
  ASSERT_TRUE(a_.ReceiveConnection(back, fd)) << "better than waiting";
  EXPECT_EQ(back.initial_data(), "x");
  EXPECT_EQ(dispatcher_->pending(), 0u);
}

TEST_F(ReleaseTest, ReleasedConnectionWaitsInTheQueueForRoom) {
  ASSERT_NO_FATAL_FAILURE(OwnOneEach(/*b_capacity=*/1));
  a_.worker->state = WorkerState::kDraining;  // a leaves; b is full.
  ASSERT_TRUE(dispatcher_
                  ->OnRelease(*a_.worker,
                              ReleaseOf(ida_, "", v1::RELEASE_REASON_DRAIN),
                              std::move(fa_))
                  .ok());
  EXPECT_EQ(dispatcher_->pending(), 1u);
  EXPECT_FALSE(PeerClosed(c1_));
  v1::Closed closed;
  closed.add_connection_ids(idb_);
  ASSERT_TRUE(dispatcher_->OnClosed(*b_.worker, closed).ok());
  v1::Connection moved;
  wire::UniqueFd fd;
  ASSERT_TRUE(b_.ReceiveConnection(moved, fd)) << "placed once b had room";
  EXPECT_EQ(moved.connection_id(), ida_);
  EXPECT_EQ(dispatcher_->pending(), 0u);
}

TEST_F(ReleaseTest, ReleaseOfAConnectionNotOwnedIsAnError) {
  ASSERT_NO_FATAL_FAILURE(OwnOneEach());
  wire::UniqueFd c3;
  // Each bad Release hands over (and loses) a copy of a's socket.
  auto release = [&](FakeWorker& w, uint64_t id, size_t unread) {
    return dispatcher_->OnRelease(
        *w.worker,
        ReleaseOf(id, std::string(unread, 'x'), v1::RELEASE_REASON_REBALANCE),
        wire::UniqueFd(::dup(fa_.get())));
  };
  EXPECT_FALSE(release(b_, ida_, 0).ok()) << "another worker's connection";
  EXPECT_FALSE(release(a_, 424242, 0).ok()) << "unknown id";
  EXPECT_FALSE(release(a_, ida_, wire::kMaxUnreadData + 1).ok())
      << "too many unread bytes to pass on";
  // Sent but not acked yet: not the worker's to give back.
  dispatcher_->Dispatch(NewClient(c3));
  FakeWorker& got = a_.worker->unacked == 1 ? a_ : b_;
  v1::Connection connection;
  wire::UniqueFd fd;
  ASSERT_TRUE(got.ReceiveConnection(connection, fd));
  EXPECT_FALSE(release(got, connection.connection_id(), 0).ok());
  // Nothing changed hands.
  EXPECT_EQ(a_.worker->active(), 1);
  EXPECT_EQ(b_.worker->active(), 1);
  EXPECT_EQ(dispatcher_->stats().released, 0u);
  EXPECT_TRUE(release(a_, ida_, wire::kMaxUnreadData).ok())
      << "its own, acked, at the limit: fine";
  EXPECT_EQ(dispatcher_->stats().released, 1u);
}

// A Release whose socket the kernel dropped because the broker was out of
// fds (MSG_CTRUNC): the connection is lost, counted (release_truncated),
// and no longer the worker's; only its own connection qualifies.
TEST_F(ReleaseTest, ReleaseTruncatedOutOfFdsIsCountedLost) {
  ASSERT_NO_FATAL_FAILURE(OwnOneEach());
  const v1::Release release = ReleaseOf(ida_, "", v1::RELEASE_REASON_REBALANCE);
  EXPECT_FALSE(dispatcher_->OnReleaseTruncated(*b_.worker, release).ok())
      << "another worker's connection";
  EXPECT_EQ(dispatcher_->stats().lost_release_truncated, 0u);
  EXPECT_TRUE(dispatcher_->OnReleaseTruncated(*a_.worker, release).ok());
  EXPECT_EQ(a_.worker->active(), 0);
  EXPECT_EQ(b_.worker->active(), 1);
  EXPECT_EQ(dispatcher_->stats().lost_release_truncated, 1u);
  EXPECT_EQ(dispatcher_->stats().released, 0u);
  EXPECT_FALSE(dispatcher_->OnReleaseTruncated(*a_.worker, release).ok())
      << "not its own any more";
}

// A Release must carry the very socket handed out under its id: anything
// else (a pipe, a listening socket, another client's socket) is refused and
// nothing is forwarded.
TEST_F(ReleaseTest, ReleaseOfAnythingButTheSocketItselfIsAnError) {
  ASSERT_NO_FATAL_FAILURE(OwnOneEach());
  auto release = [&](wire::UniqueFd fd) {
    return dispatcher_->OnRelease(
        *a_.worker, ReleaseOf(ida_, "", v1::RELEASE_REASON_REBALANCE),
        std::move(fd));
  };
  int pipe_fds[2];
  ASSERT_EQ(::pipe2(pipe_fds, O_CLOEXEC), 0);
  wire::UniqueFd pipe_write(pipe_fds[1]);
  absl::Status pipe = release(wire::UniqueFd(pipe_fds[0]));
  EXPECT_EQ(pipe.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(pipe.message().find("not a socket"), std::string::npos) << pipe;
  wire::UniqueFd listening(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  ASSERT_EQ(::listen(listening.get(), 1), 0);
  EXPECT_FALSE(release(std::move(listening)).ok()) << "a listening socket";
  EXPECT_FALSE(release(wire::UniqueFd(::dup(fb_.get()))).ok())
      << "another connection's socket";
  EXPECT_EQ(a_.worker->active(), 1);
  EXPECT_EQ(dispatcher_->stats().released, 0u);
  EXPECT_EQ(dispatcher_->pending(), 0u);
  EXPECT_TRUE(b_.Quiet()) << "nothing forwarded";
  EXPECT_TRUE(release(wire::UniqueFd(::dup(fa_.get()))).ok())
      << "a copy of its own socket: fine";
  EXPECT_EQ(dispatcher_->stats().released, 1u);
}

TEST_F(ReleaseTest, UnreadBytesAreNeverBatched) {
  ASSERT_NO_FATAL_FAILURE(OwnOneEach());
  b_.worker->max_connections_per_message = 8;
  ASSERT_TRUE(dispatcher_
                  ->OnRelease(*a_.worker,
                              ReleaseOf(ida_, "abc", v1::RELEASE_REASON_DRAIN),
                              std::move(fa_))
                  .ok());
  // Sent at once as a lone Connection, not staged for the end of the turn.
  v1::Connection moved;
  wire::UniqueFd fd;
  ASSERT_TRUE(b_.ReceiveConnection(moved, fd));
  EXPECT_EQ(moved.initial_data(), "abc");
}

}  // namespace
}  // namespace fdbroker
