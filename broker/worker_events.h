#ifndef FDBROKER_BROKER_WORKER_EVENTS_H_
#define FDBROKER_BROKER_WORKER_EVENTS_H_

#include <sys/types.h>

#include <cstdint>
#include <string>

#include "absl/time/time.h"
#include "fdbroker/v1/broker.pb.h"

namespace fdbroker {

// Something an operator may want to see happen (WatchEvents streams these).
struct WorkerEvent {
  // The event types are v1::EventType (proto/fdbroker/v1/broker.proto),
  // the one list of them: WatchEvents sends `type` as it is.
  using Type = v1::EventType;
  Type type = v1::EVENT_TYPE_UNSPECIFIED;
  uint64_t worker_id = 0;
  pid_t pid = 0;
  std::string exit_status;
  std::string detail;
  // WatchEventsResponse.reason (e.g. why a worker was recycled).
  std::string reason;
  absl::Time time = absl::Now();
};

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_WORKER_EVENTS_H_
