#ifndef FDBROKER_TESTS_INTEGRATION_BROKER_PROCESS_H_
#define FDBROKER_TESTS_INTEGRATION_BROKER_PROCESS_H_

#include <sys/types.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "tests/util/subprocess.h"
#include "tests/util/test_util.h"

namespace fdbroker::testing {

// The real fdbroker binary on 127.0.0.1 port 0 with a private hand-off
// socket, started and ready (listening) when Start() returns. Its workers
// are killed with it if a test fails half-way.
class BrokerProcess {
 public:
  // `command_prefix` runs the broker through another command that execs it
  // (e.g. {"prlimit", "--nofile=128"}), so pid() is still the broker's.
  static absl::StatusOr<std::unique_ptr<BrokerProcess>> Start(
      std::vector<std::string> extra_flags,
      std::vector<std::string> command_prefix = {});
  ~BrokerProcess();

  Subprocess& process() { return *process_; }
  pid_t pid() const { return process_->pid(); }
  int port() const { return port_; }
  const std::string& socket_path() const { return socket_path_; }
  // "127.0.0.1:PORT" of the control plane ("" if disabled).
  const std::string& control_address() const { return control_address_; }
  const std::string& dir() const { return dir_; }

  // Supervised worker pids (children of the broker) right now.
  std::vector<pid_t> WorkerPids() const;
  // Waits until exactly `n` workers run and each has registered (its pid
  // answers through the broker).
  bool WaitForWorkers(size_t n, absl::Duration timeout);

 private:
  BrokerProcess() = default;
  std::unique_ptr<Subprocess> process_;
  std::string dir_;
  std::string socket_path_;
  std::string control_address_;
  int port_ = 0;
};

// The built binary `name` (or the one in $FDBROKER_TEST_BIN_DIR if set).
std::string BinaryPath(const std::string& name);

// GET /metrics from a broker's --metrics address ("host:port").
absl::StatusOr<std::string> ScrapeMetrics(const std::string& address);
// "name{labels}" -> value for every sample line of a Prometheus text scrape.
std::map<std::string, double> MetricSamples(const std::string& text);
// The value of one series ("name{labels}") of a scrape of `address`; -1 if
// the scrape fails or lacks it.
double MetricValue(const std::string& address, const std::string& series);

// The X-Worker-Pid of an fdbroker-http-worker response (0 if absent).
pid_t WorkerPid(const HttpResponse& response);

}  // namespace fdbroker::testing

#endif  // FDBROKER_TESTS_INTEGRATION_BROKER_PROCESS_H_
