#include "wire/sys_calls.h"

namespace fdbroker::wire {
namespace {

class RealSysCalls final : public SysCalls {
 public:
  ssize_t SendMsg(int fd, const msghdr* msg, int flags) override {
    return ::sendmsg(fd, msg, flags);
  }
  ssize_t RecvMsg(int fd, msghdr* msg, int flags) override {
    return ::recvmsg(fd, msg, flags);
  }
  int Accept4(int fd, sockaddr* addr, socklen_t* len, int flags) override {
    return ::accept4(fd, addr, len, flags);
  }
};

}  // namespace

SysCalls& SysCalls::Real() {
  // Stateless, so sharing one instance is not shared mutable state.
  static RealSysCalls* const real = new RealSysCalls();
  return *real;
}

}  // namespace fdbroker::wire
