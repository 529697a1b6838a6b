// Several listeners end to end: the real broker with --listen given three
// times (IPv4, IPv6, a Unix socket with its mode) serves clients on each,
// and every Connection its worker receives names the listener the client
// came through (the fake worker prints what it took).
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gtest/gtest.h"
#include "tests/integration/broker_process.h"
#include "tests/util/subprocess.h"
#include "tests/util/test_util.h"
#include "wire/socket_address.h"

namespace fdbroker::testing {
namespace {

// Sends `line` and reads the fake worker's answer line ("<pid> <line>").
std::string Exchange(int fd, const std::string& line) {
  const std::string sent = line + "\n";
  if (::send(fd, sent.data(), sent.size(), MSG_NOSIGNAL) !=
      static_cast<ssize_t>(sent.size())) {
    return "send failed";
  }
  std::string answer;
  char c;
  timeval timeout{10, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  while (::recv(fd, &c, 1, 0) == 1 && c != '\n') answer.push_back(c);
  return answer;
}

// Each test's private directory (for its Unix sockets), removed after it.
class ListenersTest : public ::testing::Test {
 protected:
  void TearDown() override {
    std::error_code ignored;
    std::filesystem::remove_all(dir_, ignored);
  }
  // The broker's listener names, from its ready file (listeners=).
  static std::vector<std::string> Names(BrokerProcess& broker) {
    absl::StatusOr<std::map<std::string, std::string>> ready =
        ReadKeyValueFile(broker.dir() + "/ready");
    if (!ready.ok()) return {};
    return absl::StrSplit((*ready)["listeners"], ' ');
  }
  const std::string dir_ = MakeTempDir();
};

TEST_F(ListenersTest,
       TcpV4V6AndUnixListenersAreServedAndEachConnectionSaysWhich) {
  const std::string unix_path = dir_ + "/clients.sock";
  absl::StatusOr<std::unique_ptr<BrokerProcess>> broker = BrokerProcess::Start(
      {"--listen=127.0.0.1:0", "--listen=[::1]:0",
       "--listen=unix:" + unix_path + ",mode=0660", "--workers=1",
       "--worker_cmd=" + BinaryPath("fdbroker-fake-worker") +
           " --mode=release --print_listeners"});
  ASSERT_TRUE(broker.ok()) << broker.status();
  absl::StatusOr<std::map<std::string, std::string>> ready =
      ReadKeyValueFile((*broker)->dir() + "/ready");
  ASSERT_TRUE(ready.ok());
  const std::vector<std::string> names =
      absl::StrSplit((*ready)["listeners"], ' ');
  ASSERT_EQ(names.size(), 3u) << (*ready)["listeners"];
  EXPECT_TRUE(absl::StartsWith(names[0], "127.0.0.1:")) << names[0];
  EXPECT_TRUE(absl::StartsWith(names[1], "[::1]:")) << names[1];
  EXPECT_EQ(names[2], "unix:" + unix_path);
  EXPECT_EQ((*ready)["listen"], names[0]);
  struct stat st;
  ASSERT_EQ(::stat(unix_path.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0660u);

  std::vector<wire::UniqueFd> clients;
  for (int i = 0; i < 2; ++i) {
    absl::StatusOr<wire::HostPort> hp = wire::HostPort::Parse(names[i]);
    ASSERT_TRUE(hp.ok()) << names[i];
    absl::StatusOr<wire::UniqueFd> fd = ConnectTcp(hp->host, hp->port);
    ASSERT_TRUE(fd.ok()) << fd.status();
    clients.push_back(*std::move(fd));
  }
  absl::StatusOr<wire::UniqueFd> unix_client = ConnectUnix(unix_path);
  ASSERT_TRUE(unix_client.ok()) << unix_client.status();
  clients.push_back(*std::move(unix_client));

  for (size_t i = 0; i < clients.size(); ++i) {
    const std::string line = absl::StrCat("hello ", i);
    const std::string answer = Exchange(clients[i].get(), line);
    EXPECT_TRUE(absl::EndsWith(answer, " " + line))
        << names[i] << ": " << answer << "\n"
        << (*broker)->process().Output();
  }
  // The worker printed each Connection's listener and peer.
  const std::string v4_peer =
      wire::SocketAddress::Of(clients[0].get())->ToString();
  const std::string v6_peer =
      wire::SocketAddress::Of(clients[1].get())->ToString();
  EXPECT_TRUE(WaitFor(
      [&] {
        const std::string out = (*broker)->process().Stdout();
        return absl::StrContains(
                   out, " from " + names[0] + " peer " + v4_peer + "\n") &&
               absl::StrContains(
                   out, " from " + names[1] + " peer " + v6_peer + "\n") &&
               absl::StrContains(out, " from " + names[2] + " peer ");
      },
      absl::Seconds(10)))
      << (*broker)->process().Output();
  // Each listener's accepts are counted under its name.
  const std::string metrics = (*ready)["metrics"];
  EXPECT_TRUE(WaitFor(
      [&] {
        absl::StatusOr<std::string> scrape = ScrapeMetrics(metrics);
        if (!scrape.ok()) return false;
        std::map<std::string, double> samples = MetricSamples(*scrape);
        for (const std::string& name : names) {
          if (samples[absl::StrCat(
                  "fdbroker_listener_connections_accepted_total{listener=\"",
                  name, "\"}")] != 1) {
            return false;
          }
        }
        return true;
      },
      absl::Seconds(5)))
      << ScrapeMetrics(metrics).value_or("no scrape");
  clients.clear();
  broker->reset();
}

// One broker, two pools: each external worker's Hello label "listeners"
// names the listener it serves, and gets that listener's clients only.
TEST_F(ListenersTest, WorkersServeTheListenersTheirLabelNames) {
  const std::string unix_path = dir_ + "/b.sock";
  absl::StatusOr<std::unique_ptr<BrokerProcess>> broker = BrokerProcess::Start(
      {"--listen=127.0.0.1:0", "--listen=unix:" + unix_path});
  ASSERT_TRUE(broker.ok()) << broker.status();
  const std::vector<std::string> names = Names(**broker);
  ASSERT_EQ(names.size(), 2u);
  std::vector<std::unique_ptr<Subprocess>> workers;
  for (const std::string& name : names) {
    Subprocess::Options options;
    options.env["FDBROKER_SOCKET"] = (*broker)->socket_path();
    absl::StatusOr<std::unique_ptr<Subprocess>> worker =
        Subprocess::Start({BinaryPath("fdbroker-fake-worker"), "--mode=release",
                           "--label=listeners=" + name},
                          options);
    ASSERT_TRUE(worker.ok()) << worker.status();
    workers.push_back(*std::move(worker));
    ASSERT_TRUE(WaitFor(
        [&] {
          return absl::StrContains(workers.back()->Stdout(), "registered");
        },
        absl::Seconds(10)))
        << workers.back()->Output();
  }
  absl::StatusOr<wire::HostPort> tcp = wire::HostPort::Parse(names[0]);
  ASSERT_TRUE(tcp.ok());
  for (int round = 0; round < 3; ++round) {
    for (size_t i = 0; i < names.size(); ++i) {
      absl::StatusOr<wire::UniqueFd> client =
          i == 0 ? ConnectTcp(tcp->host, tcp->port) : ConnectUnix(unix_path);
      ASSERT_TRUE(client.ok()) << client.status();
      const std::string answer = Exchange(client->get(), "which");
      EXPECT_EQ(answer, absl::StrCat(workers[i]->pid(), " which"))
          << names[i] << "\n"
          << (*broker)->process().Output();
    }
  }
  workers.clear();
  broker->reset();
}

TEST_F(ListenersTest, ALiveUnixListenerIsNotReplaced) {
  const std::string unix_path = dir_ + "/clients.sock";
  absl::StatusOr<std::unique_ptr<BrokerProcess>> first =
      BrokerProcess::Start({"--listen=unix:" + unix_path, "--control="});
  ASSERT_TRUE(first.ok()) << first.status();
  absl::StatusOr<std::unique_ptr<BrokerProcess>> second =
      BrokerProcess::Start({"--listen=unix:" + unix_path, "--control="});
  ASSERT_FALSE(second.ok());
  EXPECT_TRUE(absl::StrContains(second.status().message(),
                                "another process listens on"))
      << second.status();
  EXPECT_TRUE(ConnectUnix(unix_path).ok()) << "the first still serves";
  first->reset();
}

}  // namespace
}  // namespace fdbroker::testing
