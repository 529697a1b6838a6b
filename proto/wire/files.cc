#include "wire/files.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "wire/unique_fd.h"

namespace fdbroker::wire {

absl::Status WriteFileAtomically(const std::string& path,
                                 const std::string& contents) {
  const std::string temp = absl::StrCat(path, ".tmp.", ::getpid());
  UniqueFd fd(
      ::open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (!fd) return absl::ErrnoToStatus(errno, absl::StrCat("open ", temp));
  size_t written = 0;
  while (written < contents.size()) {
    const ssize_t n =
        ::write(fd.get(), contents.data() + written, contents.size() - written);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int error = errno;
      ::unlink(temp.c_str());
      return absl::ErrnoToStatus(error, absl::StrCat("write ", temp));
    }
    written += static_cast<size_t>(n);
  }
  fd.Reset();
  if (::rename(temp.c_str(), path.c_str()) != 0) {
    const int error = errno;
    ::unlink(temp.c_str());
    return absl::ErrnoToStatus(error, absl::StrCat("rename to ", path));
  }
  return absl::OkStatus();
}

}  // namespace fdbroker::wire
