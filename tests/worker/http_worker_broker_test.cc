// The real fdbroker-http-worker binary registered with a fake broker (the
// test): real TCP connections are handed to it with SCM_RIGHTS, and the
// test checks the protocol (Ack, Closed, Reject, Goodbye) and the HTTP.

#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <filesystem>
#include <iostream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/util/subprocess.h"
#include "tests/util/test_util.h"
#include "tests/worker/fake_broker.h"
#include "tests/worker/raw_http.h"

namespace fdbroker::testing {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Not;
using ::testing::UnorderedElementsAre;
using v1::HandoffMessage;

constexpr char kWorker[] = FDBROKER_BIN_DIR "/fdbroker-http-worker";

class HttpWorkerBrokerTest : public ::testing::Test {
 protected:
  void TearDown() override {
    worker_.reset();
    std::error_code ignored;
    std::filesystem::remove_all(dir_, ignored);
  }

  // Starts the worker (finding the broker through FDBROKER_SOCKET unless
  // `args` say otherwise) and registers it.
  void StartWorker(std::vector<std::string> args = {},
                   bool through_env = true) {
    StartWorkerOn(broker_, "ready", worker_, args, through_env);
  }

  // Starts a worker registered with `broker` into `process`; its ready file
  // is dir_/`ready_name`.
  void StartWorkerOn(FakeBroker& broker, const std::string& ready_name,
                     std::unique_ptr<Subprocess>& process,
                     std::vector<std::string> args = {},
                     bool through_env = true) {
    const std::string ready_file = dir_ + "/" + ready_name;
    std::vector<std::string> argv = {kWorker, "--ready_file=" + ready_file};
    argv.insert(argv.end(), args.begin(), args.end());
    Subprocess::Options options;
    options.env["FDBROKER_SOCKET"] = through_env ? broker.socket_path() : "";
    absl::StatusOr<std::unique_ptr<Subprocess>> started =
        Subprocess::Start(argv, options);
    ASSERT_TRUE(started.ok()) << started.status();
    process = *std::move(started);
    ASSERT_TRUE(broker.Accept(absl::Seconds(20)).ok()) << process->Output();
    absl::StatusOr<HandoffMessage> hello = broker.Receive();
    ASSERT_TRUE(hello.ok() && hello->has_hello()) << hello.status();
    hello_ = hello->hello();
    ASSERT_TRUE(broker
                    .SendWelcome(/*heartbeat_interval_ms=*/1000,
                                 /*heartbeat_timeout_ms=*/30000)
                    .ok());
    // The ready file appears once the worker serves.
    ASSERT_TRUE(WaitFor([&] { return ReadKeyValueFile(ready_file).ok(); },
                        absl::Seconds(20)))
        << process->Output();
    absl::StatusOr<std::map<std::string, std::string>> ready =
        ReadKeyValueFile(ready_file);
    ASSERT_TRUE(ready.ok());
    EXPECT_EQ((*ready)["mode"], "broker");
    EXPECT_EQ((*ready)["worker_id"], "7");
  }

  // The broker's next message that is not a heartbeat.
  absl::StatusOr<HandoffMessage> Receive() {
    wire::UniqueFd fd;  // None expected.
    return ReceiveWithFd(fd);
  }
  // Same, keeping the fd that came with it (a Release's).
  absl::StatusOr<HandoffMessage> ReceiveWithFd(
      wire::UniqueFd& fd, absl::Duration timeout = absl::Seconds(10)) {
    const absl::Time deadline = absl::Now() + timeout;
    for (;;) {
      absl::StatusOr<HandoffMessage> message =
          broker_.Receive(deadline - absl::Now(), fd);
      if (!message.ok() || !message->has_heartbeat()) return message;
    }
  }

  // Hands a new TCP connection to the worker, as the broker does: send the
  // accepted socket, wait for the Ack, close the broker's copy.
  wire::UniqueFd HandOff(uint64_t id, const std::string& initial_data = "") {
    absl::StatusOr<TcpPair> pair = MakeTcpPair();
    EXPECT_TRUE(pair.ok()) << pair.status();
    if (!pair.ok()) return wire::UniqueFd();
    EXPECT_TRUE(
        broker_.SendConnection(id, pair->server.get(), initial_data).ok());
    absl::StatusOr<HandoffMessage> ack = Receive();
    EXPECT_TRUE(ack.ok() && ack->has_ack()) << ack.status();
    if (ack.ok()) {
      EXPECT_THAT(std::vector<uint64_t>(ack->ack().connection_ids().begin(),
                                        ack->ack().connection_ids().end()),
                  ElementsAre(id));
    }
    return std::move(pair->client);
  }

  // Collects the ids of Closed messages until `count` arrived.
  std::vector<uint64_t> ReceiveClosed(size_t count) {
    std::vector<uint64_t> ids;
    while (ids.size() < count) {
      absl::StatusOr<HandoffMessage> message = Receive();
      EXPECT_TRUE(message.ok() && message->has_closed())
          << (message.ok() ? message->DebugString()
                           : message.status().ToString());
      if (!message.ok() || !message->has_closed()) break;
      ids.insert(ids.end(), message->closed().connection_ids().begin(),
                 message->closed().connection_ids().end());
    }
    return ids;
  }

  void ExpectGoodbyeAndCleanExit() {
    absl::StatusOr<HandoffMessage> goodbye = Receive();
    ASSERT_TRUE(goodbye.ok() && goodbye->has_goodbye())
        << (goodbye.ok() ? goodbye->DebugString()
                         : goodbye.status().ToString());
    EXPECT_TRUE(broker_.WaitForClose());
    ExpectCleanExit();
  }

  void ExpectCleanExit() {
    absl::StatusOr<int> exit_code = worker_->Wait(absl::Seconds(10));
    ASSERT_TRUE(exit_code.ok()) << exit_code.status();
    EXPECT_EQ(*exit_code, 0) << worker_->Output();
  }

  std::string pid() const { return absl::StrCat(worker_->pid()); }

  std::string dir_ = MakeTempDir();
  FakeBroker broker_;
  std::unique_ptr<Subprocess> worker_;
  v1::Hello hello_;
};

TEST_F(HttpWorkerBrokerTest, RegistersAndServesHandedOffConnections) {
  StartWorker();
  EXPECT_EQ(hello_.pid(), worker_->pid());
  EXPECT_EQ(hello_.capacity(), 0u);
  EXPECT_EQ(hello_.labels().at("program"), "fdbroker-http-worker");

  // Bytes a previous owner read are answered before anything is read from
  // the socket (the client writes nothing here).
  wire::UniqueFd replayed =
      HandOff(1,
              "GET / HTTP/1.1\r\nHost: t\r\n\r\n"
              "GET /missing HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
  absl::StatusOr<std::string> stream = ReadUntilClose(replayed.get());
  ASSERT_TRUE(stream.ok()) << stream.status();
  EXPECT_THAT(ResponseStatuses(*stream), ElementsAre(200, 404));
  EXPECT_THAT(*stream, HasSubstr("X-Worker-Pid: " + pid()));
  EXPECT_THAT(ReceiveClosed(1), ElementsAre(1u));

  // Keep-alive over a handed-off socket.
  wire::UniqueFd client = HandOff(2);
  for (int i = 0; i < 3; ++i) {
    absl::StatusOr<HttpResponse> response = HttpGet(client.get(), "/", true);
    ASSERT_TRUE(response.ok()) << response.status();
    EXPECT_EQ(response->status, 200);
    EXPECT_EQ(response->headers["x-worker-pid"], pid());
  }
  client.Reset();  // The client leaves: the worker reports it.
  EXPECT_THAT(ReceiveClosed(1), ElementsAre(2u));
}

// X-Client-Address is the Connection's peer_address (the real client, which
// behind a PROXY-protocol balancer getpeername() would not tell), not the
// socket's peer (here 127.0.0.1).
TEST_F(HttpWorkerBrokerTest, XClientAddressIsTheBrokersPeerAddress) {
  StartWorker();
  wire::UniqueFd client = HandOff(5);
  for (int i = 0; i < 2; ++i) {
    absl::StatusOr<HttpResponse> response =
        HttpGet(client.get(), "/", /*keep_alive=*/true);
    ASSERT_TRUE(response.ok()) << response.status();
    EXPECT_EQ(response->headers["x-client-address"], "192.0.2.1:40005");
  }
  absl::StatusOr<HttpResponse> missing =
      HttpGet(client.get(), "/missing", /*keep_alive=*/true);
  ASSERT_TRUE(missing.ok()) << missing.status();
  EXPECT_EQ(missing->status, 404);
  EXPECT_EQ(missing->headers["x-client-address"], "192.0.2.1:40005");
}

TEST_F(HttpWorkerBrokerTest, SocketAndCapacityFlags) {
  StartWorker({"--socket=" + broker_.socket_path(), "--capacity=3"},
              /*through_env=*/false);
  EXPECT_EQ(hello_.capacity(), 3u);
  EXPECT_TRUE(hello_.supports_release());
}

TEST_F(HttpWorkerBrokerTest, NoReleaseFlagOptsOutOfMigration) {
  StartWorker({"--no_release", "--capacity=2"});
  EXPECT_FALSE(hello_.supports_release());
  EXPECT_EQ(hello_.capacity(), 2u);
}

TEST_F(HttpWorkerBrokerTest, DrainFinishesInFlightRequestsThenSaysGoodbye) {
  StartWorker();
  wire::UniqueFd idle = HandOff(1);
  absl::StatusOr<HttpResponse> served = HttpGet(idle.get(), "/", true);
  ASSERT_TRUE(served.ok()) << served.status();
  // A request in progress: answered once the worker has read both.
  wire::UniqueFd busy =
      HandOff(2,
              "GET / HTTP/1.1\r\nHost: t\r\n\r\n"
              "GET /sleep?ms=600 HTTP/1.1\r\nHost: t\r\n\r\n");
  absl::StatusOr<std::string> first = ReadUntilContains(busy.get(), "pid ");
  ASSERT_TRUE(first.ok()) << first.status();

  ASSERT_TRUE(broker_.SendDrain(absl::Now() + absl::Seconds(20)).ok());
  // The idle connection closes at once.
  absl::StatusOr<std::string> idle_rest = ReadUntilClose(idle.get());
  ASSERT_TRUE(idle_rest.ok()) << idle_rest.status();
  EXPECT_EQ(*idle_rest, "");
  EXPECT_THAT(ReceiveClosed(1), ElementsAre(1u));

  // A connection offered now goes back to the broker.
  absl::StatusOr<TcpPair> late = MakeTcpPair();
  ASSERT_TRUE(late.ok());
  ASSERT_TRUE(broker_.SendConnection(3, late->server.get()).ok());
  absl::StatusOr<HandoffMessage> reject = Receive();
  ASSERT_TRUE(reject.ok() && reject->has_reject()) << reject.status();
  EXPECT_THAT(std::vector<uint64_t>(reject->reject().connection_ids().begin(),
                                    reject->reject().connection_ids().end()),
              ElementsAre(3u));

  // The sleeping request completes, with Connection: close.
  absl::StatusOr<std::string> busy_rest = ReadUntilClose(busy.get());
  ASSERT_TRUE(busy_rest.ok()) << busy_rest.status();
  EXPECT_THAT(ResponseStatuses(*busy_rest), ElementsAre(200));
  EXPECT_THAT(*busy_rest, HasSubstr("Connection: close"));
  EXPECT_THAT(*busy_rest, HasSubstr("slept 600 ms"));
  EXPECT_THAT(ReceiveClosed(1), ElementsAre(2u));
  ExpectGoodbyeAndCleanExit();
}

TEST_F(HttpWorkerBrokerTest, WithoutReconnectBrokerLossDrainsAndExits) {
  StartWorker({"--reconnect_timeout=0"});
  wire::UniqueFd idle = HandOff(1);
  ASSERT_TRUE(HttpGet(idle.get(), "/", true).ok());
  wire::UniqueFd busy =
      HandOff(2,
              "GET / HTTP/1.1\r\nHost: t\r\n\r\n"
              "GET /sleep?ms=500 HTTP/1.1\r\nHost: t\r\n\r\n");
  ASSERT_TRUE(ReadUntilContains(busy.get(), "pid ").ok());

  broker_.CloseChannel();  // The broker crashed.
  absl::StatusOr<std::string> idle_rest = ReadUntilClose(idle.get());
  ASSERT_TRUE(idle_rest.ok()) << idle_rest.status();
  EXPECT_EQ(*idle_rest, "");
  absl::StatusOr<std::string> busy_rest = ReadUntilClose(busy.get());
  ASSERT_TRUE(busy_rest.ok()) << busy_rest.status();
  EXPECT_THAT(ResponseStatuses(*busy_rest), ElementsAre(200));
  EXPECT_THAT(*busy_rest, HasSubstr("slept 500 ms"));
  ExpectCleanExit();
  EXPECT_THAT(worker_->Stderr(), HasSubstr("lost the broker channel"));
}

// (f) The broker crashes while a keep-alive client is connected: the client
// sees nothing, and the worker re-registers with the broker that comes up on
// the same path, listing that connection.
TEST_F(HttpWorkerBrokerTest, BrokerCrashKeepsKeepAliveClientsAndReRegisters) {
  StartWorker();
  wire::UniqueFd client = HandOff(1);
  absl::StatusOr<HttpResponse> response = HttpGet(client.get(), "/", true);
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_EQ(response->status, 200);

  // The broker dies; for a while nobody listens on the path.
  broker_.CloseChannel();
  broker_.StopListening();
  ASSERT_TRUE(WaitFor(
      [&] {
        return absl::StrContains(worker_->Stderr(), "lost the broker channel");
      },
      absl::Seconds(10)))
      << worker_->Output();
  // The next request on the same TCP connection is served meanwhile.
  response = HttpGet(client.get(), "/", true);
  ASSERT_TRUE(response.ok()) << response.status() << worker_->Output();
  EXPECT_EQ(response->status, 200);

  // A new broker on the same path: the worker registers with it, listing
  // the connection it kept.
  broker_.Listen();
  ASSERT_TRUE(broker_.Accept(absl::Seconds(10)).ok()) << worker_->Output();
  absl::StatusOr<HandoffMessage> hello = broker_.Receive();
  ASSERT_TRUE(hello.ok() && hello->has_hello()) << hello.status();
  EXPECT_EQ(hello->hello().pid(), worker_->pid());
  EXPECT_EQ(hello->hello().labels().at("program"), "fdbroker-http-worker");
  ASSERT_EQ(hello->hello().owned_connections_size(), 1) << hello->DebugString();
  EXPECT_EQ(hello->hello().owned_connections(0).connection_id(), 1u);
  EXPECT_EQ(hello->hello().owned_connections(0).peer_address(),
            "192.0.2.1:40001");
  ASSERT_TRUE(broker_
                  .SendWelcome(/*heartbeat_interval_ms=*/1000,
                               /*heartbeat_timeout_ms=*/30000,
                               /*worker_id=*/8)
                  .ok());
  ASSERT_TRUE(WaitFor(
      [&] {
        return absl::StrContains(worker_->Stderr(),
                                 "reconnected to the broker");
      },
      absl::Seconds(10)))
      << worker_->Output();

  // Still the same connection, still served; new connections come from the
  // new broker and are served too (the server did not start draining).
  response = HttpGet(client.get(), "/", true);
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_EQ(response->status, 200);
  EXPECT_EQ(response->headers["x-worker-pid"], pid());
  EXPECT_THAT(response->headers["connection"], Not(HasSubstr("close")));
  wire::UniqueFd fresh = HandOff(100);
  response = HttpGet(fresh.get(), "/", true);
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_EQ(response->status, 200);
  EXPECT_THAT(worker_->Stderr(), Not(HasSubstr("draining")));

  // The adopted connection's close is reported to the new broker.
  client.Reset();
  EXPECT_THAT(ReceiveClosed(1), ElementsAre(1u));
  fresh.Reset();
  EXPECT_THAT(ReceiveClosed(1), ElementsAre(100u));
  // And the new broker's Drain ends it cleanly.
  ASSERT_TRUE(broker_.SendDrain(absl::Now() + absl::Seconds(20)).ok());
  ExpectGoodbyeAndCleanExit();
}

TEST_F(HttpWorkerBrokerTest, NoBrokerWithinReconnectTimeoutDrainsAndExits) {
  StartWorker({"--reconnect_timeout=300ms"});
  wire::UniqueFd idle = HandOff(1);
  ASSERT_TRUE(HttpGet(idle.get(), "/", true).ok());
  broker_.CloseChannel();
  broker_.StopListening();
  // Once it gives up, the idle keep-alive connection is closed and the
  // worker exits.
  absl::StatusOr<std::string> idle_rest = ReadUntilClose(idle.get());
  ASSERT_TRUE(idle_rest.ok()) << idle_rest.status();
  EXPECT_EQ(*idle_rest, "");
  ExpectCleanExit();
  EXPECT_THAT(worker_->Stderr(), HasSubstr("gave up reconnecting"));
  EXPECT_THAT(worker_->Stderr(), HasSubstr("draining (broker lost)"));
}

TEST_F(HttpWorkerBrokerTest, NegativeReconnectTimeoutIsABadCommandLine) {
  absl::StatusOr<std::unique_ptr<Subprocess>> process = Subprocess::Start(
      {kWorker, "--socket=/nonexistent", "--reconnect_timeout=-1s"});
  ASSERT_TRUE(process.ok()) << process.status();
  worker_ = *std::move(process);
  absl::StatusOr<int> exit_code = worker_->Wait(absl::Seconds(10));
  ASSERT_TRUE(exit_code.ok()) << exit_code.status();
  EXPECT_EQ(*exit_code, 2);
  EXPECT_THAT(worker_->Stderr(), HasSubstr("--reconnect_timeout"));
}

TEST_F(HttpWorkerBrokerTest, RefusedWorkerExitsWithTheReason) {
  Subprocess::Options options;
  options.env["FDBROKER_SOCKET"] = broker_.socket_path();
  absl::StatusOr<std::unique_ptr<Subprocess>> process =
      Subprocess::Start({kWorker}, options);
  ASSERT_TRUE(process.ok()) << process.status();
  worker_ = *std::move(process);
  ASSERT_TRUE(broker_.Accept(absl::Seconds(20)).ok());
  ASSERT_TRUE(broker_.Receive().ok());
  ASSERT_TRUE(
      broker_.SendRefusal(v1::REFUSAL_REASON_SHUTTING_DOWN, "going away").ok());
  broker_.CloseChannel();
  absl::StatusOr<int> exit_code = worker_->Wait(absl::Seconds(10));
  ASSERT_TRUE(exit_code.ok()) << exit_code.status();
  EXPECT_EQ(*exit_code, 1);
  EXPECT_THAT(worker_->Stderr(), HasSubstr("going away"));
}

// --- Releasing connections (migration) ---------------------------------------

// The worker releases an idle keep-alive connection when the broker asks,
// and the socket it gives back serves the client's next request at another
// worker; a connection with half a request read is kept.
TEST_F(HttpWorkerBrokerTest, IdleConnectionIsReleasedAndServedByTheNextOwner) {
  StartWorker();
  EXPECT_TRUE(hello_.supports_release());
  wire::UniqueFd idle = HandOff(1);
  absl::StatusOr<HttpResponse> response = HttpGet(idle.get(), "/", true);
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_EQ(response->headers["x-worker-pid"], pid());
  // One write: a whole request (answered, which shows the worker read the
  // write) and the start of the next one, left in its input buffer.
  wire::UniqueFd half = HandOff(2);
  ASSERT_TRUE(
      SendAll(half.get(), "GET / HTTP/1.1\r\nHost: t\r\n\r\nGET / HTT").ok());
  ASSERT_TRUE(ReadUntilContains(half.get(), "pid ").ok());

  ASSERT_TRUE(broker_.SendReleaseRequest(10).ok());
  wire::UniqueFd released;
  absl::StatusOr<HandoffMessage> release = ReceiveWithFd(released);
  ASSERT_TRUE(release.ok() && release->has_release())
      << (release.ok() ? release->DebugString() : release.status().ToString());
  EXPECT_EQ(release->release().connection_id(), 1u);
  EXPECT_EQ(release->release().reason(), v1::RELEASE_REASON_REBALANCE);
  EXPECT_EQ(release->release().unread_data(), "");
  ASSERT_TRUE(released.valid());
  // That was all: the half-read connection stayed (the log says how many
  // went, so this is not a race against a late Release).
  ASSERT_TRUE(WaitFor(
      [&] {
        return absl::StrContains(worker_->Stderr(),
                                 "released 1 idle connections");
      },
      absl::Seconds(10)))
      << worker_->Output();
  wire::UniqueFd none;
  absl::StatusOr<HandoffMessage> more =
      ReceiveWithFd(none, absl::Milliseconds(200));
  EXPECT_TRUE(absl::IsDeadlineExceeded(more.status()))
      << (more.ok() ? more->DebugString() : more.status().ToString());

  // The next owner, another worker process, serves the client's next
  // request on the same TCP connection.
  FakeBroker other_broker;
  std::unique_ptr<Subprocess> other;
  StartWorkerOn(other_broker, "ready-other", other);
  ASSERT_TRUE(
      other_broker
          .SendConnection(1, released.get(), release->release().unread_data())
          .ok());
  absl::StatusOr<HandoffMessage> ack = other_broker.Receive();
  ASSERT_TRUE(ack.ok() && ack->has_ack()) << ack.status();
  released.Reset();
  response = HttpGet(idle.get(), "/", true);
  ASSERT_TRUE(response.ok()) << response.status() << other->Output();
  EXPECT_EQ(response->status, 200);
  EXPECT_EQ(response->headers["x-worker-pid"], absl::StrCat(other->pid()));

  // The kept connection finishes its request at the first worker.
  ASSERT_TRUE(SendAll(half.get(), "P/1.1\r\nHost: t\r\n\r\n").ok());
  absl::StatusOr<std::string> second = ReadUntilContains(half.get(), "pid ");
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_THAT(*second, HasSubstr("X-Worker-Pid: " + pid()));

  // Released means forgotten: the drain reports only connection 2.
  ASSERT_TRUE(broker_.SendDrain(absl::Now() + absl::Seconds(20)).ok());
  EXPECT_THAT(ReceiveClosed(1), ElementsAre(2u));
  ExpectGoodbyeAndCleanExit();
}

// Drain with release_idle: idle connections go back to the broker at once,
// a busy one right after its (keep-alive) response, one whose client asked
// for Connection: close closes; then Goodbye.
TEST_F(HttpWorkerBrokerTest, ReleaseDrainReleasesIdleAtOnceAndBusyAfterwards) {
  StartWorker();
  std::vector<wire::UniqueFd> idle;
  for (uint64_t id = 1; id <= 3; ++id) {
    idle.push_back(HandOff(id));
    ASSERT_TRUE(HttpGet(idle.back().get(), "/", true).ok());
  }
  // Delivered (and so sleeping) before the Ack we wait for is answered.
  wire::UniqueFd busy =
      HandOff(10, "GET /sleep?ms=600 HTTP/1.1\r\nHost: t\r\n\r\n");
  wire::UniqueFd closing = HandOff(11,
                                   "GET /sleep?ms=300 HTTP/1.1\r\nHost: t\r\n"
                                   "Connection: close\r\n\r\n");

  const absl::Time start = absl::Now();
  ASSERT_TRUE(broker_.SendDrain(start + absl::Seconds(20), true).ok());
  std::map<uint64_t, wire::UniqueFd> released;
  std::map<uint64_t, absl::Duration> released_after;
  std::vector<uint64_t> closed;
  for (;;) {
    wire::UniqueFd fd;
    absl::StatusOr<HandoffMessage> message = ReceiveWithFd(fd);
    ASSERT_TRUE(message.ok()) << message.status() << worker_->Output();
    if (message->has_goodbye()) break;
    if (message->has_closed()) {
      closed.insert(closed.end(), message->closed().connection_ids().begin(),
                    message->closed().connection_ids().end());
      continue;
    }
    ASSERT_TRUE(message->has_release()) << message->DebugString();
    EXPECT_EQ(message->release().reason(), v1::RELEASE_REASON_DRAIN);
    released_after[message->release().connection_id()] = absl::Now() - start;
    released[message->release().connection_id()] = std::move(fd);
  }
  EXPECT_TRUE(broker_.WaitForClose());
  ExpectCleanExit();
  EXPECT_THAT(closed, ElementsAre(11u));
  ASSERT_EQ(released.size(), 4u);
  for (uint64_t id : {1u, 2u, 3u}) {
    EXPECT_LT(released_after[id], absl::Milliseconds(500)) << id;
  }
  EXPECT_GE(released_after[10], absl::Milliseconds(500));

  // The busy client got its whole response, keep-alive, and its socket went
  // back to the broker intact: its next bytes arrive at the released fd.
  absl::StatusOr<std::string> slept = ReadUntilContains(busy.get(), "slept");
  ASSERT_TRUE(slept.ok()) << slept.status();
  EXPECT_THAT(ResponseStatuses(*slept), ElementsAre(200));
  EXPECT_THAT(*slept, Not(HasSubstr("Connection: close")));
  for (auto& [id, released_fd] : released) {
    const int client = id == 10 ? busy.get() : idle[id - 1].get();
    ASSERT_TRUE(SendAll(client, "next").ok());
    char buffer[8];
    // A lambda cannot capture a structured binding in C++17 (clang).
    const int fd = released_fd.get();
    ASSERT_TRUE(WaitFor(
        [&] { return ::recv(fd, buffer, 4, MSG_PEEK | MSG_DONTWAIT) == 4; },
        absl::Seconds(5)));
    EXPECT_EQ(::recv(fd, buffer, sizeof(buffer), MSG_DONTWAIT), 4);
  }
  absl::StatusOr<std::string> closed_rest = ReadUntilClose(closing.get());
  ASSERT_TRUE(closed_rest.ok()) << closed_rest.status();
  EXPECT_THAT(*closed_rest, HasSubstr("Connection: close"));
}

// Hundreds of idle keep-alive clients move out in well under a second, and
// none of them sees anything (no EOF, no reset, no stray bytes).
TEST_F(HttpWorkerBrokerTest, ReleaseDrainOfHundredsOfIdleClientsIsFast) {
  constexpr uint64_t kClients = 300;
  StartWorker();
  std::vector<wire::UniqueFd> clients;
  for (uint64_t id = 1; id <= kClients; ++id) {
    clients.push_back(HandOff(id));
    ASSERT_TRUE(clients.back().valid());
    absl::StatusOr<HttpResponse> response =
        HttpGet(clients.back().get(), "/", true);
    ASSERT_TRUE(response.ok() && response->status == 200) << id;
  }
  const absl::Time start = absl::Now();
  ASSERT_TRUE(broker_.SendDrain(start + absl::Seconds(20), true).ok());
  std::vector<wire::UniqueFd> released;
  for (;;) {
    wire::UniqueFd fd;
    absl::StatusOr<HandoffMessage> message = ReceiveWithFd(fd);
    ASSERT_TRUE(message.ok()) << message.status() << worker_->Output();
    if (message->has_goodbye()) break;
    ASSERT_TRUE(message->has_release()) << message->DebugString();
    released.push_back(std::move(fd));
  }
  const absl::Duration took = absl::Now() - start;
  EXPECT_EQ(released.size(), kClients);
  EXPECT_LT(took, absl::Seconds(1));
  std::cerr << "released " << released.size() << " idle connections in "
            << absl::FormatDuration(took) << "\n";
  ExpectCleanExit();
  std::vector<pollfd> polled;
  for (const wire::UniqueFd& client : clients) {
    polled.push_back(pollfd{client.get(), POLLIN, 0});
  }
  EXPECT_EQ(::poll(polled.data(), polled.size(), 0), 0)
      << "a client saw its connection end or bytes arrive";
}

}  // namespace
}  // namespace fdbroker::testing
