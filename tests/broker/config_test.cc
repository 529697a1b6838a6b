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

// --placement=kernel on a loopback port, then `flags`.
absl::StatusOr<BrokerConfig> KernelConfig(
    const std::vector<std::pair<std::string, std::string>>& flags = {}) {
  SetFlag("placement", "kernel");
  SetFlag("listen", "127.0.0.1:0");
  for (const auto& [name, value] : flags) SetFlag(name, value);
  return ConfigFromFlags("/opt/fdbroker/bin");
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
  EXPECT_FALSE(config->kernel_placement);
  EXPECT_FALSE(config->listener.reuseport);
}

TEST(ConfigTest, KernelPlacementBindsWithReuseport) {
  absl::FlagSaver saver;
  absl::StatusOr<BrokerConfig> config = KernelConfig();
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_TRUE(config->kernel_placement);
  EXPECT_TRUE(config->listener.reuseport);
  EXPECT_EQ(config->kernel.mode, KernelPlacement::Options::Mode::kWeighted);
  EXPECT_EQ(config->kernel.uneven_for, absl::Seconds(1));
}

TEST(ConfigTest, KernelPlacementModeFollowsThePolicy) {
  absl::FlagSaver saver;
  using Mode = KernelPlacement::Options::Mode;
  for (const auto& [policy, mode] : {std::pair{"least_conn", Mode::kWeighted},
                                     std::pair{"p2c", Mode::kWeighted},
                                     std::pair{"round_robin", Mode::kWeighted},
                                     std::pair{"ip_hash", Mode::kSticky}}) {
    absl::StatusOr<BrokerConfig> config = KernelConfig({{"policy", policy}});
    ASSERT_TRUE(config.ok()) << config.status();
    EXPECT_EQ(config->kernel.mode, mode) << policy;
  }
}

TEST(ConfigTest, KernelRebalanceAfterZeroTurnsItOff) {
  absl::FlagSaver saver;
  absl::StatusOr<BrokerConfig> config =
      KernelConfig({{"kernel_rebalance_after", "0"}});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->kernel.uneven_for, absl::ZeroDuration());
}

// The workers' listeners travel in the UpgradeHandover (protocol.md §7.9).
TEST(ConfigTest, KernelPlacementAllowsUpgrade) {
  absl::FlagSaver saver;
  absl::StatusOr<BrokerConfig> config = KernelConfig({{"upgrade", "true"}});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_TRUE(config->kernel_placement);
  EXPECT_TRUE(config->upgrade);
}

TEST(ConfigTest, RecyclingFlags) {
  absl::FlagSaver saver;
  SetFlag("max_connections_per_worker", "1000");
  SetFlag("max_connections_jitter", "50");
  SetFlag("max_worker_rss", "512MiB");
  SetFlag("max_worker_age", "6h");
  absl::StatusOr<BrokerConfig> config = ConfigFromFlags("/opt/fdbroker/bin");
  ASSERT_TRUE(config.ok()) << config.status();
  const WorkerRecycler::Options& recycle = config->manager.recycle;
  EXPECT_EQ(recycle.max_connections, 1000u);
  EXPECT_EQ(recycle.max_connections_jitter, 50u);
  EXPECT_EQ(recycle.max_rss_bytes, uint64_t{512} << 20);
  EXPECT_EQ(recycle.max_age, absl::Hours(6));
}

TEST(ConfigTest, RecyclingIsOffByDefault) {
  absl::FlagSaver saver;
  absl::StatusOr<BrokerConfig> config = ConfigFromFlags("/opt/fdbroker/bin");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->manager.recycle.max_connections, 0u);
  EXPECT_EQ(config->manager.recycle.max_rss_bytes, 0u);
  EXPECT_EQ(config->manager.recycle.max_age, absl::ZeroDuration());
}

TEST(ParseByteSizeTest, UnitsAndErrors) {
  EXPECT_EQ(*ParseByteSize(""), 0u);
  EXPECT_EQ(*ParseByteSize("0"), 0u);
  EXPECT_EQ(*ParseByteSize("1048576"), 1048576u);
  EXPECT_EQ(*ParseByteSize("100B"), 100u);
  EXPECT_EQ(*ParseByteSize("2KiB"), 2048u);
  EXPECT_EQ(*ParseByteSize("2kb"), 2000u);
  EXPECT_EQ(*ParseByteSize("512MiB"), uint64_t{512} << 20);
  EXPECT_EQ(*ParseByteSize("512M"), uint64_t{512} << 20);
  EXPECT_EQ(*ParseByteSize("500MB"), 500000000u);
  EXPECT_EQ(*ParseByteSize("2G"), uint64_t{2} << 30);
  EXPECT_EQ(*ParseByteSize("1GB"), 1000000000u);
  EXPECT_EQ(*ParseByteSize("1TiB"), uint64_t{1} << 40);
  for (const char* bad : {"MiB", "1.5G", "12 parsecs", "-1", "1PiB", "2000T",
                          "99999999999999999999"}) {
    absl::StatusOr<uint64_t> size = ParseByteSize(bad);
    EXPECT_FALSE(size.ok()) << bad;
    EXPECT_TRUE(absl::IsInvalidArgument(size.status())) << bad;
  }
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
        BadFlags{{{"placement", "fastest"}}, "--placement"},
        BadFlags{{{"placement", "kernel"}, {"listen", "unix:/tmp/fdb.sock"}},
                 "--placement=kernel"},
        BadFlags{{{"placement", "kernel"},
                  {"listen", "127.0.0.1:80,proxy_protocol"}},
                 "--placement=kernel"},
        BadFlags{{{"kernel_rebalance_after", "-1s"}},
                 "--kernel_rebalance_after"},
        BadFlags{{{"placement", "kernel"},
                  {"listen", "127.0.0.1:0"},
                  {"kernel_rebalance_after", "inf"}},
                 "--kernel_rebalance_after"},
        BadFlags{{{"kernel_rebalance_after", "5s"}},
                 "--kernel_rebalance_after"},
        BadFlags{{{"placement", "kernel"},
                  {"listen", "127.0.0.1:0"},
                  {"policy", "ip_hash"},
                  {"kernel_rebalance_after", "0"}},
                 "--kernel_rebalance_after"},
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
        BadFlags{{{"max_connections_per_worker", "-1"}},
                 "--max_connections_per_worker"},
        BadFlags{{{"max_connections_jitter", "-5"}},
                 "--max_connections_jitter"},
        BadFlags{{{"max_connections_jitter", "10"}},
                 "--max_connections_jitter"},
        BadFlags{{{"max_worker_rss", "lots"}}, "--max_worker_rss"},
        BadFlags{{{"max_worker_rss", "512XB"}}, "--max_worker_rss"},
        BadFlags{{{"max_worker_rss", "-1MiB"}}, "--max_worker_rss"},
        BadFlags{{{"max_worker_rss", "1000"}}, "--max_worker_rss"},
        BadFlags{{{"max_worker_rss", "2000TiB"}}, "--max_worker_rss"},
        BadFlags{{{"max_worker_age", "500ms"}}, "--max_worker_age"},
        BadFlags{{{"max_worker_age", "-1h"}}, "--max_worker_age"},
        BadFlags{{{"max_worker_age", "inf"}}, "--max_worker_age"},
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
