#include "wire/unique_fd.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <utility>

#include "gtest/gtest.h"

namespace fdbroker::wire {
namespace {

// True when `fd` is an open descriptor of this process.
bool IsOpen(int fd) { return ::fcntl(fd, F_GETFD) != -1; }

// A fresh close-on-exec fd (one end of a pipe; the other is closed).
int OpenRawFd() {
  int fds[2];
  EXPECT_EQ(::pipe2(fds, O_CLOEXEC), 0);
  ::close(fds[1]);
  return fds[0];
}

TEST(UniqueFdTest, DefaultIsEmpty) {
  UniqueFd fd;
  EXPECT_FALSE(fd.valid());
  EXPECT_FALSE(static_cast<bool>(fd));
  EXPECT_EQ(fd.get(), -1);
}

TEST(UniqueFdTest, DestructorCloses) {
  int raw = OpenRawFd();
  {
    UniqueFd fd(raw);
    EXPECT_TRUE(fd.valid());
    EXPECT_EQ(fd.get(), raw);
    EXPECT_TRUE(IsOpen(raw));
  }
  EXPECT_FALSE(IsOpen(raw));
}

TEST(UniqueFdTest, MoveConstructionTransfersOwnership) {
  int raw = OpenRawFd();
  UniqueFd a(raw);
  UniqueFd b(std::move(a));
  EXPECT_FALSE(a.valid());  // NOLINT(bugprone-use-after-move): the contract.
  EXPECT_EQ(b.get(), raw);
  EXPECT_TRUE(IsOpen(raw));
}

TEST(UniqueFdTest, MoveAssignmentClosesTheOverwrittenFd) {
  int first = OpenRawFd();
  int second = OpenRawFd();
  UniqueFd a(first);
  UniqueFd b(second);
  b = std::move(a);
  EXPECT_FALSE(IsOpen(second));
  EXPECT_TRUE(IsOpen(first));
  EXPECT_EQ(b.get(), first);
  EXPECT_FALSE(a.valid());  // NOLINT(bugprone-use-after-move)
}

TEST(UniqueFdTest, SelfMoveAssignmentKeepsTheFd) {
  int raw = OpenRawFd();
  UniqueFd a(raw);
  UniqueFd& alias = a;
  a = std::move(alias);
  EXPECT_EQ(a.get(), raw);
  EXPECT_TRUE(IsOpen(raw));
}

TEST(UniqueFdTest, ReleaseUnownedDoesNotClose) {
  int raw = OpenRawFd();
  int released;
  {
    UniqueFd fd(raw);
    released = fd.ReleaseUnowned();
    EXPECT_FALSE(fd.valid());
  }
  EXPECT_EQ(released, raw);
  EXPECT_TRUE(IsOpen(raw));
  ::close(raw);
}

TEST(UniqueFdTest, ResetClosesAndTakesTheNewFd) {
  int first = OpenRawFd();
  int second = OpenRawFd();
  UniqueFd fd(first);
  fd.Reset(second);
  EXPECT_FALSE(IsOpen(first));
  EXPECT_EQ(fd.get(), second);
  fd.Reset();
  EXPECT_FALSE(IsOpen(second));
  EXPECT_FALSE(fd.valid());
}

TEST(UniqueFdTest, ResetToTheSameFdKeepsItOpen) {
  int raw = OpenRawFd();
  UniqueFd fd(raw);
  fd.Reset(raw);
  EXPECT_TRUE(IsOpen(raw));
  EXPECT_EQ(fd.get(), raw);
}

TEST(UniqueFdTest, DupIsACloexecFdForTheSameFile) {
  // No O_CLOEXEC on the original: the copy must get it anyway.
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  UniqueFd read_end(fds[0]);
  UniqueFd write_end(fds[1]);

  absl::StatusOr<UniqueFd> copy = read_end.Dup();
  ASSERT_TRUE(copy.ok()) << copy.status();
  ASSERT_TRUE(copy->valid());
  EXPECT_NE(copy->get(), read_end.get());
  EXPECT_EQ(::fcntl(copy->get(), F_GETFD) & FD_CLOEXEC, FD_CLOEXEC);

  struct stat original_stat, copy_stat;
  ASSERT_EQ(::fstat(read_end.get(), &original_stat), 0);
  ASSERT_EQ(::fstat(copy->get(), &copy_stat), 0);
  EXPECT_EQ(original_stat.st_dev, copy_stat.st_dev);
  EXPECT_EQ(original_stat.st_ino, copy_stat.st_ino);

  // Same open file description: bytes written to the pipe come out of the copy.
  ASSERT_EQ(::write(write_end.get(), "x", 1), 1);
  char c = 0;
  EXPECT_EQ(::read(copy->get(), &c, 1), 1);
  EXPECT_EQ(c, 'x');

  // Closing the original leaves the copy open.
  read_end.Reset();
  EXPECT_TRUE(IsOpen(copy->get()));
}

TEST(UniqueFdTest, DupOfEmptyIsAnError) {
  UniqueFd empty;
  absl::StatusOr<UniqueFd> copy = empty.Dup();
  EXPECT_EQ(copy.status().code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace fdbroker::wire
