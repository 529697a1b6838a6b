#ifndef FDBROKER_TESTS_WORKER_RAW_HTTP_H_
#define FDBROKER_TESTS_WORKER_RAW_HTTP_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "wire/unique_fd.h"

// Byte-level HTTP helpers for tests that need more control than
// testing::HttpGet: pipelined writes, malformed requests, reading whatever
// arrives until the server closes.
namespace fdbroker::testing {

// Writes all of `data` to the blocking socket `fd`.
absl::Status SendAll(int fd, absl::string_view data);

// Reads until the peer closes the connection. DeadlineExceeded (with what
// arrived so far in the message) if it does not within `timeout`.
absl::StatusOr<std::string> ReadUntilClose(
    int fd, absl::Duration timeout = absl::Seconds(10));

// Reads until what arrived contains `needle` (and returns all of it), so a
// test can tell that the server has processed a request.
absl::StatusOr<std::string> ReadUntilContains(
    int fd, absl::string_view needle,
    absl::Duration timeout = absl::Seconds(10));

// The status codes of the HTTP/1.1 responses in a response stream, in order.
std::vector<int> ResponseStatuses(absl::string_view stream);

// A TCP connection over loopback, both ends: `client` is the test's,
// `server` is what a broker would have accepted and handed off.
struct TcpPair {
  wire::UniqueFd client;
  wire::UniqueFd server;
};
absl::StatusOr<TcpPair> MakeTcpPair();

}  // namespace fdbroker::testing

#endif  // FDBROKER_TESTS_WORKER_RAW_HTTP_H_
