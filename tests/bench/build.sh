#!/usr/bin/env bash
# Builds fdbroker and fdbroker-http-worker (Release) in build/bench, the
# benchmark's own build dir (other builds may be in use), and prints its bin
# dir. Used by run.sh and idle_connections.sh.
# Environment: FDBROKER_JOBS  compile jobs (default 1).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
if [[ ! -f build/bench/build.ninja ]]; then
  cmake -S . -B build/bench -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DFDBROKER_BUILD_TESTS=OFF >/dev/null
fi
ninja -C build/bench -j "${FDBROKER_JOBS:-1}" --quiet fdbroker \
  fdbroker-http-worker >&2
echo "${PWD}/build/bench/bin"
