#ifndef FDBROKER_WORKER_CONFORMANCE_CASES_H_
#define FDBROKER_WORKER_CONFORMANCE_CASES_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "case_context.h"

namespace fdbroker::conformance {

// One rule of docs/protocol.md, checked against a fresh worker process.
struct Case {
  const char* name;     // "ack", "drain-idle", ...
  const char* rule;     // the section it checks: "§7.2 Hand-off"
  const char* summary;  // what the worker must do, one line (--list)
  // Claimed capabilities it needs (kCapabilities); Hello-announced ones
  // (release, batching) are decided by the case itself.
  std::vector<const char*> needs;
  absl::Status (*run)(CaseContext& context);
};

// Every case, in the order of docs/protocol.md.
const std::vector<Case>& AllCases();

enum class Verdict { kPass, kFail, kSkip };
struct CaseResult {
  Verdict verdict = Verdict::kPass;
  std::string detail;      // why it failed or was skipped
  std::string worker_log;  // the tail of the worker's output, on failure
  absl::Duration elapsed;
};

// Runs `c` in `directory` (created by the caller, private to this case).
CaseResult RunCase(const Case& c, const KitOptions& options,
                   const std::string& directory);

}  // namespace fdbroker::conformance

#endif  // FDBROKER_WORKER_CONFORMANCE_CASES_H_
