#ifndef FDBROKER_TESTS_INTEGRATION_REQUEST_LOAD_H_
#define FDBROKER_TESTS_INTEGRATION_REQUEST_LOAD_H_

#include <algorithm>
#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "tests/util/test_util.h"

namespace fdbroker::testing {

// Connection-per-request clients on `port` until Stop(): each request
// answered 200 counts as served, anything else as failed; the longest one
// is kept.
class RequestLoad {
 public:
  RequestLoad(int port, int threads,
              absl::Duration timeout = absl::Seconds(15)) {
    for (int t = 0; t < threads; ++t) {
      threads_.emplace_back([this, port, timeout] {
        while (!stop_) {
          const absl::Time start = absl::Now();
          absl::StatusOr<HttpResponse> r =
              HttpGetOnce("127.0.0.1", port, "/", timeout);
          absl::MutexLock lock(&mu_);
          slowest_ = std::max(slowest_, absl::Now() - start);
          if (r.ok() && r->status == 200) {
            ++served_;
            continue;
          }
          ++failed_;
          if (first_failure_.empty()) {
            first_failure_ = r.ok() ? absl::StrCat("HTTP ", r->status)
                                    : r.status().ToString();
          }
        }
      });
    }
  }
  ~RequestLoad() { Stop(); }
  void Stop() {
    stop_ = true;
    for (std::thread& t : threads_) t.join();
    threads_.clear();
  }
  int served() const { return served_; }
  int failed() const { return failed_; }
  std::string first_failure() {
    absl::MutexLock lock(&mu_);
    return first_failure_;
  }
  // The longest a request took so far.
  absl::Duration slowest() {
    absl::MutexLock lock(&mu_);
    return slowest_;
  }

 private:
  std::atomic<bool> stop_{false};
  std::atomic<int> served_{0}, failed_{0};
  absl::Mutex mu_;
  std::string first_failure_ ABSL_GUARDED_BY(mu_);
  absl::Duration slowest_ ABSL_GUARDED_BY(mu_) = absl::ZeroDuration();
  std::vector<std::thread> threads_;
};

}  // namespace fdbroker::testing

#endif  // FDBROKER_TESTS_INTEGRATION_REQUEST_LOAD_H_
