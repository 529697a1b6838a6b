// The worker SDK against a fake broker: a real SOCK_SEQPACKET listener in a
// temp dir, driven step by step with wire::MessageChannel.

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <functional>
#include <future>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "fdbroker/worker.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/util/test_util.h"
#include "tests/worker/fake_broker.h"

namespace fdbroker::worker {
namespace {

using ::fdbroker::testing::CountOpenFds;
using ::fdbroker::testing::FakeBroker;
using ::fdbroker::testing::FakeClient;
using ::fdbroker::testing::MakeFakeClient;
using ::fdbroker::testing::ReadsEof;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Pair;
using ::testing::UnorderedElementsAre;
using v1::HandoffMessage;

int OwnFdCount() { return CountOpenFds(::getpid()).value_or(-1); }

std::vector<uint64_t> Ids(
    const google::protobuf::RepeatedField<uint64_t>& ids) {
  return std::vector<uint64_t>(ids.begin(), ids.end());
}

// sendmsg fails with `fail_errno` while it is non-zero; everything else is
// the real syscall.
class FlakySysCalls : public wire::SysCalls {
 public:
  ssize_t SendMsg(int fd, const msghdr* msg, int flags) override {
    const int error = fail_errno.load();
    if (error != 0) {
      errno = error;
      return -1;
    }
    return Real().SendMsg(fd, msg, flags);
  }
  ssize_t RecvMsg(int fd, msghdr* msg, int flags) override {
    return Real().RecvMsg(fd, msg, flags);
  }
  int Accept4(int fd, sockaddr* addr, socklen_t* len, int flags) override {
    return Real().Accept4(fd, addr, len, flags);
  }
  std::atomic<int> fail_errno{0};
};

class WorkerSdkTest : public ::testing::Test {
 protected:
  void SetUp() override {
    baseline_fds_ = OwnFdCount();
    broker_ = std::make_unique<FakeBroker>();
  }

  void TearDown() override {
    worker_.reset();
    delivered_.clear();
    broker_.reset();
    // Every fd the SDK (and the test) opened is closed again.
    EXPECT_EQ(OwnFdCount(), baseline_fds_) << "fd leak";
  }

  Options DefaultOptions() {
    Options options;
    options.socket_path = broker_->socket_path();
    options.on_connection = [this](ClientConnection connection) {
      delivered_.push_back(std::move(connection));
    };
    options.on_drain = [this](DrainCause cause, absl::Time deadline) {
      drain_causes_.push_back(cause);
      drain_deadline_ = deadline;
    };
    return options;
  }

  // Connects a worker, answering its Hello with Welcome.
  void Register(Options options, uint32_t interval_ms = 10000,
                uint32_t timeout_ms = 60000) {
    auto connecting = std::async(std::launch::async, [&options] {
      return Worker::Connect(std::move(options));
    });
    ASSERT_TRUE(broker_->Accept().ok());
    absl::StatusOr<HandoffMessage> hello = broker_->Receive();
    ASSERT_TRUE(hello.ok()) << hello.status();
    ASSERT_TRUE(hello->has_hello());
    hello_ = hello->hello();
    ASSERT_TRUE(broker_->SendWelcome(interval_ms, timeout_ms).ok());
    absl::StatusOr<std::unique_ptr<Worker>> worker = connecting.get();
    ASSERT_TRUE(worker.ok()) << worker.status();
    worker_ = *std::move(worker);
  }

  // Runs ProcessEvents() whenever the pollable fd is readable until `done`
  // holds or `timeout` passes.
  bool PumpUntil(const std::function<bool()>& done,
                 absl::Duration timeout = absl::Seconds(5)) {
    const absl::Time deadline = absl::Now() + timeout;
    for (;;) {
      worker_->ProcessEvents();
      if (done()) return true;
      if (absl::Now() >= deadline) return false;
      pollfd p{worker_->pollable_fd(), POLLIN, 0};
      ::poll(&p, 1, 10);
    }
  }

  // Pumps the worker until the broker receives a message other than a
  // heartbeat (or, with `heartbeats`, any message).
  absl::StatusOr<HandoffMessage> PumpAndReceive(
      bool heartbeats = false, absl::Duration timeout = absl::Seconds(5)) {
    const absl::Time deadline = absl::Now() + timeout;
    for (;;) {
      worker_->ProcessEvents();
      absl::StatusOr<HandoffMessage> message =
          broker_->Receive(absl::Milliseconds(10));
      if (message.ok() && message->has_heartbeat() && !heartbeats) continue;
      if (message.ok() || !absl::IsDeadlineExceeded(message.status())) {
        return message;
      }
      if (absl::Now() >= deadline) return message.status();
    }
  }

  int baseline_fds_ = 0;
  std::unique_ptr<FakeBroker> broker_;
  std::unique_ptr<Worker> worker_;
  v1::Hello hello_;
  std::vector<ClientConnection> delivered_;
  std::vector<DrainCause> drain_causes_;
  absl::Time drain_deadline_;
};

TEST_F(WorkerSdkTest, HelloCarriesVersionPidCapacityAndLabels) {
  Options options = DefaultOptions();
  options.capacity = 12;
  options.labels = {{"lang", "c++"}, {"zone", "a"}};
  Register(std::move(options));
  EXPECT_EQ(hello_.version().major(), 1u);
  EXPECT_EQ(hello_.version().minor(), 0u);
  EXPECT_EQ(hello_.pid(), ::getpid());
  EXPECT_EQ(hello_.capacity(), 12u);
  EXPECT_THAT(hello_.labels(),
              UnorderedElementsAre(Pair("lang", "c++"), Pair("zone", "a")));
  EXPECT_EQ(hello_.owned_connections_size(), 0);
  EXPECT_EQ(worker_->worker_id(), 7u);
  EXPECT_FALSE(worker_->draining());
  EXPECT_FALSE(worker_->finished());
}

TEST_F(WorkerSdkTest, SocketPathComesFromTheEnvironment) {
  Options options = DefaultOptions();
  options.socket_path.clear();
  ASSERT_EQ(::setenv("FDBROKER_SOCKET", broker_->socket_path().c_str(), 1), 0);
  Register(std::move(options));
  ::unsetenv("FDBROKER_SOCKET");
  EXPECT_NE(worker_, nullptr);
}

TEST_F(WorkerSdkTest, ConnectWithoutSocketPathFailsClearly) {
  ::unsetenv("FDBROKER_SOCKET");
  Options options = DefaultOptions();
  options.socket_path.clear();
  absl::StatusOr<std::unique_ptr<Worker>> worker =
      Worker::Connect(std::move(options));
  ASSERT_FALSE(worker.ok());
  EXPECT_TRUE(absl::IsInvalidArgument(worker.status()));
  EXPECT_THAT(worker.status().message(), HasSubstr("FDBROKER_SOCKET"));
}

TEST_F(WorkerSdkTest, ConnectWithoutBrokerIsUnavailable) {
  Options options = DefaultOptions();
  options.socket_path = broker_->socket_path() + ".missing";
  absl::StatusOr<std::unique_ptr<Worker>> worker =
      Worker::Connect(std::move(options));
  ASSERT_FALSE(worker.ok());
  EXPECT_TRUE(absl::IsUnavailable(worker.status())) << worker.status();
  EXPECT_THAT(worker.status().message(), HasSubstr(".missing"));
}

TEST_F(WorkerSdkTest, RefusalFailsConnectWithTheBrokersReason) {
  Options options = DefaultOptions();
  auto connecting = std::async(std::launch::async, [&options] {
    return Worker::Connect(std::move(options));
  });
  ASSERT_TRUE(broker_->Accept().ok());
  ASSERT_TRUE(broker_->Receive().ok());
  ASSERT_TRUE(broker_
                  ->SendRefusal(v1::REFUSAL_REASON_TOO_MANY_WORKERS,
                                "already 64 workers (--max_workers)")
                  .ok());
  broker_->CloseChannel();
  absl::StatusOr<std::unique_ptr<Worker>> worker = connecting.get();
  ASSERT_FALSE(worker.ok());
  EXPECT_TRUE(absl::IsResourceExhausted(worker.status())) << worker.status();
  EXPECT_THAT(worker.status().message(),
              HasSubstr("already 64 workers (--max_workers)"));
  EXPECT_THAT(worker.status().message(), HasSubstr("TOO_MANY_WORKERS"));
}

TEST_F(WorkerSdkTest, ConnectTimesOutWithoutWelcome) {
  Options options = DefaultOptions();
  options.connect_timeout = absl::Milliseconds(200);
  auto connecting = std::async(std::launch::async, [&options] {
    return Worker::Connect(std::move(options));
  });
  ASSERT_TRUE(broker_->Accept().ok());
  absl::StatusOr<std::unique_ptr<Worker>> worker = connecting.get();
  ASSERT_FALSE(worker.ok());
  EXPECT_TRUE(absl::IsDeadlineExceeded(worker.status())) << worker.status();
}

TEST_F(WorkerSdkTest, ConnectionArrivesAsTheSameSocketAndIsAcked) {
  Register(DefaultOptions());
  FakeClient client = MakeFakeClient();
  ASSERT_TRUE(
      broker_->SendConnection(42, client.broker_end.get(), "GET / HTTP/1.1\r\n")
          .ok());
  ASSERT_TRUE(PumpUntil([&] { return !delivered_.empty(); }));

  absl::StatusOr<HandoffMessage> ack = broker_->Receive();
  ASSERT_TRUE(ack.ok()) << ack.status();
  ASSERT_TRUE(ack->has_ack()) << ack->DebugString();
  EXPECT_THAT(Ids(ack->ack().connection_ids()), ElementsAre(42u));

  ASSERT_EQ(delivered_.size(), 1u);
  ClientConnection& connection = delivered_[0];
  EXPECT_EQ(connection.id, 42u);
  EXPECT_EQ(connection.peer_address, "192.0.2.1:40042");
  EXPECT_EQ(connection.local_address, "198.51.100.1:8080");
  EXPECT_EQ(connection.initial_data, "GET / HTTP/1.1\r\n");
  EXPECT_LT(absl::Now() - connection.accept_time, absl::Seconds(10));
  EXPECT_EQ(worker_->active_connections(), 1u);

  // The same open file as the broker's: same inode, and bytes written by
  // the client arrive through it after the broker's copy is gone.
  struct stat ours, brokers;
  ASSERT_EQ(::fstat(connection.fd.get(), &ours), 0);
  ASSERT_EQ(::fstat(client.broker_end.get(), &brokers), 0);
  EXPECT_EQ(ours.st_ino, brokers.st_ino);
  EXPECT_EQ(ours.st_dev, brokers.st_dev);
  client.broker_end.Reset();
  ASSERT_EQ(::write(client.client.get(), "ping", 4), 4);
  char buffer[8];
  ASSERT_EQ(::read(connection.fd.get(), buffer, sizeof(buffer)), 4);
  EXPECT_EQ(std::string(buffer, 4), "ping");
  // Close-on-exec, so that it does not leak into children.
  EXPECT_NE(::fcntl(connection.fd.get(), F_GETFD) & FD_CLOEXEC, 0);
}

TEST_F(WorkerSdkTest, SeveralConnectionsAreAckedInOneBatch) {
  Register(DefaultOptions());
  std::vector<FakeClient> clients;
  for (uint64_t id = 1; id <= 3; ++id) {
    clients.push_back(MakeFakeClient());
    ASSERT_TRUE(
        broker_->SendConnection(id, clients.back().broker_end.get()).ok());
  }
  // All three are queued: one ProcessEvents() takes them all.
  worker_->ProcessEvents();
  ASSERT_EQ(delivered_.size(), 3u);
  absl::StatusOr<HandoffMessage> ack = broker_->Receive();
  ASSERT_TRUE(ack.ok() && ack->has_ack());
  EXPECT_THAT(Ids(ack->ack().connection_ids()), ElementsAre(1u, 2u, 3u));
  // ... and nothing else was sent.
  EXPECT_TRUE(absl::IsDeadlineExceeded(
      broker_->Receive(absl::Milliseconds(100)).status()));
}

TEST_F(WorkerSdkTest, ClosedConnectionsAreReportedInOneBatch) {
  Register(DefaultOptions());
  std::vector<FakeClient> clients;
  for (uint64_t id = 1; id <= 3; ++id) {
    clients.push_back(MakeFakeClient());
    ASSERT_TRUE(
        broker_->SendConnection(id, clients.back().broker_end.get()).ok());
  }
  ASSERT_TRUE(PumpUntil([&] { return delivered_.size() == 3; }));
  ASSERT_TRUE(broker_->Receive().ok());  // Ack.

  worker_->ConnectionClosed(1);
  worker_->ConnectionClosed(3);
  worker_->ConnectionClosed(99);  // Unknown: ignored, not reported.
  EXPECT_EQ(worker_->active_connections(), 1u);
  // The pollable fd asks for the next ProcessEvents().
  pollfd p{worker_->pollable_fd(), POLLIN, 0};
  EXPECT_EQ(::poll(&p, 1, 1000), 1);
  absl::StatusOr<HandoffMessage> closed = PumpAndReceive();
  ASSERT_TRUE(closed.ok()) << closed.status();
  ASSERT_TRUE(closed->has_closed()) << closed->DebugString();
  EXPECT_THAT(Ids(closed->closed().connection_ids()), ElementsAre(1u, 3u));
}

TEST_F(WorkerSdkTest, DrainRejectsNewConnectionsAndSaysGoodbyeAfterTheLast) {
  Register(DefaultOptions());
  FakeClient first = MakeFakeClient();
  ASSERT_TRUE(broker_->SendConnection(1, first.broker_end.get()).ok());
  ASSERT_TRUE(PumpUntil([&] { return delivered_.size() == 1; }));
  ASSERT_TRUE(broker_->Receive().ok());  // Ack.

  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  ASSERT_TRUE(broker_->SendDrain(deadline).ok());
  ASSERT_TRUE(PumpUntil([&] { return !drain_causes_.empty(); }));
  EXPECT_THAT(drain_causes_, ElementsAre(DrainCause::kBrokerRequest));
  EXPECT_LT(absl::AbsDuration(drain_deadline_ - deadline),
            absl::Milliseconds(1));
  EXPECT_TRUE(worker_->draining());
  EXPECT_FALSE(worker_->finished());

  // A connection arriving now goes back, and the worker's copy is closed
  // without touching the socket.
  FakeClient late = MakeFakeClient();
  ASSERT_TRUE(broker_->SendConnection(2, late.broker_end.get()).ok());
  late.broker_end.Reset();
  absl::StatusOr<HandoffMessage> reject = PumpAndReceive();
  ASSERT_TRUE(reject.ok() && reject->has_reject()) << reject.status();
  EXPECT_THAT(Ids(reject->reject().connection_ids()), ElementsAre(2u));
  EXPECT_THAT(reject->reject().reason(), HasSubstr("draining"));
  EXPECT_TRUE(ReadsEof(late.client.get()));
  EXPECT_EQ(delivered_.size(), 1u);

  // The last connection closes: Closed, then Goodbye, then the channel.
  delivered_.clear();
  worker_->ConnectionClosed(1);
  absl::StatusOr<HandoffMessage> closed = PumpAndReceive();
  ASSERT_TRUE(closed.ok() && closed->has_closed()) << closed.status();
  EXPECT_THAT(Ids(closed->closed().connection_ids()), ElementsAre(1u));
  absl::StatusOr<HandoffMessage> goodbye = broker_->Receive();
  ASSERT_TRUE(goodbye.ok() && goodbye->has_goodbye()) << goodbye.status();
  EXPECT_TRUE(broker_->WaitForClose());
  EXPECT_TRUE(worker_->finished());
  EXPECT_THAT(drain_causes_, ElementsAre(DrainCause::kBrokerRequest));
}

TEST_F(WorkerSdkTest, DrainInTheSameBatchReturnsEarlierConnectionsToo) {
  Register(DefaultOptions());
  FakeClient before = MakeFakeClient();
  FakeClient after = MakeFakeClient();
  ASSERT_TRUE(broker_->SendConnection(1, before.broker_end.get()).ok());
  ASSERT_TRUE(broker_->SendDrain(absl::InfiniteFuture()).ok());
  ASSERT_TRUE(broker_->SendConnection(2, after.broker_end.get()).ok());
  worker_->ProcessEvents();
  EXPECT_TRUE(delivered_.empty());
  absl::StatusOr<HandoffMessage> reject = broker_->Receive();
  ASSERT_TRUE(reject.ok() && reject->has_reject()) << reject.status();
  EXPECT_THAT(Ids(reject->reject().connection_ids()),
              UnorderedElementsAre(1u, 2u));
  // Owning nothing, it says Goodbye at once.
  absl::StatusOr<HandoffMessage> goodbye = broker_->Receive();
  ASSERT_TRUE(goodbye.ok() && goodbye->has_goodbye()) << goodbye.status();
  EXPECT_TRUE(worker_->finished());
  EXPECT_EQ(drain_deadline_, absl::InfiniteFuture());
}

TEST_F(WorkerSdkTest, CapacityReturnsConnectionsBeyondIt) {
  Options options = DefaultOptions();
  options.capacity = 1;
  Register(std::move(options));
  FakeClient a = MakeFakeClient();
  FakeClient b = MakeFakeClient();
  ASSERT_TRUE(broker_->SendConnection(1, a.broker_end.get()).ok());
  ASSERT_TRUE(broker_->SendConnection(2, b.broker_end.get()).ok());
  worker_->ProcessEvents();
  ASSERT_EQ(delivered_.size(), 1u);
  EXPECT_EQ(delivered_[0].id, 1u);
  absl::StatusOr<HandoffMessage> reject = broker_->Receive();
  ASSERT_TRUE(reject.ok() && reject->has_reject()) << reject.status();
  EXPECT_THAT(Ids(reject->reject().connection_ids()), ElementsAre(2u));
  EXPECT_THAT(reject->reject().reason(), HasSubstr("capacity"));
  absl::StatusOr<HandoffMessage> ack = broker_->Receive();
  ASSERT_TRUE(ack.ok() && ack->has_ack()) << ack.status();
  EXPECT_THAT(Ids(ack->ack().connection_ids()), ElementsAre(1u));
}

TEST_F(WorkerSdkTest, LocalDrainSaysGoodbyeOnceIdle) {
  Register(DefaultOptions());
  FakeClient client = MakeFakeClient();
  ASSERT_TRUE(broker_->SendConnection(5, client.broker_end.get()).ok());
  ASSERT_TRUE(PumpUntil([&] { return delivered_.size() == 1; }));
  ASSERT_TRUE(broker_->Receive().ok());  // Ack.
  worker_->StartDrain();
  ASSERT_TRUE(PumpUntil([&] { return !drain_causes_.empty(); }));
  EXPECT_THAT(drain_causes_, ElementsAre(DrainCause::kLocal));
  worker_->ConnectionClosed(5);
  absl::StatusOr<HandoffMessage> closed = PumpAndReceive();
  ASSERT_TRUE(closed.ok() && closed->has_closed());
  absl::StatusOr<HandoffMessage> goodbye = broker_->Receive();
  ASSERT_TRUE(goodbye.ok() && goodbye->has_goodbye()) << goodbye.status();
  EXPECT_TRUE(worker_->finished());
}

TEST_F(WorkerSdkTest, HeartbeatIsSentWhenIdle) {
  Register(DefaultOptions(), /*interval_ms=*/50, /*timeout_ms=*/60000);
  const absl::Time start = absl::Now();
  absl::StatusOr<HandoffMessage> heartbeat = PumpAndReceive(true);
  ASSERT_TRUE(heartbeat.ok()) << heartbeat.status();
  EXPECT_TRUE(heartbeat->has_heartbeat()) << heartbeat->DebugString();
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(40));
  // And again, as long as it stays idle.
  heartbeat = PumpAndReceive(true);
  ASSERT_TRUE(heartbeat.ok() && heartbeat->has_heartbeat());
  EXPECT_FALSE(worker_->draining());
}

TEST_F(WorkerSdkTest, SilentBrokerIsDeclaredDeadAndConnectionsAreKept) {
  Register(DefaultOptions(), /*interval_ms=*/20, /*timeout_ms=*/200);
  FakeClient client = MakeFakeClient();
  ASSERT_TRUE(broker_->SendConnection(1, client.broker_end.get()).ok());
  ASSERT_TRUE(PumpUntil([&] { return delivered_.size() == 1; }));
  client.broker_end.Reset();
  const absl::Time silent_since = absl::Now();

  // The broker says nothing (it still reads: the heartbeats queue up).
  ASSERT_TRUE(PumpUntil([&] { return worker_->draining(); }));
  EXPECT_GE(absl::Now() - silent_since, absl::Milliseconds(150));
  EXPECT_THAT(drain_causes_, ElementsAre(DrainCause::kBrokerLost));
  EXPECT_TRUE(broker_->WaitForClose());

  // The application keeps its connection.
  EXPECT_EQ(worker_->active_connections(), 1u);
  EXPECT_FALSE(worker_->finished());
  ASSERT_EQ(::write(client.client.get(), "x", 1), 1);
  char byte;
  EXPECT_EQ(::read(delivered_[0].fd.get(), &byte, 1), 1);
  worker_->ConnectionClosed(1);
  EXPECT_TRUE(PumpUntil([&] { return worker_->finished(); }));
}

TEST_F(WorkerSdkTest, HeartbeatsFromTheBrokerKeepTheChannelAlive) {
  Register(DefaultOptions(), /*interval_ms=*/20, /*timeout_ms=*/150);
  const absl::Time until = absl::Now() + absl::Milliseconds(500);
  while (absl::Now() < until) {
    ASSERT_TRUE(broker_->SendHeartbeat().ok());
    PumpUntil([] { return false; }, absl::Milliseconds(30));
    while (broker_->Receive(absl::ZeroDuration()).ok()) {
    }
  }
  EXPECT_FALSE(worker_->draining());
}

TEST_F(WorkerSdkTest, BrokerCrashKeepsConnectionsAndDrains) {
  Register(DefaultOptions());
  FakeClient client = MakeFakeClient();
  ASSERT_TRUE(broker_->SendConnection(1, client.broker_end.get()).ok());
  ASSERT_TRUE(PumpUntil([&] { return delivered_.size() == 1; }));
  client.broker_end.Reset();
  broker_->CloseChannel();
  ASSERT_TRUE(PumpUntil([&] { return worker_->draining(); }));
  EXPECT_THAT(drain_causes_, ElementsAre(DrainCause::kBrokerLost));
  EXPECT_EQ(drain_deadline_, absl::InfiniteFuture());
  EXPECT_EQ(worker_->active_connections(), 1u);
  EXPECT_FALSE(worker_->finished());
  ASSERT_EQ(::write(client.client.get(), "x", 1), 1);
  char byte;
  EXPECT_EQ(::read(delivered_[0].fd.get(), &byte, 1), 1);
  worker_->ConnectionClosed(1);
  EXPECT_TRUE(PumpUntil([&] { return worker_->finished(); }));
}

TEST_F(WorkerSdkTest, ChannelDeathBeforeAckClosesTheConnectionUndelivered) {
  Register(DefaultOptions());
  FakeClient client = MakeFakeClient();
  ASSERT_TRUE(broker_->SendConnection(1, client.broker_end.get()).ok());
  client.broker_end.Reset();
  broker_->CloseChannel();  // Before the worker could ack.
  ASSERT_TRUE(PumpUntil([&] { return worker_->draining(); }));
  EXPECT_TRUE(delivered_.empty());
  // The worker closed its copy: the broker (which kept its own) re-places it.
  EXPECT_TRUE(ReadsEof(client.client.get()));
  EXPECT_TRUE(worker_->finished());
}

TEST_F(WorkerSdkTest, FailedAckClosesTheConnectionUndelivered) {
  FlakySysCalls sys;
  Options options = DefaultOptions();
  options.syscalls = &sys;
  Register(std::move(options));
  FakeClient client = MakeFakeClient();
  ASSERT_TRUE(broker_->SendConnection(1, client.broker_end.get()).ok());
  client.broker_end.Reset();
  sys.fail_errno = EPIPE;
  worker_->ProcessEvents();
  EXPECT_TRUE(delivered_.empty());
  EXPECT_TRUE(worker_->draining());
  EXPECT_THAT(drain_causes_, ElementsAre(DrainCause::kBrokerLost));
  EXPECT_TRUE(ReadsEof(client.client.get()));
  EXPECT_TRUE(broker_->WaitForClose());
}

TEST_F(WorkerSdkTest, AckThatWouldBlockDeliversOnceSent) {
  FlakySysCalls sys;
  Options options = DefaultOptions();
  options.syscalls = &sys;
  Register(std::move(options));
  FakeClient client = MakeFakeClient();
  ASSERT_TRUE(broker_->SendConnection(1, client.broker_end.get()).ok());
  sys.fail_errno = EAGAIN;
  worker_->ProcessEvents();
  EXPECT_TRUE(delivered_.empty()) << "delivered before the Ack was sent";
  EXPECT_EQ(worker_->active_connections(), 0u);
  sys.fail_errno = 0;
  // The pollable fd reports the socket writable; the queued Ack goes out.
  ASSERT_TRUE(PumpUntil([&] { return delivered_.size() == 1; }));
  absl::StatusOr<HandoffMessage> ack = broker_->Receive();
  ASSERT_TRUE(ack.ok() && ack->has_ack()) << ack.status();
  EXPECT_THAT(Ids(ack->ack().connection_ids()), ElementsAre(1u));
}

// A broker that breaks the protocol: the worker logs, treats it as losing
// the broker, keeps its connections, and leaks nothing (TearDown counts).
struct MalformedCase {
  const char* name;
  std::function<void(FakeBroker&, int spare_fd)> send;
};

class WorkerSdkMalformedTest
    : public WorkerSdkTest,
      public ::testing::WithParamInterface<MalformedCase> {};

TEST_P(WorkerSdkMalformedTest, IsTreatedAsChannelLoss) {
  Register(DefaultOptions());
  FakeClient owned = MakeFakeClient();
  ASSERT_TRUE(broker_->SendConnection(1, owned.broker_end.get()).ok());
  ASSERT_TRUE(PumpUntil([&] { return delivered_.size() == 1; }));
  ASSERT_TRUE(broker_->Receive().ok());  // Ack.

  FakeClient spare = MakeFakeClient();
  GetParam().send(*broker_, spare.broker_end.get());
  spare.broker_end.Reset();
  ASSERT_TRUE(PumpUntil([&] { return worker_->draining(); }));
  EXPECT_THAT(drain_causes_, ElementsAre(DrainCause::kBrokerLost));
  EXPECT_TRUE(broker_->WaitForClose());
  // Any fd that came with the bad message was closed, not delivered.
  EXPECT_TRUE(ReadsEof(spare.client.get()));
  EXPECT_EQ(delivered_.size(), 1u);
  EXPECT_EQ(worker_->active_connections(), 1u);
  worker_->ConnectionClosed(1);
  EXPECT_TRUE(PumpUntil([&] { return worker_->finished(); }));
}

HandoffMessage WithSequence(HandoffMessage message, uint64_t sequence) {
  message.set_sequence(sequence);
  return message;
}

INSTANTIATE_TEST_SUITE_P(
    Broker, WorkerSdkMalformedTest,
    ::testing::Values(
        MalformedCase{"GarbagePacket",
                      [](FakeBroker& broker, int fd) {
                        ASSERT_TRUE(broker
                                        .SendRawPacket(std::string(
                                            "\xff\xff\xff\xff garbage", 12))
                                        .ok());
                      }},
        MalformedCase{"GarbagePacketWithFd",
                      [](FakeBroker& broker, int fd) {
                        ASSERT_TRUE(
                            broker.SendRawPacket("\x0a\x03xyz", {fd}).ok());
                      }},
        MalformedCase{"WrongSequence",
                      [](FakeBroker& broker, int fd) {
                        HandoffMessage heartbeat;
                        heartbeat.mutable_heartbeat();
                        ASSERT_TRUE(
                            broker
                                .SendRawPacket(
                                    WithSequence(heartbeat,
                                                 broker.next_sequence() + 5)
                                        .SerializeAsString())
                                .ok());
                      }},
        MalformedCase{"ConnectionWithoutFd",
                      [](FakeBroker& broker, int fd) {
                        HandoffMessage connection;
                        connection.mutable_connection()->set_connection_id(9);
                        ASSERT_TRUE(broker
                                        .SendRawPacket(
                                            WithSequence(connection,
                                                         broker.next_sequence())
                                                .SerializeAsString())
                                        .ok());
                      }},
        MalformedCase{"HeartbeatWithFd",
                      [](FakeBroker& broker, int fd) {
                        HandoffMessage heartbeat;
                        heartbeat.mutable_heartbeat();
                        ASSERT_TRUE(broker
                                        .SendRawPacket(
                                            WithSequence(heartbeat,
                                                         broker.next_sequence())
                                                .SerializeAsString(),
                                            {fd})
                                        .ok());
                      }},
        MalformedCase{"UnexpectedWelcome",
                      [](FakeBroker& broker, int fd) {
                        ASSERT_TRUE(broker.SendWelcome().ok());
                      }},
        MalformedCase{"DuplicateConnectionId",
                      [](FakeBroker& broker, int fd) {
                        ASSERT_TRUE(broker.SendConnection(1, fd).ok());
                      }}),
    [](const ::testing::TestParamInfo<MalformedCase>& info) {
      return std::string(info.param.name);
    });

TEST_F(WorkerSdkTest, ThreadPerConnectionServesTwoConnectionsConcurrently) {
  Options options = DefaultOptions();
  options.on_connection = nullptr;
  Register(std::move(options));

  absl::Mutex mu;
  int inside = 0;  // Handlers running at once.
  Worker::ConnectionHandler handler = [&](ClientConnection connection) {
    char byte;
    if (::read(connection.fd.get(), &byte, 1) != 1) return;
    absl::MutexLock lock(&mu);
    ++inside;
    // Both handlers must be inside at the same time: proof of concurrency.
    const bool both =
        mu.AwaitWithTimeout(absl::Condition(
                                +[](int* n) { return *n >= 2; }, &inside),
                            absl::Seconds(5));
    const char* answer = both ? "2" : "1";
    (void)!::write(connection.fd.get(), answer, 1);
  };
  std::thread serving(
      [&] { EXPECT_TRUE(worker_->ServeThreadPerConnection(handler).ok()); });

  FakeClient a = MakeFakeClient();
  FakeClient b = MakeFakeClient();
  ASSERT_TRUE(broker_->SendConnection(1, a.broker_end.get()).ok());
  ASSERT_TRUE(broker_->SendConnection(2, b.broker_end.get()).ok());
  a.broker_end.Reset();
  b.broker_end.Reset();
  ASSERT_EQ(::write(a.client.get(), "a", 1), 1);
  ASSERT_EQ(::write(b.client.get(), "b", 1), 1);
  char answer_a = 0, answer_b = 0;
  EXPECT_EQ(::read(a.client.get(), &answer_a, 1), 1);
  EXPECT_EQ(::read(b.client.get(), &answer_b, 1), 1);
  EXPECT_EQ(answer_a, '2');
  EXPECT_EQ(answer_b, '2');
  // Handlers returned: the SDK closed both and reported them.
  EXPECT_TRUE(ReadsEof(a.client.get()));
  EXPECT_TRUE(ReadsEof(b.client.get()));

  std::vector<uint64_t> acked, closed;
  while (closed.size() < 2) {
    absl::StatusOr<HandoffMessage> message = broker_->Receive();
    ASSERT_TRUE(message.ok()) << message.status();
    for (uint64_t id : message->ack().connection_ids()) acked.push_back(id);
    for (uint64_t id : message->closed().connection_ids()) {
      closed.push_back(id);
    }
  }
  EXPECT_THAT(acked, UnorderedElementsAre(1u, 2u));
  EXPECT_THAT(closed, UnorderedElementsAre(1u, 2u));

  ASSERT_TRUE(broker_->SendDrain(absl::InfiniteFuture()).ok());
  absl::StatusOr<HandoffMessage> goodbye = broker_->Receive();
  ASSERT_TRUE(goodbye.ok() && goodbye->has_goodbye()) << goodbye.status();
  serving.join();
  EXPECT_TRUE(worker_->finished());
  EXPECT_THAT(drain_causes_, ElementsAre(DrainCause::kBrokerRequest));
}

TEST_F(WorkerSdkTest, ThreadPerConnectionWaitsForHandlersBeforeGoodbye) {
  Options options = DefaultOptions();
  options.on_connection = nullptr;
  Register(std::move(options));
  std::atomic<bool> handler_returned{false};
  Worker::ConnectionHandler handler = [&](ClientConnection connection) {
    char byte;
    // Serve until the client leaves (the drain does not cut it short).
    while (::read(connection.fd.get(), &byte, 1) == 1) {
    }
    handler_returned = true;
  };
  std::thread serving(
      [&] { EXPECT_TRUE(worker_->ServeThreadPerConnection(handler).ok()); });
  FakeClient client = MakeFakeClient();
  ASSERT_TRUE(broker_->SendConnection(1, client.broker_end.get()).ok());
  client.broker_end.Reset();
  absl::StatusOr<HandoffMessage> ack = broker_->Receive();
  ASSERT_TRUE(ack.ok() && ack->has_ack());
  ASSERT_TRUE(broker_->SendDrain(absl::InfiniteFuture()).ok());
  // No Goodbye while the handler runs.
  EXPECT_TRUE(absl::IsDeadlineExceeded(
      broker_->Receive(absl::Milliseconds(200)).status()));
  client.client.Reset();  // The client leaves; the handler returns.
  absl::StatusOr<HandoffMessage> closed = broker_->Receive();
  ASSERT_TRUE(closed.ok() && closed->has_closed()) << closed.status();
  absl::StatusOr<HandoffMessage> goodbye = broker_->Receive();
  ASSERT_TRUE(goodbye.ok() && goodbye->has_goodbye()) << goodbye.status();
  serving.join();
  EXPECT_TRUE(handler_returned);
}

}  // namespace
}  // namespace fdbroker::worker
