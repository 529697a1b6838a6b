// ConfigFromFlags: every invalid flag value is InvalidArgument with a message
// that names the flag. Flags are set by name through absl's reflection, so
// the test does not depend on where they are declared.
#include "broker/config.h"

#include <string>
#include <utility>
#include <vector>

#include "absl/flags/reflection.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace fdbroker {
namespace {

using ::testing::HasSubstr;

// A file that exists and is readable (not a certificate: the flags are
// refused before anything parses it).
constexpr char kReadable[] = FDBROKER_SOURCE_DIR "/CMakeLists.txt";

void SetFlag(const std::string& name, const std::string& value) {
  absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
  ASSERT_NE(flag, nullptr) << "--" << name;
  std::string error;
  ASSERT_TRUE(flag->ParseFrom(value, &error)) << "--" << name << ": " << error;
}

TEST(ConfigTest, DefaultsAreValid) {
  absl::FlagSaver saver;
  absl::StatusOr<BrokerConfig> config = ConfigFromFlags("/opt/fdbroker/bin");
  ASSERT_TRUE(config.ok()) << config.status();
  ASSERT_EQ(config->listen.size(), 1u);
  EXPECT_EQ(config->listen[0].address.ToString(), "0.0.0.0:8080");
  EXPECT_FALSE(config->listen[0].proxy_protocol);
  EXPECT_EQ(config->listener.proxy_header_timeout, absl::Seconds(3));
  EXPECT_EQ(config->worker_argv,
            std::vector<std::string>{"/opt/fdbroker/bin/fdbroker-http-worker"});
  EXPECT_EQ(config->manager.max_workers, 64);
  EXPECT_EQ(config->policy, "least_conn");
  EXPECT_EQ(config->manager.drain_timeout, absl::Seconds(30));
  EXPECT_EQ(config->manager.worker_timeout, absl::Seconds(30));
  EXPECT_EQ(config->dispatcher.pending_timeout, absl::Seconds(10));
  EXPECT_EQ(config->dispatcher.max_pending, 4096u);
  EXPECT_EQ(config->control.address, "127.0.0.1:50051");
}

struct BadFlags {
  std::vector<std::pair<std::string, std::string>> flags;
  // The flag the message must name.
  std::string names;
};

class ConfigRejectsTest : public ::testing::TestWithParam<BadFlags> {};

TEST_P(ConfigRejectsTest, WithInvalidArgumentNamingTheFlag) {
  absl::FlagSaver saver;
  for (const auto& [name, value] : GetParam().flags) SetFlag(name, value);
  absl::StatusOr<BrokerConfig> config = ConfigFromFlags("/opt/fdbroker/bin");
  ASSERT_FALSE(config.ok());
  EXPECT_TRUE(absl::IsInvalidArgument(config.status())) << config.status();
  EXPECT_THAT(config.status().message(), HasSubstr(GetParam().names));
}

INSTANTIATE_TEST_SUITE_P(
    EveryCheck, ConfigRejectsTest,
    ::testing::Values(
        BadFlags{{{"listen", "nowhere"}}, "--listen"},
        BadFlags{{{"listen", "127.0.0.1:99999"}}, "--listen"},
        BadFlags{{{"listen", "127.0.0.1:80,proxy"}}, "--listen"},
        BadFlags{{{"proxy_header_timeout", "0s"}}, "--proxy_header_timeout"},
        BadFlags{{{"socket", "/tmp/" + std::string(120, 's')}}, "--socket"},
        BadFlags{{{"max_workers", "0"}}, "--max_workers"},
        BadFlags{{{"max_workers", "1025"}}, "--max_workers"},
        BadFlags{{{"workers", "-1"}}, "--workers"},
        BadFlags{{{"max_workers", "2"}, {"workers", "3"}}, "--workers"},
        BadFlags{{{"worker_cmd", "'unterminated"}}, "--worker_cmd"},
        BadFlags{{{"workers", "1"}, {"worker_cmd", "/nonexistent/worker"}},
                 "--worker_cmd"},
        BadFlags{{{"policy", "fastest"}}, "--policy"},
        BadFlags{{{"drain_timeout", "0s"}}, "--drain_timeout"},
        BadFlags{{{"drain_timeout", "inf"}}, "--drain_timeout"},
        BadFlags{{{"heartbeat_interval", "-1s"}}, "--heartbeat_interval"},
        BadFlags{{{"heartbeat_timeout", "0s"}}, "--heartbeat_timeout"},
        BadFlags{{{"worker_start_timeout", "0s"}}, "--worker_start_timeout"},
        BadFlags{{{"ack_timeout", "0s"}}, "--ack_timeout"},
        BadFlags{{{"ack_timeout", "inf"}}, "--ack_timeout"},
        BadFlags{{{"worker_timeout", "-1s"}}, "--worker_timeout"},
        BadFlags{{{"worker_timeout", "inf"}}, "--worker_timeout"},
        BadFlags{{{"heartbeat_interval", "1s"}, {"worker_timeout", "1500ms"}},
                 "--worker_timeout"},
        BadFlags{{{"pending_timeout", "0s"}}, "--pending_timeout"},
        BadFlags{{{"pending_timeout", "-5s"}}, "--pending_timeout"},
        BadFlags{
            {{"heartbeat_interval", "1s"}, {"heartbeat_timeout", "1500ms"}},
            "--heartbeat_timeout"},
        BadFlags{{{"heartbeat_interval", "5ms"}}, "--heartbeat_interval"},
        BadFlags{{{"max_pending", "-1"}}, "--max_pending"},
        BadFlags{{{"loop_slice", "50us"}}, "--loop_slice"},
        BadFlags{{{"loop_slice", "1s"}}, "--loop_slice"},
        BadFlags{{{"adopt_grace", "-1s"}}, "--adopt_grace"},
        BadFlags{{{"adopt_grace", "11m"}}, "--adopt_grace"},
        BadFlags{{{"metrics", "nowhere"}}, "--metrics"},
        BadFlags{{{"control", "nowhere"}}, "--control"},
        BadFlags{{{"control", "0.0.0.0:50051"}}, "--control"},
        BadFlags{{{"admin_subjects", "CN=ops"}}, "--admin_subjects"},
        BadFlags{{{"tls_cert", kReadable}}, "--tls_cert"},
        BadFlags{{{"tls_key", kReadable}}, "--tls_key"},
        BadFlags{{{"tls_client_ca", kReadable}}, "--tls_client_ca"},
        BadFlags{
            {{"tls_cert", "/nonexistent/cert.pem"}, {"tls_key", kReadable}},
            "--tls_cert"},
        BadFlags{{{"tls_cert", kReadable}, {"tls_key", "/nonexistent/key.pem"}},
                 "--tls_key"}));

TEST(ConfigTest, WorkerTimeoutZeroTurnsTheWatchdogOff) {
  absl::FlagSaver saver;
  SetFlag("worker_timeout", "0");
  absl::StatusOr<BrokerConfig> config = ConfigFromFlags("/opt/fdbroker/bin");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->manager.worker_timeout, absl::ZeroDuration());
}

}  // namespace
}  // namespace fdbroker
