#ifndef FDBROKER_PROTO_WIRE_FILES_H_
#define FDBROKER_PROTO_WIRE_FILES_H_

#include <string>

#include "absl/status/status.h"

namespace fdbroker::wire {

// Writes `contents` to `path` atomically (a temporary file beside it, then
// rename), so a poller never sees half of it: the ready files of the broker
// and the workers.
absl::Status WriteFileAtomically(const std::string& path,
                                 const std::string& contents);

}  // namespace fdbroker::wire

#endif  // FDBROKER_PROTO_WIRE_FILES_H_
