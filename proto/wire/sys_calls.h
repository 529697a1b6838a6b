#ifndef FDBROKER_PROTO_WIRE_SYS_CALLS_H_
#define FDBROKER_PROTO_WIRE_SYS_CALLS_H_

#include <sys/socket.h>
#include <sys/types.h>

namespace fdbroker::wire {

// The syscalls on the hand-off and accept paths, behind an interface so that
// tests can make them fail (EAGAIN, EPIPE, EMFILE) without a real failure.
// Each method has the syscall's contract: -1 and errno on failure.
class SysCalls {
 public:
  virtual ~SysCalls() = default;

  virtual ssize_t SendMsg(int fd, const msghdr* msg, int flags) = 0;
  virtual ssize_t RecvMsg(int fd, msghdr* msg, int flags) = 0;
  virtual int Accept4(int fd, sockaddr* addr, socklen_t* len, int flags) = 0;

  // The stateless pass-through to the kernel.
  static SysCalls& Real();
};

}  // namespace fdbroker::wire

#endif  // FDBROKER_PROTO_WIRE_SYS_CALLS_H_
