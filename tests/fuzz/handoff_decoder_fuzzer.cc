// libFuzzer target for the hand-off protocol decoder (proto/wire): whatever
// bytes and fds a peer sends, the decoder must neither crash, nor leak an fd,
// nor accept a message that breaks the protocol rules.
//
// Input format: one or more packets separated by kSeparator (at most
// kMaxPackets). A packet's first byte is a header: bits 0-1 are how many fds
// (0-3, each a fresh /dev/null) travel with it, bit 2 picks the single-fd
// Decode/Receive overload instead of the vector one; the rest is the packet's
// bytes on the wire. Every input takes two paths:
//  1. Direct: each packet goes into one wire::MessageDecoder (one per input,
//     so a multi-packet input exercises the sequence numbers like a channel).
//  2. Round trip: each packet is sent raw with sendmsg (fds as SCM_RIGHTS) on
//     one end of a socketpair(AF_UNIX, SOCK_SEQPACKET) and read back with
//     wire::MessageChannel::Receive on the other end.
// Like a real peer's channel, both paths stop at the first rejected packet.
//
// Checked on every input (a violation abort()s: libFuzzer reports a crash):
//  - accepted: a body is set, the sequence is the next expected one, exactly
//    RequiredFds() fds come out (the single-fd overload: the one fd of a
//    Connection/Release, none otherwise), each open, close-on-exec after the
//    round trip, and the very /dev/null that was attached;
//  - rejected: InvalidArgument (the decoder) and the expected sequence number
//    does not move;
//  - both paths accept the same packets and decode them to equal messages;
//  - /proc/self/fd has as many entries after the input as before it.
//
// Build and run (tests/run.sh does this with a 20 s budget):
//   CC=clang CXX=clang++ cmake -S . -B build/fuzz -G Ninja \
//     -DFDBROKER_FUZZ=ON -DFDBROKER_SANITIZE=address
//   ninja -C build/fuzz handoff_decoder_fuzzer
//   mkdir -p build/fuzz/corpus
//   build/fuzz/bin/handoff_decoder_fuzzer -max_total_time=3600 \
//     -rss_limit_mb=2048 -dict=tests/fuzz/handoff_decoder_fuzzer.dict \
//     -jobs=2 -workers=2 build/fuzz/corpus tests/fuzz/corpus
// New inputs land in the first directory (build/fuzz/corpus); copy the
// interesting ones, and every crash-* reproducer, into tests/fuzz/corpus.
// Reproduce a crash: build/fuzz/bin/handoff_decoder_fuzzer crash-<sha1>.
// Regenerate the seeds:
//   build/fuzz/bin/handoff_decoder_fuzzer --write_corpus=tests/fuzz/corpus

#include <dirent.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "fdbroker/v1/handoff.pb.h"
#include "google/protobuf/stubs/logging.h"
#include "google/protobuf/util/message_differencer.h"
#include "wire/fd_passing.h"
#include "wire/message_channel.h"
#include "wire/sys_calls.h"
#include "wire/unique_fd.h"

namespace fdbroker::wire {
namespace {

using ::google::protobuf::util::MessageDifferencer;
using v1::HandoffMessage;

// Between packets. It can occur inside a message (a long varint): that only
// splits the input differently, which is one more input.
constexpr absl::string_view kSeparator("\xff\xfe\xfd\xfc", 4);
constexpr size_t kMaxPackets = 16;
constexpr uint8_t kFdCountMask = 0x03;
constexpr uint8_t kSingleFdOverload = 0x04;

#define FUZZ_CHECK(cond, ...)                                               \
  do {                                                                      \
    if (!(cond)) {                                                          \
      std::fprintf(stderr, "%s:%d: check failed: %s: ", __FILE__, __LINE__, \
                   #cond);                                                  \
      std::fprintf(stderr, __VA_ARGS__);                                    \
      std::fprintf(stderr, "\n");                                           \
      std::abort();                                                         \
    }                                                                       \
  } while (false)

struct FuzzPacket {
  size_t fd_count = 0;
  bool single_fd_overload = false;
  absl::string_view bytes;
};

std::vector<FuzzPacket> SplitInput(absl::string_view input) {
  std::vector<FuzzPacket> packets;
  while (!input.empty() && packets.size() < kMaxPackets) {
    const size_t end = input.find(kSeparator);
    absl::string_view chunk = input.substr(0, end);
    input = end == absl::string_view::npos
                ? absl::string_view()
                : input.substr(end + kSeparator.size());
    if (chunk.empty()) continue;
    const auto header = static_cast<uint8_t>(chunk.front());
    chunk.remove_prefix(1);
    packets.push_back({static_cast<size_t>(header & kFdCountMask),
                       (header & kSingleFdOverload) != 0, chunk});
  }
  return packets;
}

// Entries of /proc/self/fd, not counting the directory's own fd.
int CountOpenFds() {
  DIR* dir = ::opendir("/proc/self/fd");
  FUZZ_CHECK(dir != nullptr, "opendir: %s", std::strerror(errno));
  int count = 0;
  while (const dirent* entry = ::readdir(dir)) {
    if (entry->d_name[0] != '.') ++count;
  }
  ::closedir(dir);
  return count - 1;
}

dev_t DevNullRdev() {
  struct stat st;
  FUZZ_CHECK(::stat("/dev/null", &st) == 0, "stat: %s", std::strerror(errno));
  return st.st_rdev;
}

std::vector<UniqueFd> OpenDevNulls(size_t count) {
  std::vector<UniqueFd> fds;
  for (size_t i = 0; i < count; ++i) {
    fds.emplace_back(::open("/dev/null", O_RDONLY | O_CLOEXEC));
    FUZZ_CHECK(fds.back().valid(), "open /dev/null: %s", std::strerror(errno));
  }
  return fds;
}

// An fd handed out by the decoder must be open and be one of our /dev/nulls.
void CheckIsDevNull(const UniqueFd& fd, bool must_be_cloexec) {
  FUZZ_CHECK(fd.valid(), "decoder handed out an empty fd");
  const int flags = ::fcntl(fd.get(), F_GETFD);
  FUZZ_CHECK(flags >= 0, "fd %d is not open", fd.get());
  FUZZ_CHECK(!must_be_cloexec || (flags & FD_CLOEXEC),
             "received fd %d is not close-on-exec", fd.get());
  struct stat st;
  FUZZ_CHECK(::fstat(fd.get(), &st) == 0 && S_ISCHR(st.st_mode) &&
                 st.st_rdev == DevNullRdev(),
             "fd %d is not the /dev/null that was attached", fd.get());
}

// What one path made of one packet.
struct Outcome {
  bool accepted = false;
  HandoffMessage message;
};

// Checks one accepted message and the fds that came with it.
void CheckAccepted(const HandoffMessage& message, uint64_t expected_sequence,
                   const FuzzPacket& packet, const std::vector<UniqueFd>& fds,
                   bool must_be_cloexec) {
  FUZZ_CHECK(message.body_case() != HandoffMessage::BODY_NOT_SET,
             "accepted a message without a body");
  FUZZ_CHECK(message.sequence() == expected_sequence,
             "accepted sequence %llu, expected %llu",
             static_cast<unsigned long long>(message.sequence()),
             static_cast<unsigned long long>(expected_sequence));
  FUZZ_CHECK(packet.fd_count == RequiredFds(message),
             "accepted a %s with %zu fds, it requires %zu",
             std::string(BodyName(message)).c_str(), packet.fd_count,
             RequiredFds(message));
  // The single-fd overload hands out the one fd of Connection/Release and
  // closes the two of UpgradeHandover (documented: use the vector form).
  const size_t expected_out = packet.single_fd_overload
                                  ? (RequiredFds(message) == 1 ? 1 : 0)
                                  : RequiredFds(message);
  FUZZ_CHECK(fds.size() == expected_out, "%s came out with %zu fds, not %zu",
             std::string(BodyName(message)).c_str(), fds.size(), expected_out);
  for (const UniqueFd& fd : fds) CheckIsDevNull(fd, must_be_cloexec);
}

// Path 1: the packets straight into one MessageDecoder.
std::vector<Outcome> DecodeDirectly(const std::vector<FuzzPacket>& packets) {
  std::vector<Outcome> outcomes;
  MessageDecoder decoder;
  HandoffMessage message;
  for (const FuzzPacket& fuzz_packet : packets) {
    Packet packet;
    packet.data.assign(fuzz_packet.bytes.data(), fuzz_packet.bytes.size());
    packet.fds = OpenDevNulls(fuzz_packet.fd_count);
    std::vector<int> attached;
    for (const UniqueFd& fd : packet.fds) attached.push_back(fd.get());

    const uint64_t expected_sequence = decoder.next_sequence();
    std::vector<UniqueFd> fds;
    absl::Status status;
    if (fuzz_packet.single_fd_overload) {
      UniqueFd fd(::open("/dev/null", O_RDONLY | O_CLOEXEC));  // Overwritten.
      status = decoder.Decode(packet, message, fd);
      if (fd.valid()) fds.push_back(std::move(fd));
    } else {
      fds.emplace_back(::open("/dev/null", O_RDONLY | O_CLOEXEC));
      status = decoder.Decode(packet, message, fds);  // Must clear `fds`.
    }

    if (!status.ok()) {
      FUZZ_CHECK(absl::IsInvalidArgument(status), "unexpected status: %s",
                 status.ToString().c_str());
      FUZZ_CHECK(decoder.next_sequence() == expected_sequence,
                 "a rejected packet moved the sequence");
      FUZZ_CHECK(fds.empty(), "a rejected packet handed out %zu fds",
                 fds.size());
      outcomes.push_back({});
      break;  // The channel is closed; `packet` closes its fds.
    }
    CheckAccepted(message, expected_sequence, fuzz_packet, fds,
                  /*must_be_cloexec=*/true);
    FUZZ_CHECK(decoder.next_sequence() == expected_sequence + 1,
               "an accepted packet did not advance the sequence by one");
    // Ownership moved, nothing was duplicated: the very fds we attached.
    for (const UniqueFd& fd : fds) {
      FUZZ_CHECK(std::count(attached.begin(), attached.end(), fd.get()) == 1,
                 "fd %d is not one of the attached fds", fd.get());
    }
    outcomes.push_back({true, message});
  }
  return outcomes;
}

// Sends `bytes` as one packet with `fds`, bypassing every check of the
// sending side (a hostile peer). False if the kernel refuses the packet.
bool SendRaw(int socket, absl::string_view bytes,
             const std::vector<UniqueFd>& fds) {
  iovec iov{const_cast<char*>(bytes.data()), bytes.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  union {
    char buf[CMSG_SPACE(sizeof(int) * 3)];
    cmsghdr align;
  } control;
  if (!fds.empty()) {
    msg.msg_control = control.buf;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
    cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    for (size_t i = 0; i < fds.size(); ++i) {
      const int fd = fds[i].get();
      std::memcpy(CMSG_DATA(cmsg) + i * sizeof(int), &fd, sizeof(int));
    }
  }
  const ssize_t n = ::sendmsg(socket, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
  FUZZ_CHECK(n >= 0 || errno == EMSGSIZE || errno == ENOBUFS, "sendmsg: %s",
             std::strerror(errno));
  return n >= 0;
}

// Path 2: the packets over a real socketpair into MessageChannel::Receive.
std::vector<Outcome> ReceiveOverSocket(const std::vector<FuzzPacket>& packets) {
  std::vector<Outcome> outcomes;
  int pair[2];
  FUZZ_CHECK(::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) == 0,
             "socketpair: %s", std::strerror(errno));
  UniqueFd sender(pair[0]);
  MessageChannel receiver{UniqueFd(pair[1])};
  HandoffMessage message;
  uint64_t expected_sequence = 1;
  for (const FuzzPacket& fuzz_packet : packets) {
    {
      // The kernel duplicated the fds into the packet: ours close here.
      std::vector<UniqueFd> attached = OpenDevNulls(fuzz_packet.fd_count);
      if (!SendRaw(sender.get(), fuzz_packet.bytes, attached)) break;
    }
    std::vector<UniqueFd> fds;
    absl::StatusOr<ReceiveResult> result;
    if (fuzz_packet.single_fd_overload) {
      UniqueFd fd;
      result = receiver.Receive(message, fd);
      if (fd.valid()) fds.push_back(std::move(fd));
    } else {
      result = receiver.Receive(message, fds);
    }
    if (result.ok() && *result == ReceiveResult::kPeerClosed) {
      // A zero-length packet without fds reads as end-of-stream.
      FUZZ_CHECK(fuzz_packet.bytes.empty() && fuzz_packet.fd_count == 0,
                 "kPeerClosed for a non-empty packet");
      break;
    }
    if (!result.ok()) {
      FUZZ_CHECK(fds.empty(), "a rejected packet handed out %zu fds",
                 fds.size());
      outcomes.push_back({});
      break;
    }
    FUZZ_CHECK(*result == ReceiveResult::kReceived,
               "a packet that was sent is not there");
    CheckAccepted(message, expected_sequence, fuzz_packet, fds,
                  /*must_be_cloexec=*/true);
    FUZZ_CHECK(fuzz_packet.bytes.size() <= kMaxPacketBytes,
               "accepted a packet of %zu bytes", fuzz_packet.bytes.size());
    ++expected_sequence;
    outcomes.push_back({true, message});
  }
  return outcomes;
}

// The two paths must agree, except where the socket legitimately differs:
// an empty packet reads as end-of-stream, an oversized one is refused by the
// kernel or by ReceivePacket.
void CheckSameOutcomes(const std::vector<FuzzPacket>& packets,
                       const std::vector<Outcome>& direct,
                       const std::vector<Outcome>& socket) {
  for (size_t i = 0; i < direct.size() && i < socket.size(); ++i) {
    const FuzzPacket& packet = packets[i];
    if (packet.bytes.size() > kMaxPacketBytes) return;
    FUZZ_CHECK(direct[i].accepted == socket[i].accepted,
               "packet %zu: decoder %s it, channel %s it", i,
               direct[i].accepted ? "accepted" : "rejected",
               socket[i].accepted ? "accepted" : "rejected");
    if (direct[i].accepted) {
      FUZZ_CHECK(
          MessageDifferencer::Equals(direct[i].message, socket[i].message),
          "packet %zu decoded differently by the two paths", i);
    }
  }
  if (direct.size() != socket.size()) {
    const size_t i = std::min(direct.size(), socket.size());
    FUZZ_CHECK(i < packets.size() &&
                   (packets[i].bytes.size() > kMaxPacketBytes ||
                    (packets[i].bytes.empty() && packets[i].fd_count == 0)),
               "the paths stopped at different packets (%zu vs %zu)",
               direct.size(), socket.size());
  }
}

// --write_corpus=DIR: the seed corpus, from real serialized messages.
std::string SeedPacket(uint8_t header, HandoffMessage message,
                       uint64_t sequence) {
  message.set_sequence(sequence);
  return std::string(1, static_cast<char>(header)) +
         message.SerializeAsString();
}

std::string Join(const std::vector<std::string>& packets) {
  std::string out;
  for (const std::string& packet : packets) {
    if (!out.empty()) out.append(kSeparator.data(), kSeparator.size());
    out += packet;
  }
  return out;
}

void WriteCorpus(const std::string& dir) {
  HandoffMessage hello;
  hello.mutable_hello()->mutable_version()->set_major(kProtocolMajor);
  hello.mutable_hello()->mutable_version()->set_minor(kProtocolMinor);
  hello.mutable_hello()->set_pid(4242);
  hello.mutable_hello()->set_capacity(64);
  (*hello.mutable_hello()->mutable_labels())["lang"] = "python";
  auto* owned = hello.mutable_hello()->add_owned_connections();
  owned->set_connection_id(7);
  owned->set_peer_address("127.0.0.1:50000");
  hello.mutable_hello()->set_was_supervised(true);

  HandoffMessage welcome;
  welcome.mutable_welcome()->mutable_version()->set_major(kProtocolMajor);
  welcome.mutable_welcome()->set_worker_id(3);
  welcome.mutable_welcome()->set_heartbeat_interval_ms(1000);
  welcome.mutable_welcome()->set_heartbeat_timeout_ms(5000);
  welcome.mutable_welcome()->set_supervised(true);

  HandoffMessage refusal;
  refusal.mutable_refusal()->set_reason(v1::REFUSAL_REASON_VERSION);
  refusal.mutable_refusal()->set_message("unsupported protocol major 2");

  HandoffMessage connection;
  connection.mutable_connection()->set_connection_id(12);
  connection.mutable_connection()->set_peer_address("[::1]:41000");
  connection.mutable_connection()->set_local_address("127.0.0.1:8080");
  connection.mutable_connection()->set_accept_time_unix_nanos(
      1700000000000000000);
  connection.mutable_connection()->set_initial_data("GET / HTTP/1.1\r\n");

  HandoffMessage ack;
  ack.mutable_ack()->add_connection_ids(12);
  ack.mutable_ack()->add_connection_ids(13);

  HandoffMessage reject;
  reject.mutable_reject()->add_connection_ids(14);
  reject.mutable_reject()->set_reason("draining");

  HandoffMessage closed;
  closed.mutable_closed()->add_connection_ids(12);

  HandoffMessage release;
  release.mutable_release()->set_connection_id(13);
  release.mutable_release()->set_unread_data("GET /a HTTP/1.1\r\n");

  release.mutable_release()->set_reason(v1::RELEASE_REASON_DRAIN);

  HandoffMessage batch;
  for (uint64_t id : {20, 21, 22}) {
    v1::Connection& entry =
        *batch.mutable_connection_batch()->add_connections();
    entry.set_connection_id(id);
    entry.set_peer_address("127.0.0.1:41001");
    entry.set_local_address("127.0.0.1:8080");
  }

  HandoffMessage release_request;
  release_request.mutable_release_request()->set_max_connections(5);
  release_request.mutable_release_request()->set_reason(
      v1::RELEASE_REASON_REBALANCE);

  HandoffMessage drain;
  drain.mutable_drain()->set_deadline_unix_nanos(1700000030000000000);
  drain.mutable_drain()->set_release_idle(true);

  HandoffMessage goodbye;
  goodbye.mutable_goodbye()->set_reason("drained");

  HandoffMessage heartbeat;
  heartbeat.mutable_heartbeat()->set_sent_unix_nanos(1700000001000000000);

  HandoffMessage upgrade_request;
  upgrade_request.mutable_upgrade_request()->mutable_version()->set_major(
      kProtocolMajor);
  upgrade_request.mutable_upgrade_request()->set_pid(4343);

  HandoffMessage handover;
  handover.mutable_upgrade_handover()->set_listen_address("0.0.0.0:8080");
  handover.mutable_upgrade_handover()->set_socket_path("/run/fdbroker.sock");
  handover.mutable_upgrade_handover()->set_supervised_workers(4);

  const std::vector<std::pair<std::string, std::string>> seeds = {
      {"hello", SeedPacket(0, hello, 1)},
      {"ack", SeedPacket(0, ack, 1)},
      {"connection", SeedPacket(1, connection, 1)},
      {"connection_single_fd",
       SeedPacket(1 | kSingleFdOverload, connection, 1)},
      {"release", SeedPacket(1, release, 1)},
      {"upgrade_handover", SeedPacket(2, handover, 1)},
      {"connection_batch", SeedPacket(3, batch, 1)},
      {"release_request", SeedPacket(0, release_request, 1)},
      {"worker_to_broker",
       Join({SeedPacket(0, hello, 1), SeedPacket(0, ack, 2),
             SeedPacket(0, closed, 3), SeedPacket(1, release, 4),
             SeedPacket(0, reject, 5), SeedPacket(0, heartbeat, 6),
             SeedPacket(0, goodbye, 7)})},
      {"broker_to_worker",
       Join({SeedPacket(0, welcome, 1),
             SeedPacket(1 | kSingleFdOverload, connection, 2),
             SeedPacket(0, heartbeat, 3), SeedPacket(3, batch, 4),
             SeedPacket(0, release_request, 5), SeedPacket(0, drain, 6)})},
      {"refusal", SeedPacket(0, refusal, 1)},
      {"upgrade_request", SeedPacket(0, upgrade_request, 1)},
      // Rejected ones, so that the error paths are covered from the start.
      {"connection_without_fd", SeedPacket(0, connection, 1)},
      {"ack_with_fd", SeedPacket(1, ack, 1)},
      {"out_of_order", Join({SeedPacket(0, hello, 1), SeedPacket(0, ack, 3)})},
  };
  for (const auto& [name, bytes] : seeds) {
    const std::string path = dir + "/" + name;
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    FUZZ_CHECK(out.good(), "cannot write %s", path.c_str());
  }
  std::printf("wrote %zu seeds to %s\n", seeds.size(), dir.c_str());
}

}  // namespace
}  // namespace fdbroker::wire

extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) {
  // libprotobuf logs an ERROR line for every string field with invalid UTF-8;
  // at thousands of inputs a second that is only noise (the parse fails and
  // the decoder reports it, which is what is checked).
  google::protobuf::SetLogHandler(nullptr);
  constexpr absl::string_view kWriteCorpus = "--write_corpus=";
  for (int i = 1; i < *argc; ++i) {
    const absl::string_view arg((*argv)[i]);
    if (arg.substr(0, kWriteCorpus.size()) == kWriteCorpus) {
      fdbroker::wire::WriteCorpus(std::string(arg.substr(kWriteCorpus.size())));
      std::exit(0);
    }
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace wire = fdbroker::wire;
  const int fds_before = wire::CountOpenFds();
  const std::vector<wire::FuzzPacket> packets = wire::SplitInput(
      absl::string_view(reinterpret_cast<const char*>(data), size));
  const std::vector<wire::Outcome> direct = wire::DecodeDirectly(packets);
  const std::vector<wire::Outcome> socket = wire::ReceiveOverSocket(packets);
  wire::CheckSameOutcomes(packets, direct, socket);
  const int fds_after = wire::CountOpenFds();
  FUZZ_CHECK(fds_after == fds_before, "fd leak: %d open fds before, %d after",
             fds_before, fds_after);
  return 0;
}
