#include "wire/command_line.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <set>
#include <string>

#include "absl/flags/reflection.h"
#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace fdbroker::wire {
namespace {

bool IsHelpFlag(absl::string_view name) {
  return name == "help" || name == "helpfull" || name == "helpshort" ||
         name == "helppackage" || name == "version" ||
         absl::StartsWith(name, "helpon") ||
         absl::StartsWith(name, "helpmatch");
}

// The flag `name`, if the program accepts it.
absl::CommandLineFlag* Find(absl::string_view name,
                            absl::Span<const absl::string_view> allowed) {
  if (!allowed.empty() &&
      std::find(allowed.begin(), allowed.end(), name) == allowed.end()) {
    return nullptr;
  }
  absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
  return flag != nullptr && !flag->IsRetired() ? flag : nullptr;
}

}  // namespace

bool AbslParseFlag(absl::string_view text, RepeatedFlag* flag,
                   std::string* error) {
  flag->values = absl::StrSplit(text, '\n');
  return true;
}

std::string AbslUnparseFlag(const RepeatedFlag& flag) {
  return absl::StrJoin(flag.values, "\n");
}

absl::StatusOr<CommandLine> ParseFlags(
    int argc, char** argv, absl::Span<const absl::string_view> allowed) {
  std::set<std::string> repeated_seen;
  for (int i = 1; i < argc; ++i) {
    absl::string_view arg = argv[i];
    if (arg == "--" && i + 1 == argc) break;
    if (!absl::StartsWith(arg, "-") || arg == "-" || arg == "--") {
      return absl::InvalidArgumentError(absl::StrCat(
          "unexpected argument \"", arg, "\" (flags are --name=value)"));
    }
    arg.remove_prefix(absl::StartsWith(arg, "--") ? 2 : 1);
    const size_t equals = arg.find('=');
    const absl::string_view name = arg.substr(0, equals);
    if (IsHelpFlag(name)) return CommandLine::kHelp;
    absl::CommandLineFlag* flag = Find(name, allowed);
    absl::CommandLineFlag* negated =
        flag == nullptr && absl::StartsWith(name, "no")
            ? Find(name.substr(2), allowed)
            : nullptr;
    std::string value;
    if (equals != absl::string_view::npos) {
      value = std::string(arg.substr(equals + 1));
    } else if (flag != nullptr && flag->IsOfType<bool>()) {
      value = "true";
    } else if (negated != nullptr && negated->IsOfType<bool>()) {
      flag = negated;
      value = "false";  // --nofoo
    } else if (flag != nullptr && i + 1 < argc) {
      value = argv[++i];
    } else if (flag != nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("flag --", name, " needs a value"));
    }
    if (flag == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown flag --", name, " (see --help)"));
    }
    // Again: add to what the earlier occurrences gave.
    if (flag->IsOfType<RepeatedFlag>() &&
        !repeated_seen.insert(std::string(flag->Name())).second) {
      value = absl::StrCat(flag->CurrentValue(), "\n", value);
    }
    std::string error;
    if (!flag->ParseFrom(value, &error)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "bad value \"", value, "\" for --", flag->Name(), ": ", error));
    }
  }
  return CommandLine::kRun;
}

absl::StatusOr<std::vector<std::string>> SplitCommandLine(
    absl::string_view command) {
  std::vector<std::string> words;
  std::string word;
  bool in_word = false;
  char quote = 0;
  for (size_t i = 0; i < command.size(); ++i) {
    const char c = command[i];
    if (quote != 0) {
      if (c == quote) {
        quote = 0;
      } else if (c == '\\' && quote == '"' && i + 1 < command.size()) {
        word.push_back(command[++i]);
      } else {
        word.push_back(c);
      }
    } else if (c == '\'' || c == '"') {
      quote = c;
      in_word = true;
    } else if (c == '\\') {
      if (i + 1 == command.size()) {
        return absl::InvalidArgumentError("command ends with a backslash");
      }
      word.push_back(command[++i]);
      in_word = true;
    } else if (c == ' ' || c == '\t' || c == '\n') {
      if (in_word) words.push_back(std::move(word));
      word.clear();
      in_word = false;
    } else {
      word.push_back(c);
      in_word = true;
    }
  }
  if (quote != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("unterminated ", std::string(1, quote), " quote"));
  }
  if (in_word) words.push_back(std::move(word));
  if (words.empty()) return absl::InvalidArgumentError("empty command");
  return words;
}

absl::StatusOr<std::string> ResolveProgram(const std::string& program) {
  if (program.find('/') != std::string::npos) {
    if (::access(program.c_str(), X_OK) != 0) {
      return absl::ErrnoToStatus(errno, program);
    }
    return program;
  }
  const char* path = ::getenv("PATH");
  for (absl::string_view dir :
       absl::StrSplit(path ? path : "/usr/bin:/bin", ':')) {
    std::string candidate = absl::StrCat(dir.empty() ? "." : dir, "/", program);
    if (::access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return absl::NotFoundError(absl::StrCat(program, ": not found in PATH"));
}

}  // namespace fdbroker::wire
