#include "broker/handoff_channel.h"

#include <sys/socket.h>

#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "wire/message_channel.h"

namespace fdbroker {
namespace {

class RecordingDelegate : public HandoffChannel::Delegate {
 public:
  void OnMessage(HandoffChannel&, v1::HandoffMessage& message,
                 wire::UniqueFd) override {
    events.push_back(std::string(wire::BodyName(message)));
  }
  void OnChannelClosed(HandoffChannel&, const absl::Status& reason) override {
    events.push_back("closed:" + std::string(reason.message()));
  }
  void OnWritable(HandoffChannel&) override { events.push_back("writable"); }
  std::vector<std::string> events;
};

class HandoffChannelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    loop_ = *EventLoop::Create();
    int sv[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv), 0);
    channel_ = *HandoffChannel::Create(*loop_, wire::UniqueFd(sv[0]), ucred{},
                                       wire::SysCalls::Real(), delegate_);
    worker_ = std::make_unique<wire::MessageChannel>(wire::UniqueFd(sv[1]));
  }

  void RunOnce() {
    loop_->RunAfter(absl::Milliseconds(20), [this] { loop_->Stop(); });
    loop_->Run();
  }

  RecordingDelegate delegate_;
  std::unique_ptr<EventLoop> loop_;
  std::unique_ptr<HandoffChannel> channel_;
  std::unique_ptr<wire::MessageChannel> worker_;
};

TEST_F(HandoffChannelTest, DeliversMessagesInOrder) {
  v1::HandoffMessage ack, closed;
  ack.mutable_ack()->add_connection_ids(1);
  closed.mutable_closed()->add_connection_ids(1);
  ASSERT_TRUE(worker_->Send(ack).ok());
  ASSERT_TRUE(worker_->Send(closed).ok());
  RunOnce();
  EXPECT_EQ(delegate_.events, (std::vector<std::string>{"ack", "closed"}));
}

TEST_F(HandoffChannelTest, AcksQueuedBeforeABrokerSideCloseAreStillDelivered) {
  // The worker acked a connection, but the broker closes the channel (say,
  // a heartbeat timeout) before reading it. The Ack must still count, or the
  // broker would re-place a connection the worker owns.
  v1::HandoffMessage ack;
  ack.mutable_ack()->add_connection_ids(7);
  ASSERT_TRUE(worker_->Send(ack).ok());
  channel_->Close(absl::DeadlineExceededError("declared dead"));
  EXPECT_TRUE(channel_->closed());
  // From now on the worker's sends fail, so it knows they did not arrive
  // and must close what it could not ack.
  v1::HandoffMessage late;
  late.mutable_ack()->add_connection_ids(8);
  absl::StatusOr<wire::SendResult> sent = worker_->Send(late);
  EXPECT_FALSE(sent.ok());
  RunOnce();
  EXPECT_EQ(delegate_.events,
            (std::vector<std::string>{"ack", "closed:declared dead"}));
}

TEST_F(HandoffChannelTest, GarbageClosesTheChannelWithAReason) {
  const std::string garbage = "\xff\xff\xff not a protobuf";
  ASSERT_EQ(::send(worker_->fd(), garbage.data(), garbage.size(), 0),
            static_cast<ssize_t>(garbage.size()));
  RunOnce();
  ASSERT_EQ(delegate_.events.size(), 1u);
  EXPECT_NE(delegate_.events[0].find("closed:malformed message"),
            std::string::npos)
      << delegate_.events[0];
}

TEST_F(HandoffChannelTest, PeerCloseIsReportedOnce) {
  worker_.reset();
  RunOnce();
  RunOnce();
  EXPECT_EQ(delegate_.events,
            (std::vector<std::string>{"closed:peer closed the channel"}));
}

TEST_F(HandoffChannelTest, ControlMessagesQueueWhileTheSocketIsFull) {
  // Fill the worker's receive buffer with heartbeats it does not read.
  int sent = 0;
  for (; sent < 100000; ++sent) {
    v1::HandoffMessage hb;
    hb.mutable_heartbeat()->set_sent_unix_nanos(sent);
    channel_->SendControl(std::move(hb));
    if (channel_->congested()) break;
  }
  ASSERT_TRUE(channel_->congested());
  // A Connection never jumps the queue.
  v1::HandoffMessage connection;
  connection.mutable_connection()->set_connection_id(1);
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  wire::UniqueFd a(sv[0]), b(sv[1]);
  const int fd = a.get();
  EXPECT_EQ(*channel_->SendConnections(connection, {&fd, 1}),
            wire::SendResult::kWouldBlock);
  // The worker reads everything: the queue flushes in order.
  int64_t expected = 0;
  bool done = false;
  while (!done) {
    loop_->RunAfter(absl::Milliseconds(1), [this] { loop_->Stop(); });
    loop_->Run();
    for (;;) {
      v1::HandoffMessage message;
      wire::UniqueFd fd;
      absl::StatusOr<wire::ReceiveResult> r = worker_->Receive(message, fd);
      ASSERT_TRUE(r.ok());
      if (*r != wire::ReceiveResult::kReceived) break;
      ASSERT_EQ(message.heartbeat().sent_unix_nanos(), expected++);
    }
    done = !channel_->congested();
  }
  EXPECT_EQ(expected, sent + 1);
  EXPECT_EQ(delegate_.events, (std::vector<std::string>{"writable"}));
}

v1::HandoffMessage Heartbeat() {
  v1::HandoffMessage message;
  message.mutable_heartbeat();
  return message;
}

TEST_F(HandoffChannelTest, AQueueOfUnreadControlMessagesIsBounded) {
  // A worker that never reads: once its socket buffer is full, control
  // messages queue, up to kMaxQueuedControl; one more closes the channel
  // rather than growing the broker's memory without end.
  size_t sent = 0;
  while (!channel_->congested() && sent < 100000) {
    channel_->SendControl(Heartbeat());
    ++sent;
  }
  ASSERT_TRUE(channel_->congested());  // The last one is queued.
  for (size_t i = 1; i < HandoffChannel::kMaxQueuedControl; ++i) {
    channel_->SendControl(Heartbeat());
  }
  EXPECT_FALSE(channel_->closed());
  channel_->SendControl(Heartbeat());
  EXPECT_TRUE(channel_->closed());
  loop_->RunAfter(absl::Milliseconds(1), [this] { loop_->Stop(); });
  loop_->Run();
  ASSERT_FALSE(delegate_.events.empty());
  EXPECT_NE(delegate_.events.back().find("control messages queued and unread"),
            std::string::npos)
      << delegate_.events.back();
}

}  // namespace
}  // namespace fdbroker
