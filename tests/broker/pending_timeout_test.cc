// --pending_timeout in simulated time: a connection that waits for a worker
// longer than the timeout is closed and counted as overload.
#include <sys/socket.h>

#include "broker/connection_dispatcher.h"
#include "gtest/gtest.h"
#include "tests/broker/data_plane_fixture.h"

namespace fdbroker {
namespace {

class PendingTimeoutTest : public DataPlaneTest {
 protected:
  PendingTimeoutTest() {
    dispatch_options_.pending_timeout = absl::Seconds(2);
    dispatcher_ = std::make_unique<ConnectionDispatcher>(
        loop(), registry_, policy_, dispatch_options_);
    WorkerManager::Options options;
    options.target_workers = 0;
    StartManager(options);
  }

  // Dispatches a client connection accepted now; the test keeps the client.
  wire::UniqueFd Accept() {
    int sv[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    AcceptedConnection conn;
    conn.fd.Reset(sv[0]);
    conn.accept_mono_nanos = loop().NowNanos();
    conn.accept_unix_nanos = time_.clock().UnixNanos();
    dispatcher_->Dispatch(std::move(conn));
    return wire::UniqueFd(sv[1]);
  }
  // Every copy of the broker's end is closed: the client reads EOF.
  static bool Closed(const wire::UniqueFd& client) {
    char c;
    return ::recv(client.get(), &c, 1, MSG_DONTWAIT) == 0;
  }
};

TEST_F(PendingTimeoutTest, AConnectionWaitingLongerThanTheTimeoutIsClosed) {
  wire::UniqueFd first = Accept();
  time_.Advance(absl::Seconds(1));
  wire::UniqueFd second = Accept();
  EXPECT_EQ(dispatcher_->pending(), 2u);

  time_.Advance(absl::Milliseconds(999));
  EXPECT_FALSE(Closed(first)) << "not before its 2s";
  EXPECT_EQ(dispatcher_->stats().rejected_overload, 0u);
  time_.Advance(absl::Milliseconds(1));
  EXPECT_TRUE(Closed(first));
  EXPECT_FALSE(Closed(second));
  EXPECT_EQ(dispatcher_->pending(), 1u);
  EXPECT_EQ(dispatcher_->stats().rejected_overload, 1u);

  time_.Advance(absl::Milliseconds(999));
  EXPECT_FALSE(Closed(second));
  time_.Advance(absl::Milliseconds(1));
  EXPECT_TRUE(Closed(second));
  EXPECT_EQ(dispatcher_->pending(), 0u);
  // fdbroker_connections_rejected_total{reason="overload"} counts both.
  EXPECT_EQ(dispatcher_->stats().rejected_overload, 2u);
}

TEST_F(PendingTimeoutTest, AConnectionPlacedInTimeIsNotClosed) {
  wire::UniqueFd client = Accept();
  time_.Advance(absl::Milliseconds(1500));
  // A worker registers (not supervised: pid unknown to the registry).
  WorkerEnd worker = Register(/*pid=*/4242);
  EXPECT_EQ(dispatcher_->pending(), 0u);
  EXPECT_EQ(dispatcher_->in_flight(), 1u);
  time_.Advance(absl::Seconds(5));
  EXPECT_FALSE(Closed(client)) << "the broker holds it until the Ack";
  EXPECT_EQ(dispatcher_->stats().rejected_overload, 0u);
}

TEST_F(PendingTimeoutTest, ARequeuedConnectionKeepsItsAcceptTime) {
  // Re-queued entries (a lost worker's unacked ones) keep their accept time:
  // the timeout counts from accept, across the re-queue.
  wire::UniqueFd client = Accept();
  WorkerEnd worker = Register(/*pid=*/4242);
  ASSERT_EQ(dispatcher_->in_flight(), 1u);
  time_.Advance(absl::Milliseconds(1500));
  worker.channel.reset();  // The worker dies before acking.
  time_.RunUntilIdle();
  EXPECT_EQ(dispatcher_->pending(), 1u);
  time_.Advance(absl::Milliseconds(499));
  EXPECT_FALSE(Closed(client));
  time_.Advance(absl::Milliseconds(1));
  EXPECT_TRUE(Closed(client));
  EXPECT_EQ(dispatcher_->stats().rejected_overload, 1u);
}

}  // namespace
}  // namespace fdbroker
