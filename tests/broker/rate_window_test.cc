#include "broker/rate_window.h"

#include "broker/broker_operations.h"
#include "gtest/gtest.h"

namespace fdbroker {
namespace {

constexpr int64_t kSecond = 1'000'000'000;

TEST(RateWindowTest, RateOverTheSamplesInTheWindow) {
  RateWindow rate(10 * kSecond);
  EXPECT_EQ(rate.PerSecond(0, 0), 0) << "no history, no rate";
  for (int s = 0; s <= 20; ++s) rate.Sample(s * kSecond, 100u * s);
  // 100 per second throughout: measured over the last 10 s.
  EXPECT_DOUBLE_EQ(rate.PerSecond(20 * kSecond, 2000), 100);
  // A burst of 500 in the last half second after the last sample.
  EXPECT_DOUBLE_EQ(rate.PerSecond(20 * kSecond + kSecond / 2, 2500),
                   (2500.0 - 1100) / 9.5);
}

TEST(RateWindowTest, ShortHistoryUsesWhatThereIs) {
  RateWindow rate(10 * kSecond);
  rate.Sample(0, 0);
  EXPECT_DOUBLE_EQ(rate.PerSecond(2 * kSecond, 50), 25);
}

TEST(DurationFieldTest, ValidatesAndDefaults) {
  google::protobuf::Duration d;
  EXPECT_EQ(*DurationField(d, false, absl::Seconds(30), "t"),
            absl::Seconds(30));
  EXPECT_EQ(*DurationField(d, true, absl::Seconds(30), "t"), absl::Seconds(30));
  d.set_seconds(5);
  d.set_nanos(500000000);
  EXPECT_EQ(*DurationField(d, true, absl::Seconds(30), "t"),
            absl::Milliseconds(5500));
  d.set_seconds(-1);
  d.set_nanos(0);
  absl::StatusOr<absl::Duration> negative =
      DurationField(d, true, absl::Seconds(30), "timeout");
  EXPECT_EQ(negative.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(negative.status().message().find("timeout"),
            absl::string_view::npos);
  d.set_seconds(1);
  d.set_nanos(-1);
  EXPECT_FALSE(DurationField(d, true, absl::Seconds(30), "t").ok());
  d.set_seconds(0);
  d.set_nanos(2000000000);
  EXPECT_FALSE(DurationField(d, true, absl::Seconds(30), "t").ok());
  d.set_seconds(25 * 3600);
  d.set_nanos(0);
  EXPECT_FALSE(DurationField(d, true, absl::Seconds(30), "t").ok());
}

}  // namespace
}  // namespace fdbroker
