#ifndef FDBROKER_TESTS_BROKER_DATA_PLANE_FIXTURE_H_
#define FDBROKER_TESTS_BROKER_DATA_PLANE_FIXTURE_H_

#include <sys/socket.h>
#include <unistd.h>

#include <memory>
#include <string>
#include <vector>

#include "broker/balancing_policy.h"
#include "broker/connection_dispatcher.h"
#include "broker/supervisor.h"
#include "broker/worker_events.h"
#include "broker/worker_manager.h"
#include "broker/worker_registry.h"
#include "gtest/gtest.h"
#include "tests/broker/fake_process_launcher.h"
#include "tests/broker/simulated_time.h"
#include "wire/message_channel.h"

namespace fdbroker {

// The data plane's parts (registry, dispatcher, supervisor, manager) on a
// simulated clock, with fake processes: workers are spawned by the
// FakeProcessLauncher and register over a socketpair the test drives.
class DataPlaneTest : public ::testing::Test {
 protected:
  static constexpr const char* kSocketPath = "/run/test/fdbroker.sock";

  // The worker's end of its channel.
  struct WorkerEnd {
    pid_t pid = 0;
    uint64_t id = 0;  // From Welcome.
    std::unique_ptr<wire::MessageChannel> channel;

    // `fd` (-1: none) goes with it; the caller keeps its copy.
    absl::Status Send(v1::HandoffMessage message, int fd = -1) {
      absl::StatusOr<wire::SendResult> r = channel->Send(message, fd);
      if (!r.ok()) return r.status();
      return *r == wire::SendResult::kSent
                 ? absl::OkStatus()
                 : absl::UnavailableError("worker socket full");
    }
    // Everything the broker sent since the last call.
    // Every message waiting; the fds they carry go to `fds` if given
    // (else they close).
    std::vector<v1::HandoffMessage> Received(
        std::vector<wire::UniqueFd>* fds = nullptr) {
      std::vector<v1::HandoffMessage> out;
      for (;;) {
        v1::HandoffMessage message;
        std::vector<wire::UniqueFd> attached;
        absl::StatusOr<wire::ReceiveResult> r =
            channel->Receive(message, attached);
        if (!r.ok() || *r != wire::ReceiveResult::kReceived) return out;
        out.push_back(std::move(message));
        if (fds == nullptr) continue;
        for (wire::UniqueFd& fd : attached) fds->push_back(std::move(fd));
      }
    }
    // The broker closed its end (EOF after any unread messages).
    bool BrokerClosed() {
      Received();
      char c;
      return ::recv(channel->fd(), &c, 1, MSG_DONTWAIT | MSG_PEEK) == 0;
    }
  };

  DataPlaneTest() {
    dispatcher_ = std::make_unique<ConnectionDispatcher>(
        loop(), registry_, policy_, dispatch_options_);
    supervisor_ = std::make_unique<Supervisor>(
        loop(), Supervisor::Options{{"my-worker", "--threads=2"}, kSocketPath},
        launcher_, [this](pid_t pid, int status) {
          if (manager_ != nullptr) manager_->OnChildExited(pid, status);
        });
  }

  ~DataPlaneTest() override {
    manager_.reset();
    registry_ = WorkerRegistry();
  }

  // Builds the manager with `options` and starts it (the initial pool is
  // spawned at once).
  void StartManager(const WorkerManager::Options& options) {
    manager_ = std::make_unique<WorkerManager>(
        loop(), registry_, *dispatcher_, *supervisor_, wire::SysCalls::Real(),
        options,
        [this](const WorkerEvent& event) { events_.push_back(event); });
    manager_->Start();
    time_.RunUntilIdle();
  }

  // Connects process `pid` to the hand-off socket and says `hello`; returns
  // its end of the channel, with the broker's answers (Welcome or Refusal,
  // and what follows it; heartbeats left out) in `answers` and the fds they
  // carried in `fds`, if given. `attached` (-1: none) goes with the Hello
  // (Hello.returns_listener).
  WorkerEnd SayHello(pid_t pid, v1::Hello hello,
                     std::vector<v1::HandoffMessage>& answers,
                     std::vector<wire::UniqueFd>* fds = nullptr,
                     int attached = -1) {
    int sv[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv), 0);
    WorkerEnd end;
    end.pid = pid;
    end.channel = std::make_unique<wire::MessageChannel>(wire::UniqueFd(sv[1]));
    manager_->OnNewPeer(wire::UniqueFd(sv[0]),
                        ucred{pid, ::getuid(), ::getgid()},
                        /*allowed=*/true);
    hello.mutable_version()->set_major(wire::kProtocolMajor);
    hello.set_pid(pid);
    v1::HandoffMessage message;
    *message.mutable_hello() = std::move(hello);
    EXPECT_TRUE(end.Send(std::move(message), attached).ok());
    time_.RunUntilIdle();
    answers.clear();
    for (v1::HandoffMessage& m : end.Received(fds)) {
      if (m.has_welcome()) end.id = m.welcome().worker_id();
      if (!m.has_heartbeat()) answers.push_back(std::move(m));
    }
    return end;
  }

  // SayHello() with `capacity` (and Hello.reports_liveness), expecting a
  // Welcome.
  WorkerEnd Register(pid_t pid, uint32_t capacity = 0,
                     bool reports_liveness = false) {
    v1::Hello hello;
    hello.set_capacity(capacity);
    hello.set_reports_liveness(reports_liveness);
    std::vector<v1::HandoffMessage> answers;
    WorkerEnd end = SayHello(pid, std::move(hello), answers);
    EXPECT_NE(end.id, 0u) << "no Welcome for pid " << pid;
    return end;
  }

  pid_t LastSpawnedPid() const {
    return launcher_.spawned.empty() ? 0 : launcher_.spawned.back().pid;
  }

  std::vector<WorkerEvent> EventsOf(WorkerEvent::Type type) const {
    std::vector<WorkerEvent> out;
    for (const WorkerEvent& e : events_) {
      if (e.type == type) out.push_back(e);
    }
    return out;
  }

  EventLoop& loop() { return time_.loop(); }

  SimulatedTime time_;
  FakeProcessLauncher launcher_;
  WorkerRegistry registry_;
  LeastConnectionsPolicy policy_;
  ConnectionDispatcher::Options dispatch_options_;
  std::unique_ptr<ConnectionDispatcher> dispatcher_;
  std::unique_ptr<Supervisor> supervisor_;
  std::unique_ptr<WorkerManager> manager_;
  std::vector<WorkerEvent> events_;
};

}  // namespace fdbroker

#endif  // FDBROKER_TESTS_BROKER_DATA_PLANE_FIXTURE_H_
