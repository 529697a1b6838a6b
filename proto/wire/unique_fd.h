#ifndef FDBROKER_PROTO_WIRE_UNIQUE_FD_H_
#define FDBROKER_PROTO_WIRE_UNIQUE_FD_H_

#include "absl/status/statusor.h"

namespace fdbroker::wire {

// The one owning file-descriptor type of the project: move-only, closes in
// its destructor. A raw int fd appears only at a syscall (get()) or where
// ownership leaves the process (ReleaseUnowned()).
class UniqueFd {
 public:
  UniqueFd() = default;
  // Takes ownership of `fd` (-1 means empty).
  explicit UniqueFd(int fd) : fd_(fd) {}
  ~UniqueFd() { Reset(); }

  UniqueFd(UniqueFd&& other) noexcept : fd_(other.fd_) { other.fd_ = -1; }
  UniqueFd& operator=(UniqueFd&& other) noexcept {
    if (this != &other) {
      Reset(other.fd_);
      other.fd_ = -1;
    }
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;

  bool valid() const { return fd_ >= 0; }
  explicit operator bool() const { return valid(); }
  // The raw fd for a syscall; ownership stays here.
  int get() const { return fd_; }

  // Gives up ownership without closing: the caller now owns the raw fd. The
  // name is long on purpose so that reviewers notice every use.
  [[nodiscard]] int ReleaseUnowned() {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }

  // Closes the held fd (if any) and takes `fd`.
  void Reset(int fd = -1);

  // A new close-on-exec descriptor for the same open file.
  absl::StatusOr<UniqueFd> Dup() const;

 private:
  int fd_ = -1;
};

}  // namespace fdbroker::wire

#endif  // FDBROKER_PROTO_WIRE_UNIQUE_FD_H_
