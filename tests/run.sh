#!/usr/bin/env bash
# Installs what is missing (build and test tools), builds everything
# (RelWithDebInfo, build/test), checks the formatting of every C++ source and
# runs every test with ctest. Exits non-zero if anything fails.
#
#   tests/run.sh [extra ctest args...]     e.g. tests/run.sh -R fd_passing
#
# Environment:
#   FDBROKER_JOBS        parallel compile jobs (default 2)
#   FDBROKER_CTEST_ARGS  extra ctest arguments (same as passing them)
#   FDBROKER_CTEST_JOBS  parallel tests (default 1: integration tests start
#                        several processes each and measure fd counts)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=${SECONDS}

section() { printf '\n== %s\n' "$*"; }

section "setup"
./deploy/setup.sh --test-tools

section "build"
build_dir=build/test
if [[ ! -f "${build_dir}/build.ninja" ]]; then
  cmake -S . -B "${build_dir}" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    >/dev/null
fi
ninja -C "${build_dir}" -j "${FDBROKER_JOBS:-2}" --quiet

section "format"
# Every C++ source the project owns; generated code lives in the build dirs.
mapfile -t sources < <(find proto broker worker tests -type f \
  \( -name '*.cc' -o -name '*.h' -o -name '*.cpp' -o -name '*.hpp' \) |
  LC_ALL=C sort)
unformatted=()
for file in "${sources[@]}"; do
  clang-format --dry-run -Werror "${file}" >/dev/null 2>&1 ||
    unformatted+=("${file}")
done
format_ok=1
if ((${#unformatted[@]})); then
  format_ok=0
  echo "not clang-format clean (fix: clang-format -i FILE...):"
  printf '  %s\n' "${unformatted[@]}"
else
  echo "${#sources[@]} files clean"
fi

section "buf lint"
# The protos follow buf's STANDARD rules (proto/buf.yaml).
lint_ok=1
(cd proto && buf lint) && echo "proto/ clean" || lint_ok=0

section "test"
# shellcheck disable=SC2206  # word splitting of the env var is intended
extra_args=(${FDBROKER_CTEST_ARGS:-})
tests_ok=1
ctest --test-dir "${build_dir}" --output-on-failure --no-tests=error \
  -j "${FDBROKER_CTEST_JOBS:-1}" "${extra_args[@]}" "$@" || tests_ok=0

section "summary ($((SECONDS - start))s)"
((format_ok)) && echo "format: ok" || echo "format: FAILED (${#unformatted[@]} files)"
((lint_ok)) && echo "lint:   ok" || echo "lint:   FAILED"
((tests_ok)) && echo "tests:  ok" || echo "tests:  FAILED"
((format_ok && lint_ok && tests_ok))
