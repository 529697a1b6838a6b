// The hostile-peer suite (issue 13): every way a peer of the hand-off socket
// may misbehave, one after another, against one real broker with two real
// HTTP workers, while background clients keep sending requests. After each
// peer: the background clients had zero errors, the two workers are the
// same processes, and the broker's fd count is back at its baseline.
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "fdbroker/v1/handoff.pb.h"
#include "gtest/gtest.h"
#include "tests/integration/broker_process.h"
#include "tests/integration/request_load.h"
#include "tests/util/subprocess.h"
#include "tests/util/test_util.h"
#include "wire/fd_passing.h"
#include "wire/message_channel.h"

namespace fdbroker::testing {
namespace {

// A connected, non-blocking SOCK_SEQPACKET socket to `path`, or invalid.
wire::UniqueFd ConnectHandoff(const std::string& path) {
  wire::UniqueFd fd(
      ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) !=
      0) {
    return wire::UniqueFd();
  }
  return fd;
}

// True once the broker has closed `fd` (a zero-length read), within 5 s.
bool DroppedByBroker(int fd) {
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  while (absl::Now() < deadline) {
    pollfd p{fd, POLLIN, 0};
    ::poll(&p, 1, 100);
    char buffer[65536];
    const ssize_t n = ::recv(fd, buffer, sizeof(buffer), MSG_DONTWAIT);
    if (n == 0) return true;
    if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) return true;
  }
  return false;
}

// A worker written by hand, message by message: whatever a test wants it to
// say. It heartbeats while it waits, so only what the test makes it do can
// get it cut off.
class HandWorker {
 public:
  explicit HandWorker(const std::string& path)
      : channel_(ConnectHandoff(path)) {}

  int fd() const { return channel_.fd(); }

  absl::Status Send(v1::HandoffMessage message, int fd = -1) {
    absl::StatusOr<wire::SendResult> sent = channel_.Send(message, fd);
    if (!sent.ok()) return sent.status();
    if (*sent != wire::SendResult::kSent) {
      return absl::UnavailableError("channel full");
    }
    return absl::OkStatus();
  }

  // Says Hello (with `claims` as owned connections) and returns the answer:
  // "welcome", the Refusal's message, or what went wrong.
  std::string Register(uint32_t capacity,
                       const std::vector<uint64_t>& claims = {}) {
    v1::HandoffMessage hello;
    v1::Hello& body = *hello.mutable_hello();
    body.mutable_version()->set_major(wire::kProtocolMajor);
    body.mutable_version()->set_minor(wire::kProtocolMinor);
    body.set_pid(::getpid());
    body.set_capacity(capacity);
    body.set_supports_release(true);
    for (uint64_t id : claims) {
      body.add_owned_connections()->set_connection_id(id);
    }
    if (!Send(hello).ok()) return "send failed";
    absl::StatusOr<v1::HandoffMessage> reply = Next(absl::Seconds(10));
    if (!reply.ok()) return std::string(reply.status().message());
    if (reply->has_welcome()) return "welcome";
    if (reply->has_refusal()) return reply->refusal().message();
    return absl::StrCat("unexpected ", wire::BodyName(*reply));
  }

  // The next message other than a Heartbeat (`fd` gets its fd, if any).
  absl::StatusOr<v1::HandoffMessage> Next(absl::Duration timeout,
                                          wire::UniqueFd* fd = nullptr) {
    const absl::Time deadline = absl::Now() + timeout;
    while (absl::Now() < deadline) {
      v1::HandoffMessage message;
      wire::UniqueFd attached;
      absl::StatusOr<wire::ReceiveResult> r =
          channel_.Receive(message, attached);
      if (!r.ok()) return r.status();
      if (*r == wire::ReceiveResult::kPeerClosed) {
        return absl::UnavailableError("closed by the broker");
      }
      if (*r == wire::ReceiveResult::kReceived) {
        if (message.has_heartbeat()) continue;
        if (fd != nullptr) *fd = std::move(attached);
        return message;
      }
      if (absl::Now() - last_heartbeat_ > absl::Milliseconds(100)) {
        v1::HandoffMessage heartbeat;
        heartbeat.mutable_heartbeat();
        (void)Send(heartbeat);
        last_heartbeat_ = absl::Now();
      }
      pollfd p{channel_.fd(), POLLIN, 0};
      ::poll(&p, 1, 20);
    }
    return absl::DeadlineExceededError("no message");
  }

 private:
  wire::MessageChannel channel_;
  absl::Time last_heartbeat_ = absl::Now();
};

// Serves one HTTP request on `client` the way the background clients
// expect (200, connection closed after it).
void AnswerHttp(int client) {
  std::string request;
  char buffer[4096];
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  while (request.find("\r\n\r\n") == std::string::npos &&
         absl::Now() < deadline) {
    pollfd p{client, POLLIN, 0};
    ::poll(&p, 1, 100);
    const ssize_t n = ::recv(client, buffer, sizeof(buffer), MSG_DONTWAIT);
    if (n == 0) return;
    if (n > 0) request.append(buffer, n);
  }
  const std::string response =
      "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
  (void)::send(client, response.data(), response.size(), MSG_NOSIGNAL);
}

// Connects to `path` as another user and says Hello; returns the refusal
// reason the broker answered with, or 101-105 (see the code).
int HelloAsOtherUser(const std::string& path, uid_t uid) {
  pid_t child = ::fork();
  if (child == 0) {
    if (::setgid(uid) != 0 || ::setuid(uid) != 0) ::_exit(101);
    int fd = ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      ::_exit(102);
    }
    wire::MessageChannel channel{wire::UniqueFd(fd)};
    v1::HandoffMessage hello;
    hello.mutable_hello()->mutable_version()->set_major(1);
    (void)channel.Send(hello);
    timeval tv{5, 0};
    ::setsockopt(channel.fd(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    for (int i = 0; i < 100; ++i) {
      v1::HandoffMessage reply;
      wire::UniqueFd none;
      absl::StatusOr<wire::ReceiveResult> r = channel.Receive(reply, none);
      if (r.ok() && *r == wire::ReceiveResult::kReceived) {
        ::_exit(reply.has_refusal() ? reply.refusal().reason() : 103);
      }
      if (!r.ok() || *r == wire::ReceiveResult::kPeerClosed) ::_exit(104);
      ::usleep(10000);
    }
    ::_exit(105);
  }
  int status = 0;
  ::waitpid(child, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

class HostilePeersTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto broker =
        BrokerProcess::Start({"--workers=2", "--heartbeat_interval=100ms",
                              "--heartbeat_timeout=2s", "--ack_timeout=2s"});
    if (!broker.ok()) {
      setup_error_ = new std::string(broker.status().ToString());
      return;
    }
    broker_ = broker->release();
    if (!broker_->WaitForWorkers(2, absl::Seconds(30))) {
      setup_error_ = new std::string("workers did not register");
      return;
    }
    workers_ = new std::vector<pid_t>(broker_->WorkerPids());
    std::sort(workers_->begin(), workers_->end());
    // The baseline once it holds still (the probes' connections close).
    int previous = -2;
    WaitFor(
        [&] {
          previous = std::exchange(baseline_fds_, Fds().value_or(-1));
          return baseline_fds_ > 0 && baseline_fds_ == previous;
        },
        absl::Seconds(10), absl::Milliseconds(200));
  }

  static void TearDownTestSuite() {
    delete broker_;
    broker_ = nullptr;
    delete workers_;
    workers_ = nullptr;
    delete setup_error_;
    setup_error_ = nullptr;
  }

  static absl::StatusOr<int> Fds() { return CountOpenFds(broker_->pid()); }

  void SetUp() override {
    ASSERT_EQ(setup_error_, nullptr) << *setup_error_;
    ASSERT_GT(baseline_fds_, 0);
    log_before_ = broker_->process().Stderr().size();
    clients_ = std::make_unique<RequestLoad>(broker_->port(), 2);
  }

  // After every peer: nobody else noticed, and nothing stayed behind.
  void TearDown() override {
    if (clients_ == nullptr) return;
    // Some traffic while the peer is gone too.
    const int answered = clients_->served();
    WaitFor([&] { return clients_->served() >= answered + 20; },
            absl::Seconds(10));
    clients_->Stop();
    EXPECT_EQ(clients_->failed(), 0) << clients_->first_failure() << "\n"
                                     << Log();
    EXPECT_GT(clients_->served(), 0);
    std::vector<pid_t> workers = broker_->WorkerPids();
    std::sort(workers.begin(), workers.end());
    EXPECT_EQ(workers, *workers_) << "a real worker was replaced\n" << Log();
    int now = -1;
    EXPECT_TRUE(WaitFor(
        [&] {
          now = Fds().value_or(-1);
          return now == baseline_fds_;
        },
        absl::Seconds(10)))
        << "broker fds " << baseline_fds_ << " -> " << now;
  }

  // fdbroker-fake-worker --mode=`mode`, an external worker, registered.
  void StartFakeWorker(const std::string& mode,
                       std::unique_ptr<Subprocess>& peer) {
    Subprocess::Options env;
    env.env["FDBROKER_SOCKET"] = broker_->socket_path();
    auto started = Subprocess::Start(
        {BinaryPath("fdbroker-fake-worker"), "--mode=" + mode}, env);
    ASSERT_TRUE(started.ok()) << started.status();
    peer = *std::move(started);
    ASSERT_TRUE(WaitFor([&] { return peer->Stdout() == "registered\n"; },
                        absl::Seconds(10)));
  }

  // The broker's log since this test started.
  std::string Log() const {
    return broker_->process().Stderr().substr(log_before_);
  }

  static BrokerProcess* broker_;
  static std::vector<pid_t>* workers_;
  static int baseline_fds_;
  static std::string* setup_error_;
  std::unique_ptr<RequestLoad> clients_;
  size_t log_before_ = 0;
};

BrokerProcess* HostilePeersTest::broker_ = nullptr;
std::vector<pid_t>* HostilePeersTest::workers_ = nullptr;
int HostilePeersTest::baseline_fds_ = -1;
std::string* HostilePeersTest::setup_error_ = nullptr;

// Reads its channel and heartbeats but never acks: cut off at --ack_timeout
// (the fake exits when its channel closes); the connections it held are
// served by the real workers (before the ack deadline: never answered).
TEST_F(HostilePeersTest, WorkerThatHeartbeatsButNeverAcksIsCutOff) {
  std::unique_ptr<Subprocess> peer;
  ASSERT_NO_FATAL_FAILURE(StartFakeWorker("never_ack", peer));
  absl::StatusOr<int> code = peer->Wait(absl::Seconds(20));
  ASSERT_TRUE(code.ok()) << "never cut off\n" << Log();
  EXPECT_NE(Log().find("not acked within"), std::string::npos) << Log();
  // A client it held was answered by a real worker within --ack_timeout
  // plus one --heartbeat_timeout (2 s each), and a second for a busy
  // machine.
  EXPECT_LT(clients_->slowest(), absl::Seconds(5));
}

// Registers, then never reads its channel again (nor heartbeats): declared
// dead, its unacked connections go to the real workers.
TEST_F(HostilePeersTest, WorkerThatNeverReadsIsDeclaredDead) {
  std::unique_ptr<Subprocess> peer;
  ASSERT_NO_FATAL_FAILURE(StartFakeWorker("stall", peer));
  EXPECT_TRUE(
      WaitFor([&] { return Log().find("declared dead") != std::string::npos; },
              absl::Seconds(20)))
      << Log();
  ASSERT_TRUE(peer->Signal(SIGKILL).ok());
  (void)peer->Wait(absl::Seconds(10));
}

// A Release whose fd is not the socket handed out under its id (a pipe, a
// listening socket, a file) is that worker's protocol error: its channel is
// closed, nothing is forwarded, and nobody else notices.
TEST_F(HostilePeersTest, ReleaseOfAnythingButItsOwnSocketIsAProtocolError) {
  for (const std::string kind : {"pipe", "listening socket", "file"}) {
    SCOPED_TRACE(kind);
    HandWorker peer(broker_->socket_path());
    ASSERT_EQ(peer.Register(/*capacity=*/1), "welcome");
    wire::UniqueFd client;
    absl::StatusOr<v1::HandoffMessage> offered =
        peer.Next(absl::Seconds(10), &client);
    ASSERT_TRUE(offered.ok()) << offered.status();
    ASSERT_TRUE(offered->has_connection()) << wire::BodyName(*offered);
    const uint64_t id = offered->connection().connection_id();
    v1::HandoffMessage ack;
    ack.mutable_ack()->add_connection_ids(id);
    ASSERT_TRUE(peer.Send(ack).ok());
    AnswerHttp(client.get());

    wire::UniqueFd forged;
    wire::UniqueFd pipe_end;
    if (kind == "pipe") {
      int ends[2];
      ASSERT_EQ(::pipe2(ends, O_CLOEXEC), 0);
      forged = wire::UniqueFd(ends[0]);
      pipe_end = wire::UniqueFd(ends[1]);
    } else if (kind == "listening socket") {
      forged = wire::UniqueFd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
      sockaddr_in addr{};
      addr.sin_family = AF_INET;
      addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      ASSERT_EQ(::bind(forged.get(), reinterpret_cast<sockaddr*>(&addr),
                       sizeof(addr)),
                0);
      ASSERT_EQ(::listen(forged.get(), 1), 0);
    } else {
      forged = wire::UniqueFd(::open("/dev/null", O_RDONLY | O_CLOEXEC));
    }
    v1::HandoffMessage release;
    release.mutable_release()->set_connection_id(id);
    ASSERT_TRUE(peer.Send(release, forged.get()).ok());
    EXPECT_TRUE(DroppedByBroker(peer.fd()));
    EXPECT_NE(Log().find(absl::StrCat("release of connection ", id)),
              std::string::npos)
        << Log();
  }
}

// A Hello may not claim connections the broker knows to be elsewhere: in
// flight to another worker, owned by another worker, or one id twice.
TEST_F(HostilePeersTest, HelloClaimingForeignConnectionsIsRefused) {
  HandWorker owner(broker_->socket_path());
  ASSERT_EQ(owner.Register(/*capacity=*/1), "welcome");
  wire::UniqueFd client;
  absl::StatusOr<v1::HandoffMessage> offered =
      owner.Next(absl::Seconds(10), &client);
  ASSERT_TRUE(offered.ok()) << offered.status();
  ASSERT_TRUE(offered->has_connection());
  const uint64_t id = offered->connection().connection_id();
  // In flight to `owner` (not acked yet).
  EXPECT_NE(HandWorker(broker_->socket_path())
                .Register(0, {id})
                .find("which the broker holds"),
            std::string::npos);
  v1::HandoffMessage ack;
  ack.mutable_ack()->add_connection_ids(id);
  ASSERT_TRUE(owner.Send(ack).ok());
  // Owned by `owner` now (the Ack is read before the next Hello: wait for
  // the broker to have it).
  std::string refusal;
  EXPECT_TRUE(WaitFor(
      [&] {
        refusal = HandWorker(broker_->socket_path()).Register(0, {id});
        return refusal.find("which worker") != std::string::npos;
      },
      absl::Seconds(5)))
      << refusal;
  EXPECT_NE(HandWorker(broker_->socket_path())
                .Register(0, {id + 1000000, id + 1000000})
                .find("twice"),
            std::string::npos);
  // The owner still serves its client, and leaves cleanly.
  AnswerHttp(client.get());
  client.Reset();
  v1::HandoffMessage closed;
  closed.mutable_closed()->add_connection_ids(id);
  ASSERT_TRUE(owner.Send(closed).ok());
  v1::HandoffMessage goodbye;
  goodbye.mutable_goodbye()->set_reason("test over");
  ASSERT_TRUE(owner.Send(goodbye).ok());
  EXPECT_TRUE(DroppedByBroker(owner.fd()));
}

// Garbage, an oversized packet, a wrong sequence number, a stray fd and a
// non-UTF-8 string, before registering and after: the peer is dropped with
// one line of the broker's own (libprotobuf's lines are routed away).
TEST_F(HostilePeersTest, GarbageFramesDropOnlyTheirPeer) {
  const std::string path = broker_->socket_path();
  auto send_raw = [](int fd, const std::string& bytes) {
    (void)::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
  };
  for (const bool registered : {false, true}) {
    for (int kind = 0; kind < 5; ++kind) {
      SCOPED_TRACE(absl::StrCat(registered ? "registered" : "unregistered",
                                ", kind ", kind));
      HandWorker peer(path);
      // The next sequence number this peer would send.
      uint64_t sequence = 1;
      if (registered) {
        ASSERT_EQ(peer.Register(/*capacity=*/1), "welcome");
        sequence = 2;
      }
      if (kind == 0) {
        send_raw(peer.fd(), "\x08\x01\x52\xff\xff\xff garbage");
      } else if (kind == 1) {
        int big = 1 << 20;
        ::setsockopt(peer.fd(), SOL_SOCKET, SO_SNDBUF, &big, sizeof(big));
        send_raw(peer.fd(), std::string(200000, 'x'));
      } else if (kind == 2) {
        v1::HandoffMessage hello;
        hello.set_sequence(sequence + 6);
        hello.mutable_heartbeat();
        send_raw(peer.fd(), hello.SerializeAsString());
      } else if (kind == 3) {
        // A Heartbeat with an fd attached: the library refuses to send it,
        // so the packet is made by hand.
        v1::HandoffMessage heartbeat;
        heartbeat.set_sequence(sequence);
        heartbeat.mutable_heartbeat();
        wire::UniqueFd stray(::open("/dev/null", O_RDONLY | O_CLOEXEC));
        const int fds[] = {stray.get()};
        (void)wire::SendPacket(wire::SysCalls::Real(), peer.fd(),
                               heartbeat.SerializeAsString(), fds);
      } else {
        // HandoffMessage{sequence: 1, hello: {labels: {"\xff": "x"}}}, by
        // hand: the serializer would refuse it.
        send_raw(
            peer.fd(),
            std::string("\x08\x01\x52\x08\x22\x06\x0a\x01\xff\x12\x01x", 12));
      }
      EXPECT_TRUE(DroppedByBroker(peer.fd()));
    }
  }
  EXPECT_NE(Log().find("malformed message"), std::string::npos) << Log();
  EXPECT_EQ(Log().find("libprotobuf"), std::string::npos) << Log();
}

// The hand-off socket is 0600: another uid cannot connect; with the file
// loosened (an operator mistake), SO_PEERCRED still refuses it.
TEST_F(HostilePeersTest, PeerOfAnotherUidIsRefused) {
  if (::geteuid() != 0) {
    GTEST_SKIP() << "needs root to act as another uid (CI runs as root)";
  }
  // The peers are forked children: fork with no other thread running (the
  // sanitizers' runtimes and malloc are happier), then traffic again.
  clients_->Stop();
  EXPECT_EQ(clients_->failed(), 0) << clients_->first_failure();
  const std::string path = broker_->socket_path();
  struct stat st;
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u) << "hand-off socket is owner-only";
  EXPECT_EQ(HelloAsOtherUser(path, 65534), 102);
  struct stat dir;
  ASSERT_EQ(::stat(broker_->dir().c_str(), &dir), 0);
  ASSERT_EQ(::chmod(broker_->dir().c_str(), 0755), 0);
  ASSERT_EQ(::chmod(path.c_str(), 0666), 0);
  EXPECT_EQ(HelloAsOtherUser(path, 65534), v1::REFUSAL_REASON_CREDENTIALS);
  ASSERT_EQ(::chmod(path.c_str(), 0600), 0);
  ASSERT_EQ(::chmod(broker_->dir().c_str(), dir.st_mode & 07777), 0);
  EXPECT_NE(Log().find("uid 65534"), std::string::npos) << Log();
  clients_ = std::make_unique<RequestLoad>(broker_->port(), 2);
}

// Refused UpgradeRequests (a protocol major the broker does not speak, as
// from a peer that is no broker at all) are closed at once and cost
// nothing: the broker once kept every refused channel, one fd each.
TEST_F(HostilePeersTest, RefusedUpgradeRequestsLeakNothing) {
  constexpr int kRequests = 200;
  for (int i = 0; i < kRequests; ++i) {
    HandWorker peer(broker_->socket_path());
    v1::HandoffMessage request;
    request.mutable_upgrade_request()->mutable_version()->set_major(99);
    ASSERT_TRUE(peer.Send(request).ok());
    ASSERT_TRUE(DroppedByBroker(peer.fd())) << "refused and closed, #" << i;
  }
}

}  // namespace
}  // namespace fdbroker::testing
