#include "tests/util/subprocess.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <filesystem>
#include <set>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/util/test_util.h"

namespace fdbroker::testing {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr absl::Duration kTimeout = absl::Seconds(10);

std::unique_ptr<Subprocess> StartOrDie(std::vector<std::string> argv,
                                       Subprocess::Options options = {}) {
  absl::StatusOr<std::unique_ptr<Subprocess>> proc =
      Subprocess::Start(std::move(argv), std::move(options));
  EXPECT_TRUE(proc.ok()) << proc.status();
  return proc.ok() ? std::move(*proc) : nullptr;
}

TEST(SubprocessTest, ReportsExitCodeAndStdout) {
  auto proc = StartOrDie({"/bin/sh", "-c", "echo hi; exit 3"});
  ASSERT_NE(proc, nullptr);
  absl::StatusOr<int> code = proc->Wait(kTimeout);
  ASSERT_TRUE(code.ok()) << code.status();
  EXPECT_EQ(*code, 3);
  EXPECT_EQ(proc->Stdout(), "hi\n");
  EXPECT_EQ(proc->Stderr(), "");
  EXPECT_FALSE(proc->Running());
  // A reaped process reports the same code again.
  EXPECT_EQ(proc->Wait(absl::ZeroDuration()).value_or(-1), 3);
}

TEST(SubprocessTest, CapturesStderrSeparately) {
  auto proc = StartOrDie({"/bin/sh", "-c", "echo out; echo err >&2"});
  ASSERT_NE(proc, nullptr);
  EXPECT_EQ(proc->Wait(kTimeout).value_or(-1), 0);
  EXPECT_EQ(proc->Stdout(), "out\n");
  EXPECT_EQ(proc->Stderr(), "err\n");
  EXPECT_THAT(proc->Output(), HasSubstr("err\n"));
}

TEST(SubprocessTest, AppliesEnvironmentAndWorkingDir) {
  const std::string dir = MakeTempDir();
  Subprocess::Options options;
  options.env["FDBROKER_TEST_VAR"] = "value 1";
  options.working_dir = dir;
  // PATH lookup for a bare program name, too.
  auto proc =
      StartOrDie({"sh", "-c", "echo \"$FDBROKER_TEST_VAR\"; pwd"}, options);
  ASSERT_NE(proc, nullptr);
  EXPECT_EQ(proc->Wait(kTimeout).value_or(-1), 0);
  EXPECT_EQ(proc->Stdout(), "value 1\n" + dir + "\n");
  std::filesystem::remove_all(dir);
}

TEST(SubprocessTest, StartFailsForAMissingProgram) {
  absl::StatusOr<std::unique_ptr<Subprocess>> proc =
      Subprocess::Start({"/nonexistent/fdbroker-no-such-binary"});
  ASSERT_FALSE(proc.ok());
  EXPECT_EQ(proc.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(proc.status().message(), HasSubstr("exec"));
}

TEST(SubprocessTest, ReportsTheSignalThatEndedIt) {
  auto proc = StartOrDie({"sleep", "100"});
  ASSERT_NE(proc, nullptr);
  EXPECT_TRUE(proc->Running());
  ASSERT_TRUE(proc->Signal(SIGTERM).ok());
  EXPECT_EQ(proc->Wait(kTimeout).value_or(-1), 128 + SIGTERM);
  EXPECT_EQ(proc->Signal(SIGTERM).code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(SubprocessTest, WaitTimesOutWhileItRuns) {
  auto proc = StartOrDie({"sleep", "100"});
  ASSERT_NE(proc, nullptr);
  const absl::Time start = absl::Now();
  absl::StatusOr<int> code = proc->Wait(absl::Milliseconds(100));
  EXPECT_EQ(code.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(100));
  EXPECT_TRUE(proc->Running());
}

TEST(SubprocessTest, DestructorKillsAndReaps) {
  auto proc = StartOrDie({"sleep", "100"});
  ASSERT_NE(proc, nullptr);
  const pid_t pid = proc->pid();
  proc.reset();
  // Reaped, not a zombie: the pid is gone at once.
  EXPECT_NE(::kill(pid, 0), 0);
  EXPECT_EQ(errno, ESRCH);
}

TEST(SubprocessTest, DestructorKillsRegisteredGrandchildren) {
  // The shell prints its background child's pid and waits for it.
  auto proc = StartOrDie({"/bin/sh", "-c", "sleep 100 & echo $!; wait"});
  ASSERT_NE(proc, nullptr);
  pid_t grandchild = 0;
  ASSERT_TRUE(WaitFor(
      [&] {
        return absl::SimpleAtoi(absl::StripAsciiWhitespace(proc->Stdout()),
                                &grandchild);
      },
      kTimeout));
  EXPECT_THAT(ChildPids(proc->pid()), ElementsAre(grandchild));
  proc->KillOnDestruction(grandchild);
  proc.reset();
  // The grandchild is not ours to reap; whoever inherits it does.
  EXPECT_TRUE(WaitFor([&] { return ProcessGone(grandchild); }, kTimeout));
}

TEST(SubprocessTest, ChildInheritsOnlyStdio) {
  // A descriptor the test forgot to make close-on-exec must not leak either.
  int leaky[2];
  ASSERT_EQ(::pipe(leaky), 0);
  auto proc = StartOrDie({"/bin/ls", "/proc/self/fd"});
  ::close(leaky[0]);
  ::close(leaky[1]);
  ASSERT_NE(proc, nullptr);
  ASSERT_EQ(proc->Wait(kTimeout).value_or(-1), 0) << proc->Output();
  std::set<std::string> fds =
      absl::StrSplit(proc->Stdout(), '\n', absl::SkipEmpty());
  // 0, 1, 2 and the directory ls itself opened to list /proc/self/fd.
  EXPECT_EQ(fds.size(), 4u) << proc->Stdout();
  EXPECT_EQ(fds.count("0") + fds.count("1") + fds.count("2"), 3u);
}

TEST(SubprocessTest, StdinIsDevNull) {
  auto proc = StartOrDie({"/bin/sh", "-c", "cat; echo done"});
  ASSERT_NE(proc, nullptr);
  EXPECT_EQ(proc->Wait(kTimeout).value_or(-1), 0);
  EXPECT_EQ(proc->Stdout(), "done\n");
}

TEST(SubprocessTest, ChildStartsWithDefaultSignalDispositions) {
  // An ignored SIGTERM in the test would otherwise be inherited across exec.
  struct sigaction ignore {
  }, old{};
  ignore.sa_handler = SIG_IGN;
  ASSERT_EQ(::sigaction(SIGTERM, &ignore, &old), 0);
  auto proc = StartOrDie({"sleep", "100"});
  ::sigaction(SIGTERM, &old, nullptr);
  ASSERT_NE(proc, nullptr);
  ASSERT_TRUE(proc->Signal(SIGTERM).ok());
  EXPECT_EQ(proc->Wait(kTimeout).value_or(-1), 128 + SIGTERM);
}

}  // namespace
}  // namespace fdbroker::testing
