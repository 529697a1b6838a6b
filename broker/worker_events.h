#ifndef FDBROKER_BROKER_WORKER_EVENTS_H_
#define FDBROKER_BROKER_WORKER_EVENTS_H_

#include <sys/types.h>

#include <cstdint>
#include <string>

#include "absl/time/time.h"

namespace fdbroker {

// Something an operator may want to see happen (WatchEvents streams these).
struct WorkerEvent {
  enum class Type {
    kWorkerStarted,
    kWorkerReady,
    kWorkerDraining,
    kWorkerExited,
    kWorkerCrashed,
    kWorkerRestarted,
    kScaleRequested,
    kWorkerDrainRequested,
    kDrainRequested,
    kResumeRequested,
    kRestartLoop,
    // Released connections placed on other workers (one event per releasing
    // worker and reason, aggregated over a quarter second).
    kConnectionsMigrated,
    kRebalanceRequested,
  };
  Type type;
  uint64_t worker_id = 0;
  pid_t pid = 0;
  std::string exit_status;
  std::string detail;
  absl::Time time = absl::Now();
};

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_WORKER_EVENTS_H_
