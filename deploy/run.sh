#!/usr/bin/env bash
# Installs what is missing, builds fdbroker (Release) and runs the broker in the
# foreground with 4 supervised HTTP example workers: clients on 0.0.0.0:8080,
# gRPC control plane on 127.0.0.1:50051.
# Ctrl-C drains the workers and exits (a second Ctrl-C stops at once).
#
#   deploy/run.sh [extra fdbroker flags...]    e.g. deploy/run.sh --workers=8
#
# Environment: FDBROKER_JOBS  parallel compile jobs (default 2; each gRPC
# translation unit needs about 1 GiB of memory).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

./deploy/setup.sh

build_dir=build/release
# Configure once; afterwards ninja re-runs CMake by itself whenever a
# CMakeLists.txt changes, so an unchanged tree costs only ninja's check.
if [[ ! -f "${build_dir}/build.ninja" ]]; then
  cmake -S . -B "${build_dir}" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DFDBROKER_BUILD_TESTS=OFF >/dev/null
fi
ninja -C "${build_dir}" -j "${FDBROKER_JOBS:-2}" --quiet

broker="${build_dir}/bin/fdbroker"
[[ -x "${broker}" ]] || {
  echo "run.sh: ${broker} was not built" >&2
  exit 1
}
# Flags given later win (absl flags), so "$@" can override these defaults.
exec "${broker}" --listen=0.0.0.0:8080 --workers=4 "$@"
