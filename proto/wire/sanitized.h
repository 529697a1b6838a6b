#ifndef FDBROKER_PROTO_WIRE_SANITIZED_H_
#define FDBROKER_PROTO_WIRE_SANITIZED_H_

namespace fdbroker::wire {

// Whether this build runs under ASan/UBSan or TSan. Their runtimes need
// fds of their own at any moment (UBSan's vptr check opens a pipe to probe
// memory), so a sanitized process that has run out of fds reports errors
// that are not there and stops. Tests of fd exhaustion skip in such builds;
// the plain build runs them.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
inline constexpr bool kSanitized = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || \
    __has_feature(undefined_behavior_sanitizer)
inline constexpr bool kSanitized = true;
#else
inline constexpr bool kSanitized = false;
#endif
#else
inline constexpr bool kSanitized = false;
#endif

}  // namespace fdbroker::wire

#endif  // FDBROKER_PROTO_WIRE_SANITIZED_H_
