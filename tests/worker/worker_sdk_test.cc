// The worker SDK against a fake broker: a real SOCK_SEQPACKET listener in a
// temp dir, driven step by step with wire::MessageChannel.

#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <future>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "fdbroker/worker.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/util/test_util.h"
#include "tests/worker/fake_broker.h"
#include "wire/message_channel.h"
#include "wire/sanitized.h"
#include "wire/socket_address.h"

namespace fdbroker::worker {
namespace {

using ::fdbroker::testing::CountOpenFds;
using ::fdbroker::testing::FakeBroker;
using ::fdbroker::testing::FakeClient;
using ::fdbroker::testing::MakeFakeClient;
using ::fdbroker::testing::ReadsEof;
using ::fdbroker::testing::WaitFor;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Pair;
using ::testing::UnorderedElementsAre;
using v1::HandoffMessage;

int OwnFdCount() { return CountOpenFds(::getpid()).value_or(-1); }

// Bytes written at `client` can be read from `fd`: the same socket.
void ExpectSameSocket(int client, int fd) {
  ASSERT_EQ(::write(client, "ping", 4), 4);
  char buffer[8];
  pollfd p{fd, POLLIN, 0};
  ASSERT_EQ(::poll(&p, 1, 5000), 1);
  ASSERT_EQ(::recv(fd, buffer, sizeof(buffer), MSG_DONTWAIT), 4);
  EXPECT_EQ(std::string(buffer, 4), "ping");
}

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

  // Pumps the worker until it connects to the broker's listener again (a
  // re-registration attempt) and returns the Hello it sent.
  absl::StatusOr<HandoffMessage> PumpUntilReconnected(
      absl::Duration timeout = absl::Seconds(5)) {
    const absl::Time deadline = absl::Now() + timeout;
    for (;;) {
      worker_->ProcessEvents();
      if (broker_->Accept(absl::Milliseconds(10)).ok()) break;
      if (absl::Now() >= deadline) {
        return absl::DeadlineExceededError("the worker did not reconnect");
      }
    }
    return broker_->Receive();
  }

  // Hands connections `ids` to the worker and waits for their delivery and
  // the Ack; the test's ends are in `clients`.
  void DeliverConnections(const std::vector<uint64_t>& ids,
                          std::vector<FakeClient>& clients) {
    const size_t before = delivered_.size();
    for (uint64_t id : ids) {
      clients.push_back(MakeFakeClient());
      ASSERT_TRUE(
          broker_->SendConnection(id, clients.back().broker_end.get()).ok());
      clients.back().broker_end.Reset();  // The broker's copy: acked, gone.
    }
    ASSERT_TRUE(
        PumpUntil([&] { return delivered_.size() == before + ids.size(); }));
    std::vector<uint64_t> acked;
    while (acked.size() < ids.size()) {
      absl::StatusOr<HandoffMessage> ack = PumpAndReceive();
      ASSERT_TRUE(ack.ok() && ack->has_ack()) << ack.status();
      acked.insert(acked.end(), ack->ack().connection_ids().begin(),
                   ack->ack().connection_ids().end());
    }
    EXPECT_EQ(acked, ids);
  }

  // The delivered connection `id`.
  ClientConnection* Delivered(uint64_t id) {
    for (ClientConnection& connection : delivered_) {
      if (connection.id == id) return &connection;
    }
    return nullptr;
  }

  // DefaultOptions() plus on_release_request, which records each request.
  Options ReleasingOptions() {
    Options options = DefaultOptions();
    options.on_release_request = [this](uint32_t max_connections,
                                        ReleaseReason reason) {
      release_requests_.emplace_back(max_connections, reason);
    };
    options.on_drain = [this](DrainCause cause, absl::Time deadline) {
      drain_causes_.push_back(cause);
      drain_deadline_ = deadline;
      release_on_drain_in_callback_ = worker_->release_on_drain();
    };
    return options;
  }

  // Registers with ReleasingOptions() and flaky_sys_ as the syscalls, and
  // delivers connection 1 (its client end in `clients`).
  void RegisterWithOneConnection(absl::Duration reconnect_timeout,
                                 std::vector<FakeClient>& clients) {
    Options options = ReleasingOptions();
    options.syscalls = &flaky_sys_;
    options.reconnect_timeout = reconnect_timeout;
    Register(std::move(options));
    DeliverConnections({1}, clients);
  }

  // Like PumpAndReceive(), keeping the fd that came with the message.
  absl::StatusOr<HandoffMessage> PumpAndReceiveFd(wire::UniqueFd& fd) {
    const absl::Time deadline = absl::Now() + absl::Seconds(5);
    for (;;) {
      worker_->ProcessEvents();
      absl::StatusOr<HandoffMessage> message =
          broker_->Receive(absl::Milliseconds(10), fd);
      if (message.ok() && message->has_heartbeat()) continue;
      if (message.ok() || !absl::IsDeadlineExceeded(message.status())) {
        return message;
      }
      if (absl::Now() >= deadline) return message.status();
    }
  }

  int baseline_fds_ = 0;
  // Outlives worker_ (whose destructor may still send through it).
  FlakySysCalls flaky_sys_;
  std::vector<std::pair<uint32_t, ReleaseReason>> release_requests_;
  bool release_on_drain_in_callback_ = false;
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
  EXPECT_EQ(hello_.version().minor(), wire::kProtocolMinor);
  EXPECT_EQ(hello_.max_connections_per_message(), 32u);
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

// A hand-off socket served by a process of another uid (a socket planted
// under a shared directory by another user): a forked child binds it as
// root, drops to `uid`, then listens, so SO_PEERCRED names `uid`. It never
// answers; it is killed and reaped on destruction.
class ForeignListener {
 public:
  explicit ForeignListener(uid_t uid)
      : path_(absl::StrCat(::fdbroker::testing::MakeTempDir(), "/foreign")) {
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    std::memcpy(address.sun_path, path_.data(), path_.size());
    wire::UniqueFd listener(
        ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
    int ready[2];
    if (!listener ||
        ::bind(listener.get(), reinterpret_cast<sockaddr*>(&address),
               sizeof(address)) != 0 ||
        ::pipe2(ready, O_CLOEXEC) != 0) {
      return;
    }
    pid_ = ::fork();
    if (pid_ == 0) {
      // Only async-signal-safe calls here: the test is multithreaded.
      if (::setgid(uid) != 0 || ::setuid(uid) != 0 ||
          ::listen(listener.get(), 8) != 0) {
        ::_exit(1);
      }
      (void)::write(ready[1], "r", 1);
      for (;;) ::pause();
    }
    ::close(ready[1]);
    char byte = 0;
    listening_ = pid_ > 0 && ::read(ready[0], &byte, 1) == 1;
    ::close(ready[0]);
  }
  ~ForeignListener() {
    ::unlink(path_.c_str());
    ::rmdir(path_.substr(0, path_.rfind('/')).c_str());
    if (pid_ <= 0) return;
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
  }
  bool listening() const { return listening_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  pid_t pid_ = -1;
  bool listening_ = false;
};

TEST_F(WorkerSdkTest, RefusesABrokerOfAnotherUid) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to serve as another uid";
  ForeignListener foreign(65534);
  ASSERT_TRUE(foreign.listening());
  Options options = DefaultOptions();
  options.socket_path = foreign.path();
  options.connect_timeout = absl::Seconds(2);
  absl::StatusOr<std::unique_ptr<Worker>> worker =
      Worker::Connect(std::move(options));
  ASSERT_FALSE(worker.ok());
  EXPECT_TRUE(absl::IsPermissionDenied(worker.status())) << worker.status();
  EXPECT_THAT(worker.status().message(), HasSubstr("uid 65534"));
  EXPECT_THAT(worker.status().message(), HasSubstr(foreign.path()));
}

TEST_F(WorkerSdkTest, GivesUpReconnectingToABrokerOfAnotherUid) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to serve as another uid";
  Options options = DefaultOptions();
  options.reconnect_timeout = absl::Seconds(30);
  Register(std::move(options));
  std::vector<FakeClient> clients;
  DeliverConnections({1}, clients);
  // The broker goes; another user's process takes the path.
  broker_->StopListening();
  broker_->CloseChannel();
  ForeignListener foreign(65534);
  ASSERT_TRUE(foreign.listening());
  ASSERT_EQ(::rename(foreign.path().c_str(), broker_->socket_path().c_str()),
            0);
  // Not a retry every second for 30 s: a drain at once, keeping the client.
  ASSERT_TRUE(
      PumpUntil([&] { return !drain_causes_.empty(); }, absl::Seconds(3)));
  EXPECT_THAT(drain_causes_, ElementsAre(DrainCause::kBrokerLost));
  EXPECT_EQ(worker_->active_connections(), 1u);
  ExpectSameSocket(clients[0].client.get(), Delivered(1)->fd.get());
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

// --placement=kernel: connections the SDK accepts from a granted listener
// carry that listener's name, the client's address and the address it
// connected to (from the listener's own address unless that is a
// wildcard, then from the connection).
TEST_F(WorkerSdkTest, ConnectionsFromAGrantedListenerCarryTheirAddresses) {
  for (const char* bind : {"127.0.0.1:0", "0.0.0.0:0"}) {
    SCOPED_TRACE(bind);
    broker_ = std::make_unique<FakeBroker>();
    delivered_.clear();
    Register(DefaultOptions());
    absl::StatusOr<wire::SocketAddress> address =
        wire::SocketAddress::Parse(bind);
    ASSERT_TRUE(address.ok());
    wire::UniqueFd listener(
        ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    ASSERT_EQ(::bind(listener.get(), address->addr(), address->length), 0);
    ASSERT_EQ(::listen(listener.get(), 16), 0);
    absl::StatusOr<wire::SocketAddress> bound =
        wire::SocketAddress::Of(listener.get());
    ASSERT_TRUE(bound.ok());
    HandoffMessage grant;
    grant.mutable_listener_grant()->set_listener(bound->ToString());
    ASSERT_TRUE(broker_->Send(grant, listener.get()).ok());

    absl::StatusOr<wire::UniqueFd> client =
        testing::ConnectTcp("127.0.0.1", bound->port());
    ASSERT_TRUE(client.ok()) << client.status();
    ASSERT_TRUE(PumpUntil([&] { return !delivered_.empty(); }));
    ClientConnection& connection = delivered_[0];
    EXPECT_NE(connection.id & wire::kWorkerAcceptedIdBit, 0u);
    EXPECT_EQ(connection.listener, bound->ToString());
    EXPECT_EQ(connection.local_address,
              absl::StrCat("127.0.0.1:", bound->port()));
    absl::StatusOr<wire::SocketAddress> client_address =
        wire::SocketAddress::Of(client->get());
    ASSERT_TRUE(client_address.ok());
    EXPECT_EQ(connection.peer_address, client_address->ToString());
    EXPECT_EQ(worker_->active_connections(), 1u);
    worker_->ConnectionClosed(connection.id);
    EXPECT_EQ(worker_->active_connections(), 0u);
    worker_.reset();
  }
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

TEST_F(WorkerSdkTest, ConnectionBatchIsDeliveredAndAckedTogether) {
  Register(DefaultOptions());
  std::vector<FakeClient> clients;
  std::vector<int> fds;
  for (int i = 0; i < 3; ++i) {
    clients.push_back(MakeFakeClient());
    fds.push_back(clients.back().broker_end.get());
  }
  ASSERT_TRUE(broker_->SendConnectionBatch({11, 12, 13}, fds).ok());
  ASSERT_TRUE(PumpUntil([&] { return delivered_.size() == 3; }));
  absl::StatusOr<HandoffMessage> ack = broker_->Receive();
  ASSERT_TRUE(ack.ok() && ack->has_ack()) << ack.status();
  EXPECT_THAT(Ids(ack->ack().connection_ids()), ElementsAre(11u, 12u, 13u));
  // Connection i got fd i: bytes from client i arrive on it.
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(delivered_[i].id, 11 + i);
    EXPECT_EQ(delivered_[i].peer_address,
              absl::StrCat("192.0.2.1:", 40011 + i));
    const char byte = static_cast<char>('a' + i);
    ASSERT_EQ(::write(clients[i].client.get(), &byte, 1), 1);
    char got = 0;
    ASSERT_EQ(::read(delivered_[i].fd.get(), &got, 1), 1);
    EXPECT_EQ(got, byte);
  }
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

// Protocol 1.4: a connection the application cut unfinished (its drain
// deadline) is reported in Closed.cut_connection_ids, so the broker counts
// it lost; the others in the same report as ordinary closes.
TEST_F(WorkerSdkTest, CutConnectionsAreReportedAsCut) {
  Register(DefaultOptions());
  std::vector<FakeClient> clients;
  DeliverConnections({1, 2}, clients);
  worker_->ConnectionClosed(1);
  worker_->ConnectionCut(2);
  EXPECT_EQ(worker_->active_connections(), 0u);
  absl::StatusOr<HandoffMessage> closed = PumpAndReceive();
  ASSERT_TRUE(closed.ok()) << closed.status();
  ASSERT_TRUE(closed->has_closed()) << closed->DebugString();
  EXPECT_THAT(Ids(closed->closed().connection_ids()), ElementsAre(1u));
  EXPECT_THAT(Ids(closed->closed().cut_connection_ids()), ElementsAre(2u));
}

// §3.1: a Connection that arrives while the worker has no free fd slot
// (MSG_CTRUNC, no fd) is rejected and the channel stays; before, the
// channel was closed as for a protocol error.
TEST_F(WorkerSdkTest, OutOfFdsAConnectionIsRejectedAndTheChannelStays) {
  if (wire::kSanitized) {
    GTEST_SKIP() << "a sanitized process out of fds reports false errors "
                    "(wire/sanitized.h); the plain build runs this";
  }
  Register(DefaultOptions());
  FakeClient client = MakeFakeClient();
  ASSERT_TRUE(broker_->SendConnection(7, client.broker_end.get()).ok());
  {
    ::fdbroker::testing::FdTableFull full;
    ASSERT_TRUE(full.ok());
    worker_->ProcessEvents();
  }
  absl::StatusOr<HandoffMessage> reject = PumpAndReceive();
  ASSERT_TRUE(reject.ok()) << reject.status();
  ASSERT_TRUE(reject->has_reject()) << reject->DebugString();
  EXPECT_THAT(Ids(reject->reject().connection_ids()), ElementsAre(7u));
  EXPECT_THAT(reject->reject().reason(), HasSubstr("out of file descriptors"));
  EXPECT_TRUE(delivered_.empty());
  // Still registered on the same channel: the next one is acked.
  FakeClient next = MakeFakeClient();
  ASSERT_TRUE(broker_->SendConnection(8, next.broker_end.get()).ok());
  ASSERT_TRUE(PumpUntil([&] { return delivered_.size() == 1; }));
  absl::StatusOr<HandoffMessage> ack = PumpAndReceive();
  ASSERT_TRUE(ack.ok() && ack->has_ack()) << ack.status();
  EXPECT_THAT(Ids(ack->ack().connection_ids()), ElementsAre(8u));
}

// A Closed report waits (at most a few ms) for the next Ack and goes just
// before it: the broker reads both in one wake-up.
TEST_F(WorkerSdkTest, ClosedTravelsWithTheNextAck) {
  Register(DefaultOptions());
  std::vector<FakeClient> clients;
  DeliverConnections({1, 2}, clients);
  worker_->ConnectionClosed(1);
  clients.push_back(MakeFakeClient());
  ASSERT_TRUE(broker_->SendConnection(3, clients.back().broker_end.get()).ok());
  absl::StatusOr<HandoffMessage> first = PumpAndReceive();
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_TRUE(first->has_closed()) << first->DebugString();
  EXPECT_THAT(Ids(first->closed().connection_ids()), ElementsAre(1u));
  absl::StatusOr<HandoffMessage> second = PumpAndReceive();
  ASSERT_TRUE(second.ok() && second->has_ack()) << second.status();
  EXPECT_THAT(Ids(second->ack().connection_ids()), ElementsAre(3u));
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

TEST_F(WorkerSdkTest, SilentBrokerIsDeclaredDeadAndConnectionsAreKept) {
  Options options = DefaultOptions();
  options.reconnect_timeout = absl::ZeroDuration();
  Register(std::move(options), /*interval_ms=*/20, /*timeout_ms=*/200);
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

TEST_F(WorkerSdkTest, SilentBrokerIsDeclaredDeadAndTheWorkerReRegisters) {
  Register(DefaultOptions(), /*interval_ms=*/20, /*timeout_ms=*/200);
  std::vector<FakeClient> clients;
  DeliverConnections({1}, clients);
  const absl::Time silent_since = absl::Now();
  // The broker says nothing; the worker gives up on this channel...
  ASSERT_TRUE(PumpUntil([&] { return !worker_->registered(); }));
  EXPECT_GE(absl::Now() - silent_since, absl::Milliseconds(150));
  EXPECT_TRUE(broker_->WaitForClose());
  // ... and registers again at the same socket (here: the same broker),
  // bringing its connection along. Nothing reached the application.
  absl::StatusOr<HandoffMessage> hello = PumpUntilReconnected();
  ASSERT_TRUE(hello.ok() && hello->has_hello()) << hello.status();
  ASSERT_EQ(hello->hello().owned_connections_size(), 1);
  EXPECT_EQ(hello->hello().owned_connections(0).connection_id(), 1u);
  EXPECT_FALSE(worker_->draining());
  EXPECT_TRUE(drain_causes_.empty());
  ASSERT_TRUE(broker_->SendWelcome(10000, 60000, /*worker_id=*/8).ok());
  ASSERT_TRUE(PumpUntil([&] { return worker_->registered(); }));
  EXPECT_EQ(worker_->worker_id(), 8u);
  EXPECT_EQ(worker_->active_connections(), 1u);
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

// reconnect_timeout = 0: losing the broker drains at once (the behaviour
// before re-registration existed).
TEST_F(WorkerSdkTest, WithoutReconnectBrokerCrashKeepsConnectionsAndDrains) {
  Options options = DefaultOptions();
  options.reconnect_timeout = absl::ZeroDuration();
  Register(std::move(options));
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
  // It never tried to reconnect.
  EXPECT_TRUE(
      absl::IsDeadlineExceeded(broker_->Accept(absl::Milliseconds(100))));
}

TEST_F(WorkerSdkTest, ChannelDeathBeforeAckClosesTheConnectionUndelivered) {
  Options options = DefaultOptions();
  options.reconnect_timeout = absl::ZeroDuration();
  Register(std::move(options));
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
  options.reconnect_timeout = absl::ZeroDuration();
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
// Full, a socket would be Rejected; a pipe is still the broker's protocol
// error (a Reject would only pass it on to the next worker).
TEST_F(WorkerSdkTest, PipeAtCapacityIsAProtocolErrorNotARejection) {
  Options options = DefaultOptions();
  options.capacity = 1;
  Register(std::move(options));
  std::vector<FakeClient> clients;
  DeliverConnections({1}, clients);
  int pipe_fds[2];
  ASSERT_EQ(::pipe2(pipe_fds, O_CLOEXEC), 0);
  wire::UniqueFd read_end(pipe_fds[0]);
  wire::UniqueFd write_end(pipe_fds[1]);
  ASSERT_TRUE(broker_->SendConnection(9, write_end.get()).ok());
  write_end.Reset();  // The worker's copy is the last writer.
  ASSERT_TRUE(PumpUntil([&] { return !worker_->registered(); }));
  absl::StatusOr<HandoffMessage> next = broker_->Receive();
  EXPECT_FALSE(next.ok()) << "not a Reject, the channel closes: "
                          << next->DebugString();
  pollfd p{read_end.get(), POLLIN, 0};
  ASSERT_EQ(::poll(&p, 1, 5000), 1);
  char byte;
  EXPECT_EQ(::read(read_end.get(), &byte, 1), 0) << "the pipe was not closed";
  EXPECT_EQ(worker_->active_connections(), 1u);
}

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
  ASSERT_TRUE(PumpUntil([&] { return !worker_->registered(); }));
  EXPECT_TRUE(broker_->WaitForClose());
  // Any fd that came with the bad message was closed, not delivered.
  EXPECT_TRUE(ReadsEof(spare.client.get()));
  EXPECT_EQ(delivered_.size(), 1u);
  EXPECT_EQ(worker_->active_connections(), 1u);
  // The worker registers again (the broker is still there), listing the
  // connection it kept; the application was never told to drain.
  absl::StatusOr<HandoffMessage> hello = PumpUntilReconnected();
  ASSERT_TRUE(hello.ok() && hello->has_hello()) << hello.status();
  ASSERT_EQ(hello->hello().owned_connections_size(), 1);
  EXPECT_EQ(hello->hello().owned_connections(0).connection_id(), 1u);
  EXPECT_TRUE(drain_causes_.empty());
  EXPECT_FALSE(worker_->draining());
  ASSERT_TRUE(broker_->SendWelcome().ok());
  ASSERT_TRUE(PumpUntil([&] { return worker_->registered(); }));
  worker_->ConnectionClosed(1);
  absl::StatusOr<HandoffMessage> closed = PumpAndReceive();
  ASSERT_TRUE(closed.ok() && closed->has_closed()) << closed.status();
  EXPECT_THAT(Ids(closed->closed().connection_ids()), ElementsAre(1u));
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
        // §3: the fd of a Connection is a client's stream socket. Anything
        // else is the broker's protocol error: closed, never delivered.
        MalformedCase{"ConnectionWithAPipe",
                      [](FakeBroker& broker, int) {
                        int pipe_fds[2];
                        ASSERT_EQ(::pipe2(pipe_fds, O_CLOEXEC), 0);
                        wire::UniqueFd read_end(pipe_fds[0]);
                        wire::UniqueFd write_end(pipe_fds[1]);
                        ASSERT_TRUE(
                            broker.SendConnection(9, read_end.get()).ok());
                      }},
        MalformedCase{"ConnectionWithAFile",
                      [](FakeBroker& broker, int) {
                        wire::UniqueFd file(
                            ::open("/dev/null", O_RDONLY | O_CLOEXEC));
                        ASSERT_TRUE(broker.SendConnection(9, file.get()).ok());
                      }},
        MalformedCase{
            "ConnectionWithAListeningSocket",
            [](FakeBroker& broker, int) {
              wire::UniqueFd listener(
                  ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
              sockaddr_in any{};
              any.sin_family = AF_INET;
              any.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
              ASSERT_EQ(::bind(listener.get(),
                               reinterpret_cast<sockaddr*>(&any), sizeof(any)),
                        0);
              ASSERT_EQ(::listen(listener.get(), 1), 0);
              ASSERT_TRUE(broker.SendConnection(9, listener.get()).ok());
            }},
        MalformedCase{
            "ConnectionWithADatagramSocket",
            [](FakeBroker& broker, int) {
              int pair[2];
              ASSERT_EQ(
                  ::socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, pair), 0);
              wire::UniqueFd a(pair[0]), b(pair[1]);
              ASSERT_TRUE(broker.SendConnection(9, a.get()).ok());
            }},
        // The socket of the batch's first entry closes with the pipe of the
        // second: nothing of a bad packet is delivered.
        MalformedCase{"BatchWithAPipe",
                      [](FakeBroker& broker, int fd) {
                        int pipe_fds[2];
                        ASSERT_EQ(::pipe2(pipe_fds, O_CLOEXEC), 0);
                        wire::UniqueFd read_end(pipe_fds[0]);
                        wire::UniqueFd write_end(pipe_fds[1]);
                        ASSERT_TRUE(broker
                                        .SendConnectionBatch(
                                            {9, 10}, {fd, read_end.get()})
                                        .ok());
                      }},
        MalformedCase{"ConnectionWithTwoFds",
                      [](FakeBroker& broker, int fd) {
                        HandoffMessage connection;
                        connection.mutable_connection()->set_connection_id(9);
                        ASSERT_TRUE(broker
                                        .SendRawPacket(
                                            WithSequence(connection,
                                                         broker.next_sequence())
                                                .SerializeAsString(),
                                            {fd, fd})
                                        .ok());
                      }},
        MalformedCase{"BatchWithMoreFdsThanEntries",
                      [](FakeBroker& broker, int fd) {
                        HandoffMessage batch;
                        for (uint64_t id : {9, 10}) {
                          batch.mutable_connection_batch()
                              ->add_connections()
                              ->set_connection_id(id);
                        }
                        ASSERT_TRUE(
                            broker
                                .SendRawPacket(
                                    WithSequence(batch, broker.next_sequence())
                                        .SerializeAsString(),
                                    {fd, fd, fd})
                                .ok());
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

// --- Losing the broker and re-registering -----------------------------------

// (a) The broker crashes while the application owns two connections (and one
// more is on its way, not acked yet); a new broker starts on the same path.
TEST_F(WorkerSdkTest, ReRegistersWithANewBrokerListingTheConnectionsItOwns) {
  Options options = DefaultOptions();
  options.capacity = 5;
  options.labels = {{"lang", "c++"}};
  Register(std::move(options));
  std::vector<FakeClient> clients;
  DeliverConnections({1, 2}, clients);
  // Connection 3 is queued behind the crash: never acked, so the worker
  // closes its copy untouched (the dead broker's copy was the other one).
  FakeClient unacked = MakeFakeClient();
  ASSERT_TRUE(broker_->SendConnection(3, unacked.broker_end.get()).ok());
  unacked.broker_end.Reset();

  broker_->Restart();  // Crash; a new broker listens on the same path.
  const absl::Time lost_at = absl::Now();
  absl::StatusOr<HandoffMessage> hello = PumpUntilReconnected();
  ASSERT_TRUE(hello.ok()) << hello.status();
  ASSERT_TRUE(hello->has_hello()) << hello->DebugString();
  // First retry after about 50 ms, not at once and not seconds later.
  EXPECT_GE(absl::Now() - lost_at, absl::Milliseconds(40));
  EXPECT_LT(absl::Now() - lost_at, absl::Seconds(2));
  EXPECT_EQ(hello->sequence(), 1u);  // A new channel counts from 1.
  EXPECT_EQ(hello->hello().version().major(), 1u);
  EXPECT_EQ(hello->hello().pid(), ::getpid());
  EXPECT_EQ(hello->hello().capacity(), 5u);
  EXPECT_THAT(hello->hello().labels(), ElementsAre(Pair("lang", "c++")));
  std::vector<std::pair<uint64_t, std::string>> owned;
  for (const v1::OwnedConnection& c : hello->hello().owned_connections()) {
    owned.emplace_back(c.connection_id(), c.peer_address());
  }
  EXPECT_THAT(owned, UnorderedElementsAre(Pair(1u, "192.0.2.1:40001"),
                                          Pair(2u, "192.0.2.1:40002")));
  EXPECT_TRUE(ReadsEof(unacked.client.get()));
  EXPECT_EQ(delivered_.size(), 2u);
  EXPECT_FALSE(worker_->registered());
  EXPECT_FALSE(worker_->draining());

  ASSERT_TRUE(broker_
                  ->SendWelcome(/*heartbeat_interval_ms=*/50,
                                /*heartbeat_timeout_ms=*/60000,
                                /*worker_id=*/8)
                  .ok());
  ASSERT_TRUE(PumpUntil([&] { return worker_->registered(); }));
  EXPECT_EQ(worker_->worker_id(), 8u);
  EXPECT_FALSE(worker_->draining());
  EXPECT_FALSE(worker_->finished());
  EXPECT_EQ(worker_->active_connections(), 2u);

  // The adopted connections never noticed.
  for (uint64_t id : {1u, 2u}) {
    ASSERT_EQ(::write(clients[id - 1].client.get(), "x", 1), 1);
    char byte;
    EXPECT_EQ(::read(Delivered(id)->fd.get(), &byte, 1), 1);
  }
  // New connections come from the new broker, with its ids.
  DeliverConnections({10}, clients);
  EXPECT_EQ(worker_->active_connections(), 3u);
  // Closing an adopted connection is reported to the new broker.
  worker_->ConnectionClosed(1);
  absl::StatusOr<HandoffMessage> closed = PumpAndReceive();
  ASSERT_TRUE(closed.ok() && closed->has_closed()) << closed.status();
  EXPECT_THAT(Ids(closed->closed().connection_ids()), ElementsAre(1u));
  // Heartbeats follow the new Welcome (50 ms instead of 10 s).
  absl::StatusOr<HandoffMessage> heartbeat = PumpAndReceive(true);
  ASSERT_TRUE(heartbeat.ok() && heartbeat->has_heartbeat())
      << heartbeat.status();
  EXPECT_TRUE(drain_causes_.empty());

  // A new broker's Drain still works as usual.
  ASSERT_TRUE(broker_->SendDrain(absl::InfiniteFuture()).ok());
  ASSERT_TRUE(PumpUntil([&] { return !drain_causes_.empty(); }));
  EXPECT_THAT(drain_causes_, ElementsAre(DrainCause::kBrokerRequest));
  worker_->ConnectionClosed(2);
  worker_->ConnectionClosed(10);
  ASSERT_TRUE(PumpUntil([&] { return worker_->finished(); }));
  std::vector<uint64_t> last_closed;
  for (;;) {
    absl::StatusOr<HandoffMessage> message = broker_->Receive();
    ASSERT_TRUE(message.ok()) << message.status();
    if (message->has_goodbye()) break;
    for (uint64_t id : message->closed().connection_ids()) {
      last_closed.push_back(id);
    }
  }
  EXPECT_THAT(last_closed, UnorderedElementsAre(2u, 10u));
}

// A broker that supervised the worker (Welcome.supervised) makes the next
// re-registration say so (Hello.was_supervised), so that the new broker
// adopts it into its pool; the latest Welcome decides.
TEST_F(WorkerSdkTest, ReRegistrationSaysWhetherTheWorkerWasSupervised) {
  Options options = DefaultOptions();
  auto connecting = std::async(std::launch::async, [&options] {
    return Worker::Connect(std::move(options));
  });
  ASSERT_TRUE(broker_->Accept().ok());
  absl::StatusOr<HandoffMessage> hello = broker_->Receive();
  ASSERT_TRUE(hello.ok() && hello->has_hello()) << hello.status();
  EXPECT_FALSE(hello->hello().was_supervised());
  ASSERT_TRUE(broker_->SendWelcome(10000, 60000, 7, /*supervised=*/true).ok());
  absl::StatusOr<std::unique_ptr<Worker>> worker = connecting.get();
  ASSERT_TRUE(worker.ok()) << worker.status();
  worker_ = *std::move(worker);

  broker_->Restart();
  hello = PumpUntilReconnected();
  ASSERT_TRUE(hello.ok() && hello->has_hello()) << hello.status();
  EXPECT_TRUE(hello->hello().was_supervised());
  ASSERT_TRUE(broker_->SendWelcome(10000, 60000, 8, /*supervised=*/false).ok());
  ASSERT_TRUE(PumpUntil([&] { return worker_->registered(); }));

  broker_->Restart();
  hello = PumpUntilReconnected();
  ASSERT_TRUE(hello.ok() && hello->has_hello()) << hello.status();
  EXPECT_FALSE(hello->hello().was_supervised());
}

// (b) A connection closed while no broker is there is simply forgotten.
TEST_F(WorkerSdkTest, ConnectionClosedWhileDisconnectedIsNotReRegistered) {
  Register(DefaultOptions());
  std::vector<FakeClient> clients;
  DeliverConnections({1, 2}, clients);
  broker_->CloseChannel();
  broker_->StopListening();
  ASSERT_TRUE(PumpUntil([&] { return !worker_->registered(); }));
  worker_->ConnectionClosed(1);
  EXPECT_EQ(worker_->active_connections(), 1u);
  // A few attempts fail while nobody listens (back-off); then a broker.
  PumpUntil([] { return false; }, absl::Milliseconds(200));
  broker_->Listen();
  absl::StatusOr<HandoffMessage> hello = PumpUntilReconnected();
  ASSERT_TRUE(hello.ok() && hello->has_hello()) << hello.status();
  ASSERT_EQ(hello->hello().owned_connections_size(), 1);
  EXPECT_EQ(hello->hello().owned_connections(0).connection_id(), 2u);
  ASSERT_TRUE(broker_->SendWelcome().ok());
  ASSERT_TRUE(PumpUntil([&] { return worker_->registered(); }));
  // The new broker never hears of connection 1.
  worker_->ConnectionClosed(2);
  absl::StatusOr<HandoffMessage> closed = PumpAndReceive();
  ASSERT_TRUE(closed.ok() && closed->has_closed()) << closed.status();
  EXPECT_THAT(Ids(closed->closed().connection_ids()), ElementsAre(2u));
  EXPECT_TRUE(drain_causes_.empty());
}

// A connection closed after the Hello that lists it went out, before the
// Welcome: the new broker counts it, so it is told once registered.
TEST_F(WorkerSdkTest, ConnectionClosedBeforeTheWelcomeIsReportedAfterIt) {
  Register(DefaultOptions());
  std::vector<FakeClient> clients;
  DeliverConnections({1, 2}, clients);
  broker_->Restart();
  absl::StatusOr<HandoffMessage> hello = PumpUntilReconnected();
  ASSERT_TRUE(hello.ok() && hello->has_hello()) << hello.status();
  ASSERT_EQ(hello->hello().owned_connections_size(), 2);
  worker_->ConnectionClosed(2);
  worker_->ProcessEvents();
  ASSERT_TRUE(broker_->SendWelcome().ok());
  absl::StatusOr<HandoffMessage> closed = PumpAndReceive();
  ASSERT_TRUE(closed.ok() && closed->has_closed()) << closed.status();
  EXPECT_THAT(Ids(closed->closed().connection_ids()), ElementsAre(2u));
  EXPECT_TRUE(worker_->registered());
}

// An attempt whose broker goes away before its Welcome fails; the next one,
// to the next broker, lists the connections again.
TEST_F(WorkerSdkTest, AttemptThatEndsBeforeTheWelcomeIsRetried) {
  Register(DefaultOptions());
  std::vector<FakeClient> clients;
  DeliverConnections({4}, clients);
  broker_->Restart();
  absl::StatusOr<HandoffMessage> hello = PumpUntilReconnected();
  ASSERT_TRUE(hello.ok() && hello->has_hello()) << hello.status();
  broker_->Restart();  // This one dies too, without answering.
  hello = PumpUntilReconnected();
  ASSERT_TRUE(hello.ok() && hello->has_hello()) << hello.status();
  ASSERT_EQ(hello->hello().owned_connections_size(), 1);
  EXPECT_EQ(hello->hello().owned_connections(0).connection_id(), 4u);
  ASSERT_TRUE(broker_->SendWelcome(10000, 60000, 9).ok());
  ASSERT_TRUE(PumpUntil([&] { return worker_->registered(); }));
  EXPECT_EQ(worker_->worker_id(), 9u);
  EXPECT_TRUE(drain_causes_.empty());
}

// (c) No broker comes back within reconnect_timeout: drain, then finish.
TEST_F(WorkerSdkTest, NoBrokerWithinReconnectTimeoutDrains) {
  Options options = DefaultOptions();
  options.reconnect_timeout = absl::Milliseconds(300);
  Register(std::move(options));
  std::vector<FakeClient> clients;
  DeliverConnections({1}, clients);
  broker_->CloseChannel();
  broker_->StopListening();
  const absl::Time lost_at = absl::Now();
  ASSERT_TRUE(PumpUntil([&] { return !worker_->registered(); }));
  EXPECT_FALSE(worker_->draining());
  ASSERT_TRUE(PumpUntil([&] { return !drain_causes_.empty(); }));
  EXPECT_GE(absl::Now() - lost_at, absl::Milliseconds(250));
  EXPECT_THAT(drain_causes_, ElementsAre(DrainCause::kBrokerLost));
  EXPECT_EQ(drain_deadline_, absl::InfiniteFuture());
  EXPECT_TRUE(worker_->draining());
  EXPECT_FALSE(worker_->finished());
  // The connection is still served until the application closes it.
  ASSERT_EQ(::write(clients[0].client.get(), "x", 1), 1);
  char byte;
  EXPECT_EQ(::read(Delivered(1)->fd.get(), &byte, 1), 1);
  worker_->ConnectionClosed(1);
  EXPECT_TRUE(PumpUntil([&] { return worker_->finished(); }));
  EXPECT_THAT(drain_causes_, ElementsAre(DrainCause::kBrokerLost));
  // And it does not try again.
  broker_->Listen();
  PumpUntil([] { return false; }, absl::Milliseconds(100));
  EXPECT_TRUE(
      absl::IsDeadlineExceeded(broker_->Accept(absl::Milliseconds(50))));
}

// Nothing owned and no broker: not finished while it still tries.
TEST_F(WorkerSdkTest, IdleWorkerKeepsTryingUntilTheTimeout) {
  Options options = DefaultOptions();
  options.reconnect_timeout = absl::Milliseconds(300);
  Register(std::move(options));
  broker_->CloseChannel();
  broker_->StopListening();
  ASSERT_TRUE(PumpUntil([&] { return !worker_->registered(); }));
  EXPECT_FALSE(worker_->finished());
  EXPECT_TRUE(PumpUntil([&] { return worker_->finished(); }));
  EXPECT_THAT(drain_causes_, ElementsAre(DrainCause::kBrokerLost));
}

// (d) The new broker refuses the re-registration: drain.
TEST_F(WorkerSdkTest, RefusedReRegistrationDrains) {
  Register(DefaultOptions());
  std::vector<FakeClient> clients;
  DeliverConnections({1}, clients);
  broker_->Restart();
  absl::StatusOr<HandoffMessage> hello = PumpUntilReconnected();
  ASSERT_TRUE(hello.ok() && hello->has_hello()) << hello.status();
  ASSERT_TRUE(broker_
                  ->SendRefusal(v1::REFUSAL_REASON_TOO_MANY_WORKERS,
                                "already 2 workers")
                  .ok());
  broker_->CloseChannel();
  ASSERT_TRUE(PumpUntil([&] { return !drain_causes_.empty(); }));
  EXPECT_THAT(drain_causes_, ElementsAre(DrainCause::kBrokerLost));
  EXPECT_TRUE(worker_->draining());
  EXPECT_FALSE(worker_->registered());
  EXPECT_FALSE(worker_->finished());
  worker_->ConnectionClosed(1);
  EXPECT_TRUE(PumpUntil([&] { return worker_->finished(); }));
  // No further attempt.
  EXPECT_TRUE(
      absl::IsDeadlineExceeded(broker_->Accept(absl::Milliseconds(100))));
}

// A worker the broker was draining when it died does not come back.
TEST_F(WorkerSdkTest, DrainingWorkerDoesNotReRegister) {
  Register(DefaultOptions());
  std::vector<FakeClient> clients;
  DeliverConnections({1}, clients);
  ASSERT_TRUE(broker_->SendDrain(absl::InfiniteFuture()).ok());
  ASSERT_TRUE(PumpUntil([&] { return !drain_causes_.empty(); }));
  broker_->CloseChannel();
  ASSERT_TRUE(PumpUntil([&] { return !worker_->registered(); }));
  EXPECT_THAT(drain_causes_, ElementsAre(DrainCause::kBrokerRequest));
  PumpUntil([] { return false; }, absl::Milliseconds(150));
  EXPECT_TRUE(
      absl::IsDeadlineExceeded(broker_->Accept(absl::Milliseconds(50))));
  worker_->ConnectionClosed(1);
  EXPECT_TRUE(PumpUntil([&] { return worker_->finished(); }));
}

// StartDrain() while reconnecting stops reconnecting.
TEST_F(WorkerSdkTest, LocalDrainWhileReconnectingStopsReconnecting) {
  Register(DefaultOptions());
  std::vector<FakeClient> clients;
  DeliverConnections({1}, clients);
  broker_->CloseChannel();
  broker_->StopListening();
  ASSERT_TRUE(PumpUntil([&] { return !worker_->registered(); }));
  worker_->StartDrain();
  ASSERT_TRUE(PumpUntil([&] { return !drain_causes_.empty(); }));
  EXPECT_THAT(drain_causes_, ElementsAre(DrainCause::kLocal));
  broker_->Listen();
  PumpUntil([] { return false; }, absl::Milliseconds(150));
  EXPECT_TRUE(
      absl::IsDeadlineExceeded(broker_->Accept(absl::Milliseconds(50))));
  worker_->ConnectionClosed(1);
  EXPECT_TRUE(PumpUntil([&] { return worker_->finished(); }));
}

// The new broker offers an id the worker already owns: a protocol error,
// as with any broker (here it leads to the next re-registration).
TEST_F(WorkerSdkTest, NewBrokerOfferingAnOwnedIdIsAProtocolError) {
  Register(DefaultOptions());
  std::vector<FakeClient> clients;
  DeliverConnections({1}, clients);
  broker_->Restart();
  ASSERT_TRUE(PumpUntilReconnected().ok());
  ASSERT_TRUE(broker_->SendWelcome().ok());
  ASSERT_TRUE(PumpUntil([&] { return worker_->registered(); }));
  FakeClient clash = MakeFakeClient();
  ASSERT_TRUE(broker_->SendConnection(1, clash.broker_end.get()).ok());
  clash.broker_end.Reset();
  ASSERT_TRUE(PumpUntil([&] { return !worker_->registered(); }));
  EXPECT_TRUE(ReadsEof(clash.client.get()));
  EXPECT_EQ(delivered_.size(), 1u);
  EXPECT_TRUE(broker_->WaitForClose());
  absl::StatusOr<HandoffMessage> hello = PumpUntilReconnected();
  ASSERT_TRUE(hello.ok() && hello->has_hello()) << hello.status();
  ASSERT_EQ(hello->hello().owned_connections_size(), 1);
  EXPECT_TRUE(drain_causes_.empty());
}

// A Hello listing every owned connection must still fit in one packet
// (64 KiB): the peer addresses of the lowest ids are left out first.
TEST_F(WorkerSdkTest, OversizedReRegistrationHelloDropsPeerAddressesFirst) {
  Register(DefaultOptions());
  constexpr int kCount = 80;
  const std::string long_peer(1000, 'p');  // 80 KB of addresses in all.
  std::vector<FakeClient> clients;
  for (uint64_t id = 1; id <= kCount; ++id) {
    clients.push_back(MakeFakeClient());
    HandoffMessage message;
    message.mutable_connection()->set_connection_id(id);
    message.mutable_connection()->set_peer_address(
        absl::StrCat(id, "-", long_peer));
    ASSERT_TRUE(
        broker_->Send(std::move(message), clients.back().broker_end.get())
            .ok());
    clients.back().broker_end.Reset();
  }
  ASSERT_TRUE(PumpUntil([&] { return delivered_.size() == kCount; }));
  broker_->Restart();
  absl::StatusOr<HandoffMessage> hello = PumpUntilReconnected();
  ASSERT_TRUE(hello.ok() && hello->has_hello()) << hello.status();
  EXPECT_LE(hello->ByteSizeLong(), 64u * 1024);
  ASSERT_EQ(hello->hello().owned_connections_size(), kCount);
  int with_peer = 0;
  uint64_t lowest_with_peer = 0;
  for (int i = 0; i < kCount; ++i) {
    const v1::OwnedConnection& c = hello->hello().owned_connections(i);
    EXPECT_EQ(c.connection_id(), static_cast<uint64_t>(i + 1));
    if (c.peer_address().empty()) {
      EXPECT_EQ(with_peer, 0) << "a lower id kept its address, id " << i + 1;
    } else {
      if (with_peer++ == 0) lowest_with_peer = c.connection_id();
      EXPECT_EQ(c.peer_address(), absl::StrCat(i + 1, "-", long_peer));
    }
  }
  EXPECT_GT(with_peer, 40);
  EXPECT_GT(lowest_with_peer, 1u);
  ASSERT_TRUE(broker_->SendWelcome().ok());
  ASSERT_TRUE(PumpUntil([&] { return worker_->registered(); }));
  // Every listed connection's close is reported.
  worker_->ConnectionClosed(1);
  absl::StatusOr<HandoffMessage> closed = PumpAndReceive();
  ASSERT_TRUE(closed.ok() && closed->has_closed()) << closed.status();
  EXPECT_THAT(Ids(closed->closed().connection_ids()), ElementsAre(1u));
}

// When even ids alone do not fit, the lowest ids are left out; the highest
// stays listed, and closes of the unlisted ones are not reported. (Huge
// labels leave little room, so a few hundred connections are enough.)
TEST_F(WorkerSdkTest, OversizedReRegistrationHelloLeavesOutTheLowestIds) {
  Options options = DefaultOptions();
  options.labels["big"] = std::string(63500, 'l');
  Register(std::move(options));
  constexpr uint64_t kCount = 250;
  std::vector<FakeClient> clients;
  for (uint64_t id = 1; id <= kCount; ++id) {
    clients.push_back(MakeFakeClient());
    ASSERT_TRUE(
        broker_->SendConnection(id, clients.back().broker_end.get()).ok());
    clients.back().broker_end.Reset();
    clients.back().client.Reset();  // Not needed: keeps the fd count low.
  }
  ASSERT_TRUE(PumpUntil([&] { return delivered_.size() == kCount; }));
  broker_->Restart();
  absl::StatusOr<HandoffMessage> hello = PumpUntilReconnected();
  ASSERT_TRUE(hello.ok() && hello->has_hello()) << hello.status();
  EXPECT_LE(hello->ByteSizeLong(), 64u * 1024);
  const auto& listed = hello->hello().owned_connections();
  ASSERT_GT(listed.size(), 100);
  ASSERT_LT(listed.size(), static_cast<int>(kCount));
  // A contiguous run of the highest ids, without addresses.
  const uint64_t lowest = kCount - listed.size() + 1;
  for (int i = 0; i < listed.size(); ++i) {
    EXPECT_EQ(listed[i].connection_id(), lowest + i);
    EXPECT_EQ(listed[i].peer_address(), "");
  }
  ASSERT_TRUE(broker_->SendWelcome().ok());
  ASSERT_TRUE(PumpUntil([&] { return worker_->registered(); }));
  EXPECT_EQ(worker_->active_connections(), kCount);
  worker_->ConnectionClosed(1);  // Unknown to this broker: not reported.
  worker_->ConnectionClosed(kCount);
  absl::StatusOr<HandoffMessage> closed = PumpAndReceive();
  ASSERT_TRUE(closed.ok() && closed->has_closed()) << closed.status();
  EXPECT_THAT(Ids(closed->closed().connection_ids()), ElementsAre(kCount));
  EXPECT_EQ(worker_->active_connections(), kCount - 2);
}

// Thread-per-connection mode: handlers keep running through the loss, the
// worker re-registers, and new connections get threads.
TEST_F(WorkerSdkTest, ThreadPerConnectionReRegistersAfterBrokerLoss) {
  Options options = DefaultOptions();
  options.on_connection = nullptr;
  Register(std::move(options));
  // Echoes bytes until the client leaves.
  Worker::ConnectionHandler handler = [](ClientConnection connection) {
    char byte;
    while (::read(connection.fd.get(), &byte, 1) == 1) {
      if (::write(connection.fd.get(), &byte, 1) != 1) return;
    }
  };
  std::thread serving(
      [&] { EXPECT_TRUE(worker_->ServeThreadPerConnection(handler).ok()); });
  const auto echo = [](int fd, char c) {
    char back = 0;
    return ::write(fd, &c, 1) == 1 && ::read(fd, &back, 1) == 1 && back == c;
  };
  FakeClient first = MakeFakeClient();
  ASSERT_TRUE(broker_->SendConnection(1, first.broker_end.get()).ok());
  first.broker_end.Reset();
  absl::StatusOr<HandoffMessage> ack = broker_->Receive();
  ASSERT_TRUE(ack.ok() && ack->has_ack()) << ack.status();
  EXPECT_TRUE(echo(first.client.get(), 'a'));

  broker_->Restart();
  EXPECT_TRUE(echo(first.client.get(), 'b'));  // Served while disconnected.
  ASSERT_TRUE(broker_->Accept().ok());
  absl::StatusOr<HandoffMessage> hello = broker_->Receive();
  ASSERT_TRUE(hello.ok() && hello->has_hello()) << hello.status();
  ASSERT_EQ(hello->hello().owned_connections_size(), 1);
  EXPECT_EQ(hello->hello().owned_connections(0).connection_id(), 1u);
  ASSERT_TRUE(broker_->SendWelcome(10000, 60000, 8).ok());
  EXPECT_TRUE(WaitFor([&] { return worker_->registered(); }, absl::Seconds(5)));

  // The new broker reuses id 2... and 1 once it is closed.
  FakeClient second = MakeFakeClient();
  ASSERT_TRUE(broker_->SendConnection(2, second.broker_end.get()).ok());
  second.broker_end.Reset();
  ack = broker_->Receive();
  ASSERT_TRUE(ack.ok() && ack->has_ack()) << ack.status();
  EXPECT_TRUE(echo(second.client.get(), 'c'));
  first.client.Reset();
  absl::StatusOr<HandoffMessage> closed = broker_->Receive();
  ASSERT_TRUE(closed.ok() && closed->has_closed()) << closed.status();
  EXPECT_THAT(Ids(closed->closed().connection_ids()), ElementsAre(1u));
  FakeClient again = MakeFakeClient();
  ASSERT_TRUE(broker_->SendConnection(1, again.broker_end.get()).ok());
  again.broker_end.Reset();
  ack = broker_->Receive();
  ASSERT_TRUE(ack.ok() && ack->has_ack()) << ack.status();
  EXPECT_TRUE(echo(again.client.get(), 'd'));

  second.client.Reset();
  again.client.Reset();
  std::vector<uint64_t> closed_ids;
  while (closed_ids.size() < 2) {
    absl::StatusOr<HandoffMessage> message = broker_->Receive();
    ASSERT_TRUE(message.ok() && message->has_closed()) << message.status();
    closed_ids.insert(closed_ids.end(),
                      message->closed().connection_ids().begin(),
                      message->closed().connection_ids().end());
  }
  EXPECT_THAT(closed_ids, UnorderedElementsAre(1u, 2u));
  ASSERT_TRUE(broker_->SendDrain(absl::InfiniteFuture()).ok());
  absl::StatusOr<HandoffMessage> goodbye = broker_->Receive();
  ASSERT_TRUE(goodbye.ok() && goodbye->has_goodbye()) << goodbye.status();
  serving.join();
  EXPECT_THAT(drain_causes_, ElementsAre(DrainCause::kBrokerRequest));
}

// Thread-per-connection mode, no broker comes back: handlers finish, then
// ServeThreadPerConnection() returns.
TEST_F(WorkerSdkTest, ThreadPerConnectionGivesUpAfterReconnectTimeout) {
  Options options = DefaultOptions();
  options.on_connection = nullptr;
  options.reconnect_timeout = absl::Milliseconds(200);
  Register(std::move(options));
  Worker::ConnectionHandler handler = [](ClientConnection connection) {
    char byte;
    while (::read(connection.fd.get(), &byte, 1) == 1) {
    }
  };
  std::promise<void> returned;
  std::thread serving([&] {
    EXPECT_TRUE(worker_->ServeThreadPerConnection(handler).ok());
    returned.set_value();
  });
  FakeClient client = MakeFakeClient();
  ASSERT_TRUE(broker_->SendConnection(1, client.broker_end.get()).ok());
  client.broker_end.Reset();
  ASSERT_TRUE(broker_->Receive().ok());  // Ack.
  broker_->CloseChannel();
  broker_->StopListening();
  EXPECT_TRUE(WaitFor([&] { return worker_->draining(); }, absl::Seconds(5)));
  // Still serving its connection.
  EXPECT_EQ(returned.get_future().wait_for(std::chrono::milliseconds(50)),
            std::future_status::timeout);
  client.client.Reset();
  serving.join();
  EXPECT_TRUE(worker_->finished());
  EXPECT_THAT(drain_causes_, ElementsAre(DrainCause::kBrokerLost));
}

// --- Releasing connections (migration) ---------------------------------------

// (A ReleaseRequest to such a worker is a protocol error: the kit's
// error-release-request, run by conformance_cpp_http_worker_no_release.)
TEST_F(WorkerSdkTest, HelloSupportsReleaseOnlyWithTheHandler) {
  Register(DefaultOptions());
  EXPECT_FALSE(hello_.supports_release());
  std::vector<FakeClient> clients;
  DeliverConnections({1}, clients);
  // Without the handler: Release() is refused and the fd stays ours.
  absl::Status released =
      worker_->Release(1, delivered_[0].fd, "", ReleaseReason::kRebalance);
  EXPECT_TRUE(absl::IsFailedPrecondition(released)) << released;
  EXPECT_TRUE(delivered_[0].fd.valid());
  EXPECT_EQ(worker_->active_connections(), 1u);
}

TEST_F(WorkerSdkTest, HelloSupportsReleaseWithTheHandler) {
  Register(ReleasingOptions());
  EXPECT_TRUE(hello_.supports_release());
}

TEST_F(WorkerSdkTest, ReleaseRequestGivesTheSameSocketsBackWithoutClosed) {
  Options options = ReleasingOptions();
  // The application releases from inside the callback, the usual way.
  options.on_release_request = [this](uint32_t max_connections,
                                      ReleaseReason reason) {
    release_requests_.emplace_back(max_connections, reason);
    for (ClientConnection& connection : delivered_) {
      if (max_connections == 0) break;
      if (connection.id == 3) continue;  // Busy, say.
      std::string unread = connection.id == 1 ? "GET /next HTTP/1.1\r\n" : "";
      ASSERT_TRUE(
          worker_
              ->Release(connection.id, connection.fd, std::move(unread), reason)
              .ok());
      EXPECT_FALSE(connection.fd.valid()) << "the SDK takes the fd";
      --max_connections;
    }
  };
  Register(std::move(options));
  std::vector<FakeClient> clients;
  DeliverConnections({1, 2, 3}, clients);

  ASSERT_TRUE(
      broker_->SendReleaseRequest(5, v1::RELEASE_REASON_REBALANCE).ok());
  std::vector<wire::UniqueFd> released;  // The broker's copies.
  for (uint64_t expected : {1u, 2u}) {
    wire::UniqueFd fd;
    absl::StatusOr<HandoffMessage> release = PumpAndReceiveFd(fd);
    ASSERT_TRUE(release.ok() && release->has_release()) << release.status();
    EXPECT_EQ(release->release().connection_id(), expected);
    EXPECT_EQ(release->release().reason(), v1::RELEASE_REASON_REBALANCE);
    EXPECT_EQ(release->release().unread_data(),
              expected == 1 ? "GET /next HTTP/1.1\r\n" : "");
    // The fd that came with it is the client's socket: the next owner reads
    // what the client writes.
    ASSERT_TRUE(fd.valid());
    ExpectSameSocket(clients[expected - 1].client.get(), fd.get());
    released.push_back(std::move(fd));
  }
  ASSERT_EQ(release_requests_.size(), 1u);
  EXPECT_EQ(release_requests_[0].first, 5u);
  EXPECT_EQ(release_requests_[0].second, ReleaseReason::kRebalance);
  EXPECT_EQ(worker_->active_connections(), 1u);
  // The worker closed its copies untouched (the broker's keep the sockets
  // open: no EOF, no shutdown).
  EXPECT_FALSE(ReadsEof(clients[0].client.get(), absl::Milliseconds(50)));
  EXPECT_FALSE(ReadsEof(clients[1].client.get(), absl::Milliseconds(50)));
  // Released ids are no longer ours: a second Release is NotFound, and a
  // drain sends Closed for the last connection only, then Goodbye.
  EXPECT_TRUE(absl::IsNotFound(
      worker_->Release(1, clients[0].client, "", ReleaseReason::kRebalance)));
  ASSERT_TRUE(clients[0].client.valid());
  worker_->StartDrain();
  worker_->ConnectionClosed(3);
  absl::StatusOr<HandoffMessage> closed = PumpAndReceive();
  ASSERT_TRUE(closed.ok() && closed->has_closed()) << closed.status();
  EXPECT_THAT(Ids(closed->closed().connection_ids()), ElementsAre(3u));
  absl::StatusOr<HandoffMessage> goodbye = broker_->Receive();
  ASSERT_TRUE(goodbye.ok() && goodbye->has_goodbye()) << goodbye.status();
  EXPECT_TRUE(PumpUntil([&] { return worker_->finished(); }));
}

TEST_F(WorkerSdkTest, DrainWithReleaseIdleReleasesThenSaysGoodbye) {
  Register(ReleasingOptions());
  std::vector<FakeClient> clients;
  DeliverConnections({1, 2}, clients);
  ASSERT_TRUE(broker_->SendDrain(absl::InfiniteFuture(), true).ok());
  ASSERT_TRUE(PumpUntil([&] { return !drain_causes_.empty(); }));
  EXPECT_THAT(drain_causes_, ElementsAre(DrainCause::kBrokerRequest));
  EXPECT_TRUE(release_on_drain_in_callback_);
  EXPECT_TRUE(worker_->release_on_drain());

  // Connection 1 is idle: released at once. Connection 2 was busy and is
  // released when its response is out. Goodbye follows the last one.
  ASSERT_TRUE(
      worker_->Release(1, Delivered(1)->fd, "", ReleaseReason::kDrain).ok());
  wire::UniqueFd fd;
  absl::StatusOr<HandoffMessage> release = PumpAndReceiveFd(fd);
  ASSERT_TRUE(release.ok() && release->has_release()) << release.status();
  EXPECT_EQ(release->release().connection_id(), 1u);
  EXPECT_EQ(release->release().reason(), v1::RELEASE_REASON_DRAIN);
  ExpectSameSocket(clients[0].client.get(), fd.get());
  // No Goodbye while connection 2 is ours.
  EXPECT_TRUE(absl::IsDeadlineExceeded(
      PumpAndReceive(false, absl::Milliseconds(200)).status()));
  ASSERT_TRUE(
      worker_->Release(2, Delivered(2)->fd, "", ReleaseReason::kDrain).ok());
  release = PumpAndReceiveFd(fd);
  ASSERT_TRUE(release.ok() && release->has_release()) << release.status();
  EXPECT_EQ(release->release().connection_id(), 2u);
  ExpectSameSocket(clients[1].client.get(), fd.get());
  absl::StatusOr<HandoffMessage> goodbye = PumpAndReceive();
  ASSERT_TRUE(goodbye.ok() && goodbye->has_goodbye()) << goodbye.status();
  EXPECT_TRUE(broker_->WaitForClose());
  EXPECT_TRUE(PumpUntil([&] { return worker_->finished(); }));
  EXPECT_FALSE(worker_->release_on_drain());
}

TEST_F(WorkerSdkTest, DrainWithoutReleaseIdleDoesNotRelease) {
  Register(ReleasingOptions());
  ASSERT_TRUE(broker_->SendDrain(absl::InfiniteFuture()).ok());
  ASSERT_TRUE(PumpUntil([&] { return !drain_causes_.empty(); }));
  EXPECT_FALSE(release_on_drain_in_callback_);
}

TEST_F(WorkerSdkTest, ReleaseWhileReconnectingFailsAndTheAppKeepsIt) {
  Register(ReleasingOptions());
  std::vector<FakeClient> clients;
  DeliverConnections({1}, clients);
  broker_->CloseChannel();
  ASSERT_TRUE(PumpUntil([&] { return !worker_->registered(); }));
  absl::Status released =
      worker_->Release(1, delivered_[0].fd, "", ReleaseReason::kRebalance);
  EXPECT_TRUE(absl::IsUnavailable(released)) << released;
  ASSERT_TRUE(delivered_[0].fd.valid());
  ExpectSameSocket(clients[0].client.get(), delivered_[0].fd.get());
  EXPECT_EQ(worker_->active_connections(), 1u);
  // Still listed when it registers again.
  absl::StatusOr<HandoffMessage> hello = PumpUntilReconnected();
  ASSERT_TRUE(hello.ok() && hello->has_hello()) << hello.status();
  ASSERT_EQ(hello->hello().owned_connections_size(), 1);
  EXPECT_TRUE(hello->hello().supports_release());
}

TEST_F(WorkerSdkTest, ReleaseThatFailsToSendLeavesTheFdWithTheCaller) {
  std::vector<FakeClient> clients;
  RegisterWithOneConnection(absl::ZeroDuration(), clients);
  flaky_sys_.fail_errno = EPIPE;
  absl::Status released =
      worker_->Release(1, delivered_[0].fd, "", ReleaseReason::kRebalance);
  EXPECT_TRUE(absl::IsUnavailable(released)) << released;
  ASSERT_TRUE(delivered_[0].fd.valid());
  ExpectSameSocket(clients[0].client.get(), delivered_[0].fd.get());
  EXPECT_EQ(worker_->active_connections(), 1u);
}

TEST_F(WorkerSdkTest, ReleaseRefusesUnreadDataOverTheProtocolLimit) {
  // protocol.md §5 Release: at most 65024 bytes; the broker would take more
  // for a protocol error (and the connection would be lost with the packet).
  std::vector<FakeClient> clients;
  RegisterWithOneConnection(absl::ZeroDuration(), clients);
  absl::Status released = worker_->Release(
      1, delivered_[0].fd, std::string(65025, 'x'), ReleaseReason::kRebalance);
  EXPECT_TRUE(absl::IsInvalidArgument(released)) << released;
  ASSERT_TRUE(delivered_[0].fd.valid());
  ExpectSameSocket(clients[0].client.get(), delivered_[0].fd.get());
  EXPECT_EQ(worker_->active_connections(), 1u);
  // Exactly the limit goes.
  wire::UniqueFd fd;
  ASSERT_TRUE(worker_
                  ->Release(1, delivered_[0].fd, std::string(65024, 'x'),
                            ReleaseReason::kRebalance)
                  .ok());
  absl::StatusOr<HandoffMessage> release = PumpAndReceiveFd(fd);
  ASSERT_TRUE(release.ok() && release->has_release()) << release.status();
  EXPECT_EQ(release->release().unread_data().size(), 65024u);
}

TEST_F(WorkerSdkTest, ReleaseThatWouldBlockGoesOutOnceWritable) {
  std::vector<FakeClient> clients;
  RegisterWithOneConnection(absl::Seconds(30), clients);
  flaky_sys_.fail_errno = EAGAIN;
  ASSERT_TRUE(
      worker_->Release(1, delivered_[0].fd, "abc", ReleaseReason::kRebalance)
          .ok());
  EXPECT_FALSE(delivered_[0].fd.valid());
  EXPECT_EQ(worker_->active_connections(), 1u) << "ours until it is sent";
  flaky_sys_.fail_errno = 0;
  wire::UniqueFd fd;
  absl::StatusOr<HandoffMessage> release = PumpAndReceiveFd(fd);
  ASSERT_TRUE(release.ok() && release->has_release()) << release.status();
  EXPECT_EQ(release->release().unread_data(), "abc");
  ExpectSameSocket(clients[0].client.get(), fd.get());
  EXPECT_EQ(worker_->active_connections(), 0u);
}

TEST_F(WorkerSdkTest, QueuedReleaseLostWithTheChannelComesBack) {
  std::vector<FakeClient> clients;
  RegisterWithOneConnection(absl::Seconds(30), clients);
  flaky_sys_.fail_errno = EAGAIN;
  ASSERT_TRUE(worker_
                  ->Release(1, delivered_[0].fd, "GET / HTTP/1.1\r\n\r\n",
                            ReleaseReason::kRebalance)
                  .ok());
  // The channel dies with the Release still queued: the connection is
  // delivered again, with the bytes the application had not consumed.
  flaky_sys_.fail_errno = EPIPE;
  ASSERT_TRUE(PumpUntil([&] { return delivered_.size() == 2; }));
  ClientConnection& back = delivered_[1];
  EXPECT_EQ(back.id, 1u);
  EXPECT_EQ(back.peer_address, "192.0.2.1:40001");
  EXPECT_EQ(back.initial_data, "GET / HTTP/1.1\r\n\r\n");
  ASSERT_TRUE(back.fd.valid());
  ExpectSameSocket(clients[0].client.get(), back.fd.get());
  EXPECT_EQ(worker_->active_connections(), 1u);
  EXPECT_TRUE(drain_causes_.empty());
  // It is still ours for the next broker too.
  flaky_sys_.fail_errno = 0;
  absl::StatusOr<HandoffMessage> hello = PumpUntilReconnected();
  ASSERT_TRUE(hello.ok() && hello->has_hello()) << hello.status();
  ASSERT_EQ(hello->hello().owned_connections_size(), 1);
  EXPECT_EQ(hello->hello().owned_connections(0).connection_id(), 1u);
}

TEST_F(WorkerSdkTest, ThreadPerConnectionRefusesTheReleaseHandler) {
  Register(ReleasingOptions());
  absl::Status served =
      worker_->ServeThreadPerConnection([](ClientConnection) {});
  EXPECT_TRUE(absl::IsFailedPrecondition(served)) << served;
}

}  // namespace
}  // namespace fdbroker::worker
