// A deliberately misbehaving worker for fault tests, speaking the hand-off
// protocol directly through the wire library (no SDK, so nothing is handled
// for it). Registers with the broker at $FDBROKER_SOCKET, then:
//   --mode=die_before_ack  exits (code 1) on the first Connection, without
//                          acking or touching the socket;
//   --mode=stall           never reads its channel again after Welcome.
//   --mode=never_ack       reads its channel and heartbeats, keeps every
//                          connection it gets and never acks one (exits when
//                          the broker closes the channel).
//   --mode=release         a line server that supports release (the broker's
//                          migration test double): acks what it gets (also in
//                          batches), answers each line a client sends with
//                          "<pid> <line>\n", except that a line starting with
//                          DEFER read from the socket is kept unanswered as
//                          unread data; a connection holding part of a line
//                          is busy, never released. ReleaseRequest releases
//                          up to max idle connections (reason echoed), with
//                          the deferred lines as unread_data; lines that
//                          arrive as initial_data are all answered. Drain
//                          with release_idle releases every connection once
//                          idle, then Goodbye; without, closes them. Sends
//                          heartbeats.
//   --mode=release_unsupported  like release, but its Hello does not set
//                          supports_release and it releases its first
//                          connection at once (a protocol error).
//   --mode=rejoin          an idle worker (heartbeats, leaves on Drain). The
//                          first of its kind to create --rejoin_marker (a
//                          path) closes its channel once registered, then: a
//                          child it forks says Hello (was_supervised) and
//                          prints "child: <the answer>"; then it says Hello
//                          again itself and prints "rejoined: <the answer>"
//                          ("welcome <worker_id>" or the refusal message)
//                          and "pid <its pid>".
// --reconnect_delay_ms=N (the release modes): the worker speaks minor 3 and,
// told to Reconnect (an upgrade), goes on serving its clients for N ms,
// then registers again at $FDBROKER_SOCKET with them (a worker slow to
// move). Prints "registered" on stdout once welcomed; with --print_ids (the
// release modes), "took <id>" for each connection it takes; with
// --print_listeners, "took <id> from <listener> peer <peer_address>".
// --label=KEY=VALUE adds a Hello label (e.g. listeners=...). --grow_rss_mb=N
// (the release modes): every line starting with GROW adds N MiB of resident
// memory, never freed.
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "fdbroker/v1/handoff.pb.h"
#include "wire/message_channel.h"

namespace {

[[noreturn]] void Fail(const std::string& why) {
  std::fprintf(stderr, "fake_worker: %s\n", why.c_str());
  std::exit(3);
}

fdbroker::v1::HandoffMessage Next(fdbroker::wire::MessageChannel& channel,
                                  fdbroker::wire::UniqueFd& fd) {
  for (;;) {
    fdbroker::v1::HandoffMessage message;
    absl::StatusOr<fdbroker::wire::ReceiveResult> r =
        channel.Receive(message, fd);
    if (!r.ok()) Fail(std::string(r.status().message()));
    if (*r == fdbroker::wire::ReceiveResult::kPeerClosed) Fail("broker gone");
    if (*r == fdbroker::wire::ReceiveResult::kReceived) return message;
    pollfd p{channel.fd(), POLLIN, 0};
    ::poll(&p, 1, -1);
  }
}

namespace v1 = fdbroker::v1;
using fdbroker::wire::UniqueFd;

// --print_ids: prints "took <id>" for each connection taken.
bool print_ids = false;
// --print_listeners: and the Connection's listener and peer_address.
bool print_listeners = false;
// --reconnect_delay_ms=N: see the top; -1: Reconnect is not understood.
int reconnect_delay_ms = -1;
// --grow_rss_mb=N: N MiB more resident memory (allocated and written) for
// every line starting with GROW answered, never freed: a leaking
// application for the broker's --max_worker_rss.
int grow_rss_mb = 0;
std::vector<std::unique_ptr<char[]>> leaked;

void GrowRss() {
  if (grow_rss_mb <= 0) return;
  const size_t size = static_cast<size_t>(grow_rss_mb) << 20;
  leaked.push_back(std::make_unique<char[]>(size));
  std::memset(leaked.back().get(), 1, size);
}

// A channel to the broker at `path` (Fail()s if it cannot connect).
fdbroker::wire::MessageChannel ConnectTo(const char* path) {
  fdbroker::wire::UniqueFd socket(
      ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path, sizeof(addr.sun_path) - 1);
  if (::connect(socket.get(), reinterpret_cast<sockaddr*>(&addr),
                sizeof(addr)) != 0) {
    Fail("connect");
  }
  return fdbroker::wire::MessageChannel(std::move(socket));
}

// Says Hello on a new channel (a re-registration: was_supervised) and
// returns the channel and the answer: "welcome <worker_id>" or the refusal.
std::string Rejoin(const char* path,
                   std::unique_ptr<fdbroker::wire::MessageChannel>& channel) {
  channel = std::make_unique<fdbroker::wire::MessageChannel>(ConnectTo(path));
  v1::HandoffMessage hello;
  hello.mutable_hello()->mutable_version()->set_major(1);
  hello.mutable_hello()->set_pid(::getpid());
  hello.mutable_hello()->set_was_supervised(true);
  if (!channel->Send(hello).ok()) Fail("send hello");
  UniqueFd fd;
  v1::HandoffMessage answer = Next(*channel, fd);
  if (answer.has_welcome()) {
    return "welcome " + std::to_string(answer.welcome().worker_id());
  }
  return answer.has_refusal() ? answer.refusal().message() : "?";
}

// --mode=rejoin after registering (see the top).
[[noreturn]] void RunRejoin(
    std::unique_ptr<fdbroker::wire::MessageChannel> channel, const char* path,
    const char* marker, int interval_ms) {
  const bool first =
      marker != nullptr &&
      ::open(marker, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0600) >= 0;
  if (first) {
    channel.reset();  // The channel is lost; the process lives on.
    const pid_t child = ::fork();
    if (child == 0) {
      std::unique_ptr<fdbroker::wire::MessageChannel> own;
      std::printf("child: %s\n", Rejoin(path, own).c_str());
      std::fflush(stdout);
      std::_Exit(0);
    }
    ::waitpid(child, nullptr, 0);
    const std::string answer = Rejoin(path, channel);
    std::printf("rejoined: %s\npid %d\n", answer.c_str(), ::getpid());
    std::fflush(stdout);
  }
  auto last_sent = std::chrono::steady_clock::now();
  for (;;) {
    if (std::chrono::steady_clock::now() - last_sent >=
        std::chrono::milliseconds(interval_ms)) {
      v1::HandoffMessage heartbeat;
      heartbeat.mutable_heartbeat();
      if (!channel->Send(heartbeat).ok()) Fail("broker gone");
      last_sent = std::chrono::steady_clock::now();
    }
    pollfd p{channel->fd(), POLLIN, 0};
    if (::poll(&p, 1, interval_ms / 2) == 0) continue;
    UniqueFd fd;
    v1::HandoffMessage message = Next(*channel, fd);
    if (message.has_drain()) std::_Exit(0);  // Owns nothing: done.
  }
}

// The Hello of the release modes.
v1::HandoffMessage LineHello(bool supports_release) {
  v1::HandoffMessage hello;
  hello.mutable_hello()->mutable_version()->set_major(1);
  hello.mutable_hello()->mutable_version()->set_minor(
      reconnect_delay_ms >= 0 ? 3 : 2);
  hello.mutable_hello()->set_pid(::getpid());
  hello.mutable_hello()->set_supports_release(supports_release);
  hello.mutable_hello()->set_max_connections_per_message(16);
  return hello;
}

// The release modes: a poll() loop over the channel and the clients.
class LineServer {
 public:
  LineServer(std::unique_ptr<fdbroker::wire::MessageChannel> channel,
             const char* path, bool supported, int heartbeat_ms)
      : channel_(std::move(channel)),
        path_(path),
        supported_(supported),
        heartbeat_ms_(std::max(heartbeat_ms / 2, 10)) {}

  [[noreturn]] void Run() {
    for (;;) {
      if (move_at_.has_value() &&
          std::chrono::steady_clock::now() >= *move_at_) {
        Move();
      }
      std::vector<pollfd> fds;
      // After a Reconnect the old channel is not read any more.
      fds.push_back(
          {channel_->fd(), move_at_.has_value() ? short{0} : short{POLLIN}, 0});
      std::vector<uint64_t> ids;
      for (const auto& [id, client] : clients_) {
        fds.push_back({client.fd.get(), POLLIN, 0});
        ids.push_back(id);
      }
      ::poll(fds.data(), fds.size(), heartbeat_ms_);
      const auto now = std::chrono::steady_clock::now();
      if (now - last_heartbeat_ >= std::chrono::milliseconds(heartbeat_ms_)) {
        last_heartbeat_ = now;
        Send(HeartbeatMessage());
      }
      for (size_t i = 1; i < fds.size(); ++i) {
        if (fds[i].revents != 0) OnClientReadable(ids[i - 1]);
      }
      if (fds[0].revents != 0) ReadChannel();
      if (draining_) ReleaseIdle(~0u, v1::RELEASE_REASON_DRAIN);
      if (draining_ && clients_.empty()) {
        v1::HandoffMessage goodbye;
        goodbye.mutable_goodbye()->set_reason("drained");
        Send(goodbye);
        std::exit(0);
      }
    }
  }

 private:
  struct Client {
    UniqueFd fd;
    std::string partial;   // Part of a line: the connection is busy.
    std::string deferred;  // Whole DEFER lines read and not answered.
  };

  static v1::HandoffMessage HeartbeatMessage() {
    v1::HandoffMessage m;
    m.mutable_heartbeat();
    return m;
  }

  void Send(v1::HandoffMessage& message, int fd = -1) {
    absl::StatusOr<fdbroker::wire::SendResult> r = channel_->Send(message, fd);
    if (!r.ok()) Fail(std::string(r.status().message()));
  }
  void Send(v1::HandoffMessage&& message) { Send(message); }

  void ReadChannel() {
    for (;;) {
      v1::HandoffMessage message;
      std::vector<UniqueFd> fds;
      absl::StatusOr<fdbroker::wire::ReceiveResult> r =
          channel_->Receive(message, fds);
      if (!r.ok()) Fail(std::string(r.status().message()));
      if (*r == fdbroker::wire::ReceiveResult::kPeerClosed) {
        Fail("broker gone");
      }
      if (*r != fdbroker::wire::ReceiveResult::kReceived) return;
      switch (message.body_case()) {
        case v1::HandoffMessage::kConnection:
          Take({message.connection()}, fds);
          break;
        case v1::HandoffMessage::kConnectionBatch:
          Take({message.connection_batch().connections().begin(),
                message.connection_batch().connections().end()},
               fds);
          break;
        case v1::HandoffMessage::kReleaseRequest:
          ReleaseIdle(message.release_request().max_connections(),
                      message.release_request().reason());
          break;
        case v1::HandoffMessage::kReconnect:
          if (reconnect_delay_ms >= 0) {
            move_at_ = std::chrono::steady_clock::now() +
                       std::chrono::milliseconds(reconnect_delay_ms);
            return;
          }
          break;
        case v1::HandoffMessage::kDrain:
          std::printf("drain release_idle=%d\n",
                      message.drain().release_idle() ? 1 : 0);
          std::fflush(stdout);
          if (!message.drain().release_idle()) CloseAll();
          draining_ = true;
          break;
        default:
          break;
      }
    }
  }

  // Registers with the broker at path_ again, with every client.
  void Move() {
    move_at_.reset();
    channel_ =
        std::make_unique<fdbroker::wire::MessageChannel>(ConnectTo(path_));
    v1::HandoffMessage hello = LineHello(supported_);
    hello.mutable_hello()->set_was_supervised(true);
    for (const auto& [id, client] : clients_) {
      hello.mutable_hello()->add_owned_connections()->set_connection_id(id);
    }
    Send(hello);
    UniqueFd none;
    if (!Next(*channel_, none).has_welcome()) Fail("not welcomed back");
    std::printf("moved\n");
    std::fflush(stdout);
  }

  void Take(const std::vector<v1::Connection>& connections,
            std::vector<UniqueFd>& fds) {
    v1::HandoffMessage ack;
    for (size_t i = 0; i < connections.size(); ++i) {
      const uint64_t id = connections[i].connection_id();
      ack.mutable_ack()->add_connection_ids(id);
      if (print_listeners) {
        std::printf("took %llu from %s peer %s\n",
                    static_cast<unsigned long long>(id),
                    connections[i].listener().c_str(),
                    connections[i].peer_address().c_str());
        std::fflush(stdout);
      } else if (print_ids) {
        std::printf("took %llu\n", static_cast<unsigned long long>(id));
        std::fflush(stdout);
      }
      Client& client = clients_[id];
      client.fd = std::move(fds[i]);
      // Unread bytes of the previous owner come first, all answered.
      Answer(client, connections[i].initial_data(), /*defer=*/false);
    }
    Send(ack);
    if (!supported_ && !clients_.empty()) {
      // The protocol error this mode exists for.
      Release(clients_.begin()->first, v1::RELEASE_REASON_REBALANCE);
    }
  }

  void OnClientReadable(uint64_t id) {
    auto it = clients_.find(id);
    if (it == clients_.end()) return;
    char buf[4096];
    const ssize_t n =
        ::recv(it->second.fd.get(), buf, sizeof(buf), MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
    if (n <= 0) {
      clients_.erase(it);
      v1::HandoffMessage closed;
      closed.mutable_closed()->add_connection_ids(id);
      Send(closed);
      return;
    }
    Answer(it->second, std::string(buf, static_cast<size_t>(n)),
           /*defer=*/true);
  }

  // Answers every whole line of `bytes` (after what is partial); with
  // `defer`, DEFER lines are kept as unread data instead.
  void Answer(Client& client, const std::string& bytes, bool defer) {
    client.partial += bytes;
    size_t end;
    while ((end = client.partial.find('\n')) != std::string::npos) {
      const std::string line = client.partial.substr(0, end);
      client.partial.erase(0, end + 1);
      if (defer && line.rfind("DEFER", 0) == 0) {
        client.deferred += line + "\n";
        continue;
      }
      if (line.rfind("GROW", 0) == 0) GrowRss();
      const std::string reply = std::to_string(::getpid()) + " " + line + "\n";
      (void)!::send(client.fd.get(), reply.data(), reply.size(), MSG_NOSIGNAL);
    }
  }

  void ReleaseIdle(uint32_t max, v1::ReleaseReason reason) {
    std::vector<uint64_t> idle;
    for (const auto& [id, client] : clients_) {
      if (idle.size() >= max) break;
      if (client.partial.empty()) idle.push_back(id);
    }
    for (uint64_t id : idle) Release(id, reason);
  }

  void Release(uint64_t id, v1::ReleaseReason reason) {
    Client& client = clients_[id];
    v1::HandoffMessage release;
    release.mutable_release()->set_connection_id(id);
    release.mutable_release()->set_unread_data(client.deferred);
    release.mutable_release()->set_reason(reason);
    Send(release, client.fd.get());
    clients_.erase(id);  // Closes our copy; the socket is the broker's now.
  }

  void CloseAll() {
    if (clients_.empty()) return;
    v1::HandoffMessage closed;
    for (const auto& [id, client] : clients_) {
      closed.mutable_closed()->add_connection_ids(id);
    }
    clients_.clear();
    Send(closed);
  }

  std::unique_ptr<fdbroker::wire::MessageChannel> channel_;
  const char* const path_;
  // Set by a Reconnect (--reconnect_delay_ms): when to move.
  std::optional<std::chrono::steady_clock::time_point> move_at_;
  const bool supported_;
  const int heartbeat_ms_;
  bool draining_ = false;
  std::chrono::steady_clock::time_point last_heartbeat_;
  std::map<uint64_t, Client> clients_;
};

}  // namespace

int main(int argc, char** argv) {
  std::string mode;
  const char* rejoin_marker = nullptr;
  std::map<std::string, std::string> labels;
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--label=", 8) == 0) {
      const char* equals = std::strchr(argv[i] + 8, '=');
      if (equals == nullptr) Fail("--label=KEY=VALUE");
      const char* key = argv[i] + 8;
      labels[std::string(key, static_cast<size_t>(equals - key))] = equals + 1;
    }
    if (std::strncmp(argv[i], "--mode=", 7) == 0) mode = argv[i] + 7;
    if (std::strcmp(argv[i], "--print_ids") == 0) print_ids = true;
    if (std::strncmp(argv[i], "--rejoin_marker=", 16) == 0) {
      rejoin_marker = argv[i] + 16;
    }
    if (std::strncmp(argv[i], "--grow_rss_mb=", 14) == 0) {
      grow_rss_mb = std::atoi(argv[i] + 14);
    }
    if (std::strncmp(argv[i], "--reconnect_delay_ms=", 21) == 0) {
      reconnect_delay_ms = std::atoi(argv[i] + 21);
    }
    if (std::strcmp(argv[i], "--print_listeners") == 0) {
      print_listeners = true;
    }
  }
  const bool line_server = mode == "release" || mode == "release_unsupported";
  if (mode != "die_before_ack" && mode != "stall" && mode != "never_ack" &&
      mode != "rejoin" && !line_server) {
    Fail("unknown --mode");
  }
  const char* path = std::getenv("FDBROKER_SOCKET");
  if (path == nullptr) Fail("FDBROKER_SOCKET not set");
  fdbroker::wire::MessageChannel channel = ConnectTo(path);
  fdbroker::v1::HandoffMessage hello;
  if (line_server) {
    hello = LineHello(mode == "release");
  } else {
    hello.mutable_hello()->mutable_version()->set_major(1);
    hello.mutable_hello()->set_pid(::getpid());
  }
  (*hello.mutable_hello()->mutable_labels())["kind"] = "fake-" + mode;
  for (const auto& [key, value] : labels) {
    (*hello.mutable_hello()->mutable_labels())[key] = value;
  }
  if (!channel.Send(hello).ok()) Fail("send hello");
  fdbroker::wire::UniqueFd fd;
  fdbroker::v1::HandoffMessage welcome = Next(channel, fd);
  if (welcome.body_case() != fdbroker::v1::HandoffMessage::kWelcome) {
    Fail("not welcomed");
  }
  std::printf("registered\n");
  std::fflush(stdout);
  if (line_server) {
    LineServer server(
        std::make_unique<fdbroker::wire::MessageChannel>(std::move(channel)),
        path, mode == "release",
        static_cast<int>(welcome.welcome().heartbeat_interval_ms()));
    server.Run();
  }
  if (mode == "stall") {
    for (;;) ::pause();
  }
  if (mode == "rejoin") {
    RunRejoin(
        std::make_unique<fdbroker::wire::MessageChannel>(std::move(channel)),
        path, rejoin_marker,
        static_cast<int>(welcome.welcome().heartbeat_interval_ms()));
  }
  if (mode == "never_ack") {
    const int interval_ms =
        static_cast<int>(welcome.welcome().heartbeat_interval_ms());
    std::vector<fdbroker::wire::UniqueFd> kept;
    auto last_sent = std::chrono::steady_clock::now();
    for (;;) {
      // A heartbeat every interval, however busy: it is never silent.
      if (std::chrono::steady_clock::now() - last_sent >=
          std::chrono::milliseconds(interval_ms)) {
        fdbroker::v1::HandoffMessage heartbeat;
        heartbeat.mutable_heartbeat();
        if (!channel.Send(heartbeat).ok()) Fail("broker gone");
        last_sent = std::chrono::steady_clock::now();
      }
      pollfd p{channel.fd(), POLLIN, 0};
      if (::poll(&p, 1, interval_ms / 2) == 0) continue;
      fdbroker::v1::HandoffMessage message = Next(channel, fd);
      if (fd) kept.push_back(std::move(fd));
    }
  }
  for (;;) {
    fdbroker::v1::HandoffMessage message = Next(channel, fd);
    if (message.body_case() == fdbroker::v1::HandoffMessage::kConnection) {
      // Die holding the fd, never acking: the broker must re-place it.
      std::_Exit(1);
    }
  }
}
