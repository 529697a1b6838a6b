#include "broker/thread_slice.h"

#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>

#include "absl/status/status.h"

namespace fdbroker {
namespace {

// struct sched_attr of <linux/sched/types.h> (SCHED_ATTR_SIZE_VER0); glibc
// 2.36 has no wrapper for sched_setattr.
struct SchedAttr {
  uint32_t size;
  uint32_t sched_policy;
  uint64_t sched_flags;
  int32_t sched_nice;
  uint32_t sched_priority;
  uint64_t sched_runtime;
  uint64_t sched_deadline;
  uint64_t sched_period;
};
static_assert(sizeof(SchedAttr) == 48);

constexpr uint64_t kResetOnFork = 0x01;  // SCHED_FLAG_RESET_ON_FORK

absl::Status GetAttr(SchedAttr& attr) {
  attr = SchedAttr{};
  if (::syscall(SYS_sched_getattr, 0, &attr, sizeof(attr), 0) != 0) {
    return absl::ErrnoToStatus(errno, "sched_getattr");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<absl::Duration> SetThreadSlice(absl::Duration slice) {
  SchedAttr attr;
  if (absl::Status s = GetAttr(attr); !s.ok()) return s;
  if (attr.sched_policy != SCHED_OTHER && attr.sched_policy != SCHED_BATCH) {
    return absl::ZeroDuration();
  }
  attr.size = sizeof(attr);
  // Keep the policy, nice and an operator's reset-on-fork; only the slice
  // changes, and children get the default one unless that would also reset
  // a negative nice.
  attr.sched_flags = (attr.sched_flags & kResetOnFork) |
                     (attr.sched_nice >= 0 ? kResetOnFork : 0);
  attr.sched_runtime = static_cast<uint64_t>(absl::ToInt64Nanoseconds(slice));
  if (::syscall(SYS_sched_setattr, 0, &attr, 0) != 0) {
    return absl::ErrnoToStatus(errno, "sched_setattr");
  }
  // Older kernels accept the call and drop the field.
  if (absl::Status s = GetAttr(attr); !s.ok()) return s;
  return absl::Nanoseconds(attr.sched_runtime);
}

}  // namespace fdbroker
