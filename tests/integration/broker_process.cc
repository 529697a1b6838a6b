#include "tests/integration/broker_process.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <set>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "tests/util/test_util.h"
#include "wire/socket_address.h"

namespace fdbroker::testing {

std::string BinaryPath(const std::string& name) {
  // FDBROKER_TEST_BIN_DIR runs a test against other binaries (e.g. an older
  // build, to see a new test fail on the old code).
  const char* dir = std::getenv("FDBROKER_TEST_BIN_DIR");
  return absl::StrCat(dir != nullptr && *dir != '\0' ? dir : FDBROKER_BIN_DIR,
                      "/", name);
}

absl::StatusOr<std::unique_ptr<BrokerProcess>> BrokerProcess::Start(
    std::vector<std::string> extra_flags,
    std::vector<std::string> command_prefix) {
  std::unique_ptr<BrokerProcess> broker(new BrokerProcess());
  broker->dir_ = MakeTempDir();
  broker->socket_path_ = broker->dir_ + "/handoff.sock";
  const std::string ready = broker->dir_ + "/ready";
  std::vector<std::string> argv = std::move(command_prefix);
  for (std::string flag :
       {BinaryPath("fdbroker"), std::string("--control=127.0.0.1:0"),
        std::string("--metrics=127.0.0.1:0"),
        "--socket=" + broker->socket_path_, "--ready_file=" + ready}) {
    argv.push_back(std::move(flag));
  }
  // --listen may be repeated: the default only when the test gives none.
  if (std::none_of(extra_flags.begin(), extra_flags.end(),
                   [](const std::string& flag) {
                     return absl::StartsWith(flag, "--listen=");
                   })) {
    argv.push_back("--listen=127.0.0.1:0");
  }
  for (std::string& flag : extra_flags) argv.push_back(std::move(flag));
  absl::StatusOr<std::unique_ptr<Subprocess>> process = Subprocess::Start(argv);
  if (!process.ok()) return process.status();
  broker->process_ = *std::move(process);
  absl::StatusOr<std::map<std::string, std::string>> values;
  const bool ready_seen = WaitFor(
      [&] {
        if (!broker->process_->Running()) return true;
        values = ReadKeyValueFile(ready);
        return values.ok();
      },
      absl::Seconds(20));
  if (!ready_seen || !values.ok()) {
    return absl::DeadlineExceededError(absl::StrCat(
        broker->process_->Running() ? "broker did not become ready\n"
                                    : "broker exited before it was ready\n",
        broker->process_->Output()));
  }
  // (0 when the first listener is a Unix socket.)
  absl::StatusOr<wire::HostPort> listen =
      wire::HostPort::Parse((*values)["listen"]);
  if (listen.ok()) broker->port_ = listen->port;
  broker->control_address_ = (*values)["control"];
  return broker;
}

BrokerProcess::~BrokerProcess() {
  // A failed test may leave the broker running: make sure its workers die
  // with it instead of lingering.
  if (process_ != nullptr && process_->Running()) {
    for (pid_t pid : WorkerPids()) process_->KillOnDestruction(pid);
  }
}

std::vector<pid_t> BrokerProcess::WorkerPids() const {
  return ChildPids(process_->pid());
}

absl::StatusOr<std::string> ScrapeMetrics(const std::string& address) {
  absl::StatusOr<wire::HostPort> hp = wire::HostPort::Parse(address);
  if (!hp.ok()) return hp.status();
  absl::StatusOr<HttpResponse> r =
      HttpGetOnce(hp->host, hp->port, "/metrics", absl::Seconds(5));
  if (!r.ok()) return r.status();
  if (r->status != 200) {
    return absl::InternalError(absl::StrCat("/metrics answered ", r->status));
  }
  return r->body;
}

std::map<std::string, double> MetricSamples(const std::string& text) {
  std::map<std::string, double> samples;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (line.empty() || line[0] == '#') continue;
    const size_t space = line.rfind(' ');
    double value = 0;
    if (space != absl::string_view::npos &&
        absl::SimpleAtod(line.substr(space + 1), &value)) {
      samples[std::string(line.substr(0, space))] = value;
    }
  }
  return samples;
}

double MetricValue(const std::string& address, const std::string& series) {
  absl::StatusOr<std::string> text = ScrapeMetrics(address);
  if (!text.ok()) return -1;
  std::map<std::string, double> samples = MetricSamples(*text);
  auto it = samples.find(series);
  return it == samples.end() ? -1 : it->second;
}

pid_t WorkerPid(const HttpResponse& response) {
  auto it = response.headers.find("x-worker-pid");
  int pid = 0;
  if (it == response.headers.end() || !absl::SimpleAtoi(it->second, &pid)) {
    return 0;
  }
  return pid;
}

bool BrokerProcess::WaitForWorkers(size_t n, absl::Duration timeout) {
  return WaitFor(
      [&] {
        std::vector<pid_t> pids = WorkerPids();
        if (pids.size() != n) return false;
        // Every worker answers through the broker: poll with fresh
        // connections until each pid has been seen.
        std::set<pid_t> want(pids.begin(), pids.end()), seen;
        for (int i = 0; i < 8 * static_cast<int>(n) + 8; ++i) {
          absl::StatusOr<HttpResponse> r =
              HttpGetOnce("127.0.0.1", port_, "/", absl::Seconds(2));
          if (!r.ok() || r->status != 200) return false;
          int pid = 0;
          if (absl::SimpleAtoi(r->headers["x-worker-pid"], &pid)) {
            seen.insert(pid);
          }
          if (seen == want) return true;
        }
        return false;
      },
      timeout, absl::Milliseconds(50));
}

}  // namespace fdbroker::testing
