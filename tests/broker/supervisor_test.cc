#include "broker/supervisor.h"

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "gtest/gtest.h"

namespace fdbroker {
namespace {

std::string Slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

std::vector<std::string> ListDir(const std::string& path) {
  std::vector<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(path)) {
    names.push_back(entry.path().filename().string());
  }
  std::sort(names.begin(), names.end());
  return names;
}

TEST(SupervisorTest, ChildGetsOnlyStdioTheSocketEnvAndItsOwnGroup) {
  auto loop = *EventLoop::Create();
  // A descriptor without CLOEXEC: a careless fork/exec would leak it.
  int leaky = ::open("/dev/null", O_RDONLY);
  ASSERT_GE(leaky, 3);
  pid_t exited_pid = 0;
  int exit_status = -1;
  Supervisor supervisor(
      *loop, Supervisor::Options{{"/bin/sleep", "30"}, "/run/test.sock"},
      [&](pid_t pid, int status) {
        exited_pid = pid;
        exit_status = status;
        loop->Stop();
      });
  absl::StatusOr<pid_t> pid = supervisor.Spawn();
  ::close(leaky);
  ASSERT_TRUE(pid.ok()) << pid.status();
  EXPECT_EQ(supervisor.running(), 1u);
  const std::string proc = "/proc/" + std::to_string(*pid);
  // posix_spawn returns once exec has replaced the memory image, a moment
  // before the kernel has set up the new environment: poll for it.
  std::string environ;
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (environ.empty() && absl::Now() < deadline) {
    environ = Slurp(proc + "/environ");
    if (environ.empty()) absl::SleepFor(absl::Milliseconds(1));
  }
  EXPECT_EQ(Slurp(proc + "/comm"), "sleep\n");
  // The dynamic loader of the new image briefly holds its own files open:
  // poll until it is done. A leaked fd would never go away.
  const std::vector<std::string> stdio = {"0", "1", "2"};
  std::vector<std::string> fds;
  const absl::Time fd_deadline = absl::Now() + absl::Seconds(10);
  while ((fds = ListDir(proc + "/fd")) != stdio && absl::Now() < fd_deadline) {
    absl::SleepFor(absl::Milliseconds(1));
  }
  EXPECT_EQ(fds, stdio);
  EXPECT_NE(environ.find(std::string("FDBROKER_SOCKET=/run/test.sock\0", 31)),
            std::string::npos);
  EXPECT_EQ(::getpgid(*pid), *pid) << "child leads its own process group";

  supervisor.Signal(*pid, SIGTERM);
  loop->RunAfter(absl::Seconds(20), [&] { loop->Stop(); });
  loop->Run();
  EXPECT_EQ(exited_pid, *pid);
  EXPECT_EQ(DescribeWaitStatus(exit_status), "killed by signal 15 (SIGTERM)");
  EXPECT_EQ(supervisor.running(), 0u);
  // Reaped: no zombie left behind.
  EXPECT_EQ(::waitpid(*pid, nullptr, WNOHANG), -1);
}

TEST(SupervisorTest, ExitCodeIsReported) {
  auto loop = *EventLoop::Create();
  int exit_status = -1;
  Supervisor supervisor(*loop,
                        Supervisor::Options{{"/bin/sh", "-c", "exit 3"}, "/x"},
                        [&](pid_t, int status) {
                          exit_status = status;
                          loop->Stop();
                        });
  ASSERT_TRUE(supervisor.Spawn().ok());
  loop->RunAfter(absl::Seconds(20), [&] { loop->Stop(); });
  loop->Run();
  EXPECT_EQ(DescribeWaitStatus(exit_status), "exit code 3");
}

TEST(SupervisorTest, MissingProgramIsAClearError) {
  auto loop = *EventLoop::Create();
  Supervisor supervisor(*loop,
                        Supervisor::Options{{"no-such-program-fdbroker"}, "/x"},
                        [](pid_t, int) {});
  absl::StatusOr<pid_t> pid = supervisor.Spawn();
  ASSERT_FALSE(pid.ok());
  EXPECT_NE(pid.status().message().find("no-such-program-fdbroker"),
            absl::string_view::npos);
}

TEST(SupervisorTest, SignalKillsOnlyTheNamedChild) {
  auto loop = *EventLoop::Create();
  int exits = 0;
  int last_status = 0;
  Supervisor supervisor(*loop, Supervisor::Options{{"/bin/sleep", "30"}, "/x"},
                        [&](pid_t, int status) {
                          ++exits;
                          last_status = status;
                          loop->Stop();
                        });
  pid_t a = *supervisor.Spawn();
  pid_t b = *supervisor.Spawn();
  supervisor.Signal(a, SIGKILL);
  loop->RunAfter(absl::Seconds(20), [&] { loop->Stop(); });
  loop->Run();
  EXPECT_EQ(exits, 1);
  EXPECT_TRUE(WIFSIGNALED(last_status));
  EXPECT_EQ(DescribeWaitStatus(last_status), "killed by signal 9 (SIGKILL)");
  EXPECT_EQ(::kill(b, 0), 0) << "the other child still runs";
  supervisor.Signal(b, SIGKILL);
  loop->Run();
  EXPECT_EQ(exits, 2);
}

}  // namespace
}  // namespace fdbroker
