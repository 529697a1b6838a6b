#!/usr/bin/env bash
# Installs what is missing (build and test tools), builds everything
# (RelWithDebInfo, build/test), checks the formatting of every C++ source and
# runs every test with ctest. Then, unless --quick: a short libFuzzer run of
# the hand-off decoder (build/fuzz), and the unit and integration tests again
# under ASan+UBSan (build/asan) and under TSan (build/tsan). Exits non-zero if
# anything fails.
#
#   tests/run.sh [--quick] [--no-tsan] [extra ctest args...]
#                                     e.g. tests/run.sh --quick -R fd_passing
#
#   --quick              skip the fuzz run and the sanitizer builds (local runs;
#                        CI runs everything)
#   --no-tsan            skip only the TSan build (see below)
#
# Environment:
#   FDBROKER_QUICK=1     same as --quick
#   FDBROKER_TSAN=0      same as --no-tsan
#   FDBROKER_JOBS        parallel compile jobs (default 2)
#   FDBROKER_CTEST_ARGS  extra ctest arguments (same as passing them; they
#                        apply to the sanitizer runs too)
#   FDBROKER_CTEST_JOBS  parallel tests (default 1: integration tests start
#                        several processes each and measure fd counts)
#   FDBROKER_FUZZ_SECONDS  length of the fuzz run (default 20; see
#                        tests/fuzz/handoff_decoder_fuzzer.cc for long runs)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=${PWD}
start=${SECONDS}

quick=${FDBROKER_QUICK:-0}
# Debian's gRPC and Abseil are not built with TSan; the TSan build makes
# absl::Mutex visible to it (tests/sanitizers/tsan_absl_sync.cc) and silences
# what remains inside those libraries (tests/tsan.supp). --no-tsan is the way
# out should a new Debian library version bring new false positives.
tsan=${FDBROKER_TSAN:-1}
ctest_args=()
for arg in "$@"; do
  case "${arg}" in
    --quick) quick=1 ;;
    --no-tsan) tsan=0 ;;
    --tsan) tsan=1 ;;
    *) ctest_args+=("${arg}") ;;
  esac
done
# shellcheck disable=SC2206  # word splitting of the env var is intended
extra_args=(${FDBROKER_CTEST_ARGS:-})
jobs=${FDBROKER_JOBS:-2}

# Each section's wall time, for the summary.
declare -A took=()
current_section=""
section_start=${SECONDS}
section() {
  [[ -n "${current_section}" ]] &&
    took["${current_section}"]=$((SECONDS - section_start))
  current_section=$1
  section_start=${SECONDS}
  printf '\n== %s\n' "$*"
}
elapsed() { echo "(${took[$1]:-0}s)"; }

section "setup"
./deploy/setup.sh --test-tools

section "build"
build_dir=build/test
if [[ ! -f "${build_dir}/build.ninja" ]]; then
  cmake -S . -B "${build_dir}" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    >/dev/null
fi
ninja -C "${build_dir}" -j "${jobs}" --quiet

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
tests_ok=1
ctest --test-dir "${build_dir}" --output-on-failure --no-tests=error \
  -j "${FDBROKER_CTEST_JOBS:-1}" "${extra_args[@]}" "${ctest_args[@]}" ||
  tests_ok=0

# Configures (once) and builds `targets` in a clang build dir with the given
# cmake options: configure_and_build DIR "TARGETS..." CMAKE_ARGS...
configure_and_build() {
  local dir=$1 targets=$2
  shift 2
  if [[ ! -f "${dir}/build.ninja" ]]; then
    CC=clang CXX=clang++ cmake -S . -B "${dir}" -G Ninja \
      -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@" >/dev/null || return 1
  fi
  # shellcheck disable=SC2086  # targets is a word list
  ninja -C "${dir}" -j "${jobs}" --quiet ${targets}
}

# The sanitizers symbolize their stacks with this (package llvm-14).
symbolizer=/usr/lib/llvm-14/bin/llvm-symbolizer
# sanitizer_options address|thread LOGS: exports the runtime options. Every
# sanitized process (the test binaries and the brokers and workers they start)
# writes its report to LOGS/report.<pid> instead of its stderr, which for a
# child is a file in a temporary directory: a report from a child fails the
# run even when the test itself does not notice.
sanitizer_options() {
  local common="log_path=$2/report:external_symbolizer_path=${symbolizer}"
  if [[ "$1" == address ]]; then
    export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:${common}"
    export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${common}"
    export LSAN_OPTIONS="suppressions=${root}/tests/lsan.supp:print_suppressions=0"
  else
    export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:${common}"
    TSAN_OPTIONS+=":suppressions=${root}/tests/tsan.supp:print_suppressions=0"
  fi
}

# Prints the sanitizer reports in <logs>; false if there is one.
check_sanitizer_logs() {
  local logs=$1 file found=0
  for file in "${logs}"/report.*; do
    [[ -e "${file}" ]] || continue
    if grep -q '^SUMMARY: ' "${file}"; then
      found=1
      echo "--- sanitizer report ${file} (first 120 lines):"
      head -n 120 "${file}"
    else
      echo "--- sanitizer note ${file}:"
      head -n 20 "${file}"
    fi
  done
  ((!found))
}

# run_sanitized DIR SANITIZER: build DIR with -DFDBROKER_SANITIZE=SANITIZER
# and run the unit and integration tests in it.
run_sanitized() {
  local dir=$1 sanitize=$2
  local logs="${root}/${dir}/sanitizer-logs"
  configure_and_build "${dir}" "" -DFDBROKER_SANITIZE="${sanitize}" ||
    return 1
  rm -rf "${logs}" && mkdir -p "${logs}"
  local ok=1
  (
    sanitizer_options "${sanitize}" "${logs}"
    ctest --test-dir "${dir}" --output-on-failure --no-tests=error \
      -L '^(unit|integration)$' -j "${FDBROKER_CTEST_JOBS:-1}" \
      "${extra_args[@]}" "${ctest_args[@]}"
  ) || ok=0
  check_sanitizer_logs "${logs}" || ok=0
  ((ok))
}

fuzz_ok=1
asan_ok=1
tsan_ok=1
if ((!quick)); then
  section "fuzz"
  # libFuzzer on the hand-off decoder, ASan+UBSan, over the committed seeds
  # (tests/fuzz/corpus) and what earlier runs found (build/fuzz/corpus, where
  # new inputs go). A crash, a leaked fd or a broken protocol rule fails the
  # run and leaves its reproducer in build/fuzz/artifacts/. Longer runs: see
  # the top of tests/fuzz/handoff_decoder_fuzzer.cc (or FDBROKER_FUZZ_SECONDS).
  fuzz_dir=build/fuzz
  if configure_and_build "${fuzz_dir}" handoff_decoder_fuzzer \
    -DFDBROKER_FUZZ=ON -DFDBROKER_SANITIZE=address; then
    mkdir -p "${fuzz_dir}/corpus" "${fuzz_dir}/artifacts"
    fuzz_log="${fuzz_dir}/fuzz.log"
    if ASAN_OPTIONS="detect_leaks=1:abort_on_error=1" \
      UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
      "${fuzz_dir}/bin/handoff_decoder_fuzzer" \
      -max_total_time="${FDBROKER_FUZZ_SECONDS:-20}" -rss_limit_mb=2048 \
      -print_final_stats=1 -dict=tests/fuzz/handoff_decoder_fuzzer.dict \
      -artifact_prefix="${fuzz_dir}/artifacts/" \
      "${fuzz_dir}/corpus" tests/fuzz/corpus >"${fuzz_log}" 2>&1; then
      grep -E '^#[0-9]+[[:space:]]+(INITED|DONE)|^stat::(number_of_executed|average_exec|new_units|peak_rss)' \
        "${fuzz_log}" || true
    else
      fuzz_ok=0
      echo "fuzzer failed (full log: ${fuzz_log}):"
      grep -vE '^#[0-9]+[[:space:]]+(NEW|REDUCE|pulse)|^[[:space:]]+NEW_FUNC' \
        "${fuzz_log}" | tail -n 60
      ls -l "${fuzz_dir}/artifacts/"
    fi
  else
    fuzz_ok=0
  fi

  section "asan"
  # ASan + UBSan (+ LeakSanitizer; tests/lsan.supp).
  run_sanitized build/asan address || asan_ok=0

  if ((tsan)); then
    section "tsan"
    # TSan; tests/tsan.supp explains each suppression.
    run_sanitized build/tsan thread || tsan_ok=0
  fi
fi
section "summary ($((SECONDS - start))s)"

((format_ok)) && echo "format: ok" || echo "format: FAILED (${#unformatted[@]} files)"
((lint_ok)) && echo "lint:   ok" || echo "lint:   FAILED"
((tests_ok)) && echo "tests:  ok $(elapsed test)" || echo "tests:  FAILED $(elapsed test)"
if ((quick)); then
  echo "fuzz:   skipped (--quick)"
  echo "asan:   skipped (--quick)"
  echo "tsan:   skipped (--quick)"
else
  ((fuzz_ok)) && echo "fuzz:   ok $(elapsed fuzz)" || echo "fuzz:   FAILED $(elapsed fuzz)"
  ((asan_ok)) && echo "asan:   ok $(elapsed asan)" || echo "asan:   FAILED $(elapsed asan)"
  if ((tsan)); then
    ((tsan_ok)) && echo "tsan:   ok $(elapsed tsan)" || echo "tsan:   FAILED $(elapsed tsan)"
  else
    echo "tsan:   skipped (--no-tsan)"
  fi
fi
times=""
for name in setup build format "buf lint" test fuzz asan tsan; do
  [[ -n "${took[${name}]:-}" ]] && times+="${times:+, }${name} ${took[${name}]}s"
done
echo "times:  ${times}"
((format_ok && lint_ok && tests_ok && fuzz_ok && asan_ok && tsan_ok))
