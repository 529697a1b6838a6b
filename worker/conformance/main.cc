// fdbroker-conformance: drives a worker command through every rule of the
// hand-off protocol (docs/protocol.md, "Conformance kit") and names the rule
// a failing worker broke. Exit code 0 only when every case passes (skipped
// cases do not fail the run), 1 when one fails, 2 on a bad command line.

#include <stdlib.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <regex>
#include <set>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "cases.h"
#include "wire/command_line.h"

ABSL_FLAG(std::string, worker_cmd, "",
          "the worker's command line (split like fdbroker's --worker_cmd: "
          "quotes and backslashes, no shell); it finds the kit through "
          "FDBROKER_SOCKET");
ABSL_FLAG(std::string, cases, "",
          "run only the cases whose name matches "
          "this regular expression");
ABSL_FLAG(bool, list, false, "list the cases and exit");
ABSL_FLAG(absl::Duration, timeout, absl::Seconds(5),
          "how long the kit waits for each thing a worker must do");
ABSL_FLAG(std::string, request, "GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n",
          "bytes a client sends where a case needs an answer (C escapes); "
          "any non-empty answer counts");
ABSL_FLAG(std::string, capabilities, "request_response,reconnect,sigterm",
          "what the worker claims beyond its Hello: request_response (answers "
          "--request), reconnect (§7.8), sigterm (drains on SIGTERM); cases "
          "that need an unclaimed one are skipped");
ABSL_FLAG(absl::Duration, heartbeat_interval, absl::Milliseconds(100),
          "Welcome.heartbeat_interval_ms");
ABSL_FLAG(absl::Duration, heartbeat_timeout, absl::Milliseconds(1500),
          "Welcome.heartbeat_timeout_ms");
ABSL_FLAG(bool, keep_logs, false,
          "keep the per-case directories (worker.log) and print their path");

namespace fdbroker::conformance {
namespace {

[[noreturn]] void Usage(const std::string& error) {
  std::fprintf(stderr, "fdbroker-conformance: %s\n", error.c_str());
  std::exit(2);
}

const char* VerdictName(Verdict verdict) {
  switch (verdict) {
    case Verdict::kPass:
      return "PASS";
    case Verdict::kFail:
      return "FAIL";
    case Verdict::kSkip:
      return "SKIP";
  }
  return "?";
}

int Main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "fdbroker-conformance --worker_cmd=COMMAND [--cases=REGEX] [--list] "
      "[--timeout=5s] [--request=BYTES] [--capabilities=LIST]");
  static constexpr absl::string_view kFlags[] = {"worker_cmd",
                                                 "cases",
                                                 "list",
                                                 "timeout",
                                                 "request",
                                                 "capabilities",
                                                 "heartbeat_interval",
                                                 "heartbeat_timeout",
                                                 "keep_logs"};
  absl::StatusOr<wire::CommandLine> parsed =
      wire::ParseFlags(argc, argv, kFlags);
  if (!parsed.ok()) Usage(std::string(parsed.status().message()));
  if (*parsed == wire::CommandLine::kHelp) {
    absl::ParseCommandLine(argc, argv);  // prints the usage text, exits
    return 0;
  }

  std::regex filter;
  try {
    filter = std::regex(absl::GetFlag(FLAGS_cases));
  } catch (const std::regex_error& e) {
    Usage(absl::StrCat("--cases: ", e.what()));
  }
  std::vector<const Case*> selected;
  for (const Case& c : AllCases()) {
    if (std::regex_search(c.name, filter)) selected.push_back(&c);
  }
  if (absl::GetFlag(FLAGS_list)) {
    for (const Case* c : selected) {
      std::printf("%-28s %-26s %s\n", c->name, c->rule, c->summary);
    }
    return 0;
  }

  KitOptions options;
  const std::string command = absl::GetFlag(FLAGS_worker_cmd);
  if (command.empty()) Usage("--worker_cmd is required");
  absl::StatusOr<std::vector<std::string>> worker_argv =
      wire::SplitCommandLine(command);
  if (!worker_argv.ok()) {
    Usage(absl::StrCat("--worker_cmd: ", worker_argv.status().message()));
  }
  options.worker_argv = *std::move(worker_argv);
  options.timeout = absl::GetFlag(FLAGS_timeout);
  options.heartbeat_interval = absl::GetFlag(FLAGS_heartbeat_interval);
  options.heartbeat_timeout = absl::GetFlag(FLAGS_heartbeat_timeout);
  if (options.timeout <= absl::ZeroDuration() ||
      options.heartbeat_interval < absl::Milliseconds(1) ||
      options.heartbeat_timeout <= options.heartbeat_interval) {
    Usage(
        "--timeout must be positive, --heartbeat_interval at least 1ms and "
        "below --heartbeat_timeout");
  }
  std::string error;
  if (!absl::CUnescape(absl::GetFlag(FLAGS_request), &options.request,
                       &error) ||
      options.request.empty()) {
    Usage(absl::StrCat("--request: ", error.empty() ? "empty" : error));
  }
  for (absl::string_view name : absl::StrSplit(
           absl::GetFlag(FLAGS_capabilities), ',', absl::SkipWhitespace())) {
    bool known = false;
    for (const char* capability : kCapabilities) known |= name == capability;
    if (!known) Usage(absl::StrCat("--capabilities: unknown '", name, "'"));
    options.capabilities.insert(std::string(name));
  }

  std::string root =
      absl::StrCat(std::filesystem::temp_directory_path().string(),
                   "/fdbroker-conformance-XXXXXX");
  if (::mkdtemp(root.data()) == nullptr) {
    std::perror("mkdtemp");
    return 1;
  }
  std::printf("fdbroker-conformance: %zu case(s) against: %s\n",
              selected.size(), command.c_str());
  std::fflush(stdout);
  int passed = 0, failed = 0, skipped = 0;
  const absl::Time start = absl::Now();
  for (const Case* c : selected) {
    const std::string directory = absl::StrCat(root, "/", c->name);
    std::filesystem::create_directory(directory);
    const CaseResult result = RunCase(*c, options, directory);
    std::printf("%s  %-28s %-26s %5.2fs\n", VerdictName(result.verdict),
                c->name, c->rule, absl::ToDoubleSeconds(result.elapsed));
    if (!result.detail.empty())
      std::printf("      %s\n", result.detail.c_str());
    if (result.verdict == Verdict::kFail && !result.worker_log.empty()) {
      for (absl::string_view line : absl::StrSplit(result.worker_log, '\n')) {
        std::printf("      | %.*s\n", static_cast<int>(line.size()),
                    line.data());
      }
    }
    std::fflush(stdout);
    (result.verdict == Verdict::kPass   ? passed
     : result.verdict == Verdict::kFail ? failed
                                        : skipped)++;
  }
  std::printf("%zu cases: %d passed, %d failed, %d skipped (%.1fs)\n",
              selected.size(), passed, failed, skipped,
              absl::ToDoubleSeconds(absl::Now() - start));
  if (absl::GetFlag(FLAGS_keep_logs)) {
    std::printf("logs: %s\n", root.c_str());
  } else {
    std::error_code ignored;
    std::filesystem::remove_all(root, ignored);
  }
  return failed == 0 ? 0 : 1;
}

}  // namespace
}  // namespace fdbroker::conformance

int main(int argc, char** argv) {
  return fdbroker::conformance::Main(argc, argv);
}
