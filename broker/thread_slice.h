#ifndef FDBROKER_BROKER_THREAD_SLICE_H_
#define FDBROKER_BROKER_THREAD_SLICE_H_

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace fdbroker {

// Asks the scheduler for time slices of `slice` for the calling thread: the
// EEVDF custom slice of Linux 6.12+ (sched_attr.sched_runtime under
// SCHED_OTHER or SCHED_BATCH). A thread that sleeps most of the time and
// wakes for short bursts, like the data-plane loop, then preempts the task
// running on a busy CPU at once instead of waiting out that task's slice;
// its share of CPU time stays the same. Threads and processes the caller
// starts later get the default slice (SCHED_FLAG_RESET_ON_FORK), unless the
// thread runs at a negative nice, which that flag would reset to 0 in them.
//
// Returns the slice now in effect: `slice`, or zero when the kernel keeps
// its default (kernels before 6.12 ignore the field; a real-time policy set
// by the operator is left alone). An error when the kernel or a seccomp
// filter refuses the call. A zero `slice` restores the default.
absl::StatusOr<absl::Duration> SetThreadSlice(absl::Duration slice);

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_THREAD_SLICE_H_
