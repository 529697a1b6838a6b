#include "wire/command_line.h"

#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"

ABSL_FLAG(int, cl_test_count, 1, "a test flag");
ABSL_FLAG(bool, cl_test_verbose, false, "a test flag");
ABSL_FLAG(absl::Duration, cl_test_wait, absl::Seconds(1), "a test flag");
ABSL_FLAG(int, cl_test_other, 0, "linked in, not accepted");
ABSL_FLAG(fdbroker::wire::RepeatedFlag, cl_test_many,
          fdbroker::wire::RepeatedFlag{{"default"}}, "a repeatable flag");

namespace fdbroker::wire {
namespace {

// argv from words; the strings live as long as the Argv.
struct Argv {
  explicit Argv(std::vector<std::string> words) : words(std::move(words)) {
    for (std::string& word : this->words) pointers.push_back(word.data());
  }
  int argc() const { return static_cast<int>(pointers.size()); }
  char** argv() { return pointers.data(); }
  std::vector<std::string> words;
  std::vector<char*> pointers;
};

absl::StatusOr<CommandLine> Parse(std::vector<std::string> words) {
  words.insert(words.begin(), "program");
  Argv args(std::move(words));
  return ParseFlags(
      args.argc(), args.argv(),
      {"cl_test_count", "cl_test_verbose", "cl_test_wait", "cl_test_many"});
}

TEST(ParseFlagsTest, ARepeatedFlagCollectsEveryOccurrence) {
  ASSERT_EQ(*Parse({"--cl_test_count=1"}), CommandLine::kRun);
  EXPECT_EQ(absl::GetFlag(FLAGS_cl_test_many).values,
            std::vector<std::string>{"default"});
  ASSERT_EQ(*Parse({"--cl_test_many=a:1,x", "--cl_test_count=2",
                    "--cl_test_many", "unix:/b", "--cl_test_many=[::1]:3"}),
            CommandLine::kRun);
  EXPECT_EQ(absl::GetFlag(FLAGS_cl_test_many).values,
            (std::vector<std::string>{"a:1,x", "unix:/b", "[::1]:3"}));
  // Another command line starts afresh; a plain flag keeps the last value.
  ASSERT_EQ(
      *Parse({"--cl_test_many=c", "--cl_test_count=3", "--cl_test_count=4"}),
      CommandLine::kRun);
  EXPECT_EQ(absl::GetFlag(FLAGS_cl_test_many).values,
            std::vector<std::string>{"c"});
  EXPECT_EQ(absl::GetFlag(FLAGS_cl_test_count), 4);
}

TEST(ParseFlagsTest, SetsFlagsInEverySpelling) {
  ASSERT_EQ(*Parse({"--cl_test_count=3", "-cl_test_verbose", "--cl_test_wait",
                    "250ms"}),
            CommandLine::kRun);
  EXPECT_EQ(absl::GetFlag(FLAGS_cl_test_count), 3);
  EXPECT_TRUE(absl::GetFlag(FLAGS_cl_test_verbose));
  EXPECT_EQ(absl::GetFlag(FLAGS_cl_test_wait), absl::Milliseconds(250));
  ASSERT_EQ(*Parse({"--nocl_test_verbose", "--"}), CommandLine::kRun);
  EXPECT_FALSE(absl::GetFlag(FLAGS_cl_test_verbose));
}

TEST(ParseFlagsTest, HelpIsAskedFor) {
  EXPECT_EQ(*Parse({"--help"}), CommandLine::kHelp);
  EXPECT_EQ(*Parse({"--cl_test_count=2", "-helpshort"}), CommandLine::kHelp);
}

TEST(ParseFlagsTest, EachProblemIsOneLine) {
  const std::pair<std::vector<std::string>, std::string> bad[] = {
      {{"stray"}, "unexpected argument \"stray\""},
      {{"--", "stray"}, "unexpected argument \"--\""},
      {{"--cl_test_count=lots"}, "bad value \"lots\" for --cl_test_count"},
      {{"--cl_test_count"}, "flag --cl_test_count needs a value"},
      {{"--no_such_flag=1"}, "unknown flag --no_such_flag"},
      // Linked in, but not one of this program's flags.
      {{"--cl_test_other=1"}, "unknown flag --cl_test_other"},
      {{"--nocl_test_count"}, "unknown flag --nocl_test_count"},
  };
  for (const auto& [words, message] : bad) {
    absl::StatusOr<CommandLine> parsed = Parse(words);
    ASSERT_FALSE(parsed.ok()) << words[0];
    EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(parsed.status().message().find(message), std::string::npos)
        << parsed.status();
    EXPECT_EQ(parsed.status().message().find('\n'), std::string::npos);
  }
}

TEST(SplitCommandLineTest, SplitsWordsAndHonoursQuotes) {
  EXPECT_EQ(*SplitCommandLine("python3  worker.py --port=1"),
            (std::vector<std::string>{"python3", "worker.py", "--port=1"}));
  EXPECT_EQ(
      *SplitCommandLine(R"(sh -c 'echo "a b"' "x y" z\ w)"),
      (std::vector<std::string>{"sh", "-c", "echo \"a b\"", "x y", "z w"}));
  EXPECT_EQ(*SplitCommandLine("a ''"), (std::vector<std::string>{"a", ""}));
}

TEST(SplitCommandLineTest, RejectsBadInput) {
  EXPECT_FALSE(SplitCommandLine("").ok());
  EXPECT_FALSE(SplitCommandLine("   ").ok());
  EXPECT_FALSE(SplitCommandLine("sh -c 'oops").ok());
  EXPECT_FALSE(SplitCommandLine("trailing\\").ok());
}

}  // namespace
}  // namespace fdbroker::wire
