#!/usr/bin/env bash
# With FDBROKER_STATIC_GRPC (the default outside sanitizer builds) fdbroker
# carries gRPC, protobuf, Abseil, OpenSSL and their closure in the binary: a
# shared copy loaded next to the static one would be a second protobuf (every
# descriptor registered twice) and would bring back the dynamic loader's
# start-up cost that each --upgrade pays on a busy host (CMakeLists.txt).
#
#   static_link_test.sh FDBROKER
set -euo pipefail
(($# == 1)) || { echo "usage: $0 FDBROKER" >&2; exit 2; }
binary="$1"
[[ -x "${binary}" ]] || { echo "${binary}: not built" >&2; exit 1; }

loaded="$(ldd "${binary}")"
pattern='lib(grpc|gpr|protobuf|absl_|upb|re2|cares|ssl|crypto|address_sorting)'
if grep -E "${pattern}" <<<"${loaded}"; then
  echo "FAIL: $(basename "${binary}") loads the shared libraries above" >&2
  exit 1
fi
# It still runs: the static closure is complete.
"${binary}" --version >/dev/null
echo "ok: $(grep -c '=>' <<<"${loaded}") shared libraries, none of gRPC's"
