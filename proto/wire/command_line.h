#ifndef FDBROKER_PROTO_WIRE_COMMAND_LINE_H_
#define FDBROKER_PROTO_WIRE_COMMAND_LINE_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace fdbroker::wire {

// The type of a flag that may be given several times ("--listen=a
// --listen=b"): each occurrence adds a value (the first replaces the
// default). Commas stay inside a value. As a string (absl's parse and unparse,
// e.g. for a test's ParseFrom) the values are joined by newlines.
struct RepeatedFlag {
  std::vector<std::string> values;
};
bool AbslParseFlag(absl::string_view text, RepeatedFlag* flag,
                   std::string* error);
std::string AbslUnparseFlag(const RepeatedFlag& flag);

// What a command line asks for.
enum class CommandLine { kRun, kHelp };

// The one command-line parser of the project's binaries: sets the absl flags
// named in argv[1..] ("--name=value", "--name value", "--bool", "--nobool";
// one or two dashes). `allowed` lists the flags the program accepts (empty:
// every flag linked in). A RepeatedFlag collects every occurrence; any other
// flag given twice takes the last value. Any problem — an unknown flag, a value
// that does not parse, a missing value, a positional argument — is an
// InvalidArgument whose message is one line for the user (the caller exits with
// code 2); unlike absl::ParseCommandLine it never exits. A help flag (--help,
// --helpfull,
// --helpshort, --helpon=..., --version, ...) returns kHelp.
absl::StatusOr<CommandLine> ParseFlags(
    int argc, char** argv, absl::Span<const absl::string_view> allowed = {});

// Splits a command line (a --worker_cmd) into argv: whitespace separates
// words, single and double quotes group them, backslash escapes one
// character. No variables, globs or other shell features.
absl::StatusOr<std::vector<std::string>> SplitCommandLine(
    absl::string_view command);

// The program of a command line: `program` itself if it contains a '/'
// (and is executable), else the first executable match along $PATH.
absl::StatusOr<std::string> ResolveProgram(const std::string& program);

}  // namespace fdbroker::wire

#endif  // FDBROKER_PROTO_WIRE_COMMAND_LINE_H_
