#!/usr/bin/env bash
# Installs what fdbroker needs on Debian 12, and nothing that is already there.
#
#   deploy/setup.sh                build and run dependencies
#   deploy/setup.sh --test-tools   also the tools the test suite drives
#   deploy/setup.sh --bench-tools  also the benchmark's (tests/bench/run.sh)
#   deploy/setup.sh --runtime      only what the built binaries need to run
#                                  (deploy/Dockerfile's runtime stage)
#   deploy/setup.sh --list ...     print the packages it would want, install none
#
# Idempotent: when everything is installed it only asks dpkg and returns, so it
# needs neither root nor the network. When something is missing it must run as
# root (deploy/run.sh and tests/run.sh call it; so does deploy/Dockerfile).
set -euo pipefail

# The package lists live here and only here. A later feature that needs a tool
# adds it to one of these lists (or to TEST_NPM_TOOLS), nothing else changes.
BUILD_PACKAGES=(
  build-essential cmake ninja-build pkg-config
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev prometheus-cpp-dev libspdlog-dev libgtest-dev libgmock-dev
)
TEST_PACKAGES=(
  wrk curl python3 python3-protobuf clang-format procps openssl
  prometheus docker-compose python3-yaml
  # The image's init, for the process-layout test (tests/deploy).
  tini
  # The Python runner (worker/python) and its tests: the frameworks users run,
  # their servers, and what `pip install --no-build-isolation` of the package
  # needs offline (setuptools, wheel, venv).
  python3-fastapi python3-flask python3-aiohttp python3-uvicorn
  python3-httptools python3-uvloop python3-websockets python3-wsproto
  python3-django gunicorn python3-venv python3-pip python3-setuptools
  python3-wheel
  # clang 14 for the fuzz and sanitizer builds: libclang-rt-14-dev has the
  # ASan/UBSan/TSan/LSan and libFuzzer runtimes, llvm-14 the symbolizer.
  clang libclang-rt-14-dev llvm-14
)
# tests/bench/run.sh: the HAProxy baseline, the chart, the broker's profile.
# Part of --test-tools too, since ctest runs a short smoke of the benchmark.
# The Node.js baseline needs `node`; Debian's nodejs only if none is there.
BENCH_PACKAGES=(wrk procps haproxy gnuplot-nox linux-perf)
# The shared libraries fdbroker and fdbroker-http-worker link (the -dev
# packages above depend on them), curl for the image's HEALTHCHECK and tini,
# the image's init (PID 1: reaps orphans, passes signals on).
RUNTIME_PACKAGES=(
  libgrpc++1.51 libgrpc29 libprotobuf32 libabsl20220623
  libprometheus-cpp-core1.0 libprometheus-cpp-pull1.0 libspdlog1.10 libfmt9
  curl tini
)
# npm packages for the tests ("name" or "name@version"), installed globally;
# Debian's npm comes along automatically when this list is not empty.
TEST_NPM_TOOLS=(
  @bufbuild/buf@1.47.2 # buf lint (protos) and buf curl (gRPC via reflection)
)

usage() {
  sed -n '2,13s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

die() {
  echo "setup.sh: $*" >&2
  exit 1
}

with_test_tools=0
with_bench_tools=0
runtime_only=0
list_only=0
for arg in "$@"; do
  case "${arg}" in
    --test-tools) with_test_tools=1 ;;
    --bench-tools) with_bench_tools=1 ;;
    --runtime) runtime_only=1 ;;
    --list) list_only=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    *) die "unknown argument '${arg}' (try --help)" ;;
  esac
done

((runtime_only && (with_test_tools || with_bench_tools))) &&
  die "--runtime does not go with --test-tools or --bench-tools"

if ((runtime_only)); then
  wanted=("${RUNTIME_PACKAGES[@]}")
else
  wanted=("${BUILD_PACKAGES[@]}")
fi
if ((with_test_tools)); then
  wanted+=("${TEST_PACKAGES[@]}")
  # Debian's npm only if no npm is there (a Node.js distribution may bring
  # its own, which Debian's npm package would conflict with).
  if ((${#TEST_NPM_TOOLS[@]})) && ! command -v npm >/dev/null; then
    wanted+=(npm)
  fi
fi

if ((with_test_tools || with_bench_tools)); then
  wanted+=("${BENCH_PACKAGES[@]}")
  command -v node >/dev/null || wanted+=(nodejs)
fi

if ((list_only)); then
  printf '%s\n' "${wanted[@]}"
  exit 0
fi

command -v dpkg-query >/dev/null ||
  die "dpkg-query not found: fdbroker's set-up supports Debian 12 only"

# Prints the packages of "$@" that are not installed, one a line.
missing_packages() {
  local -A installed=()
  local name status
  # dpkg-query exits non-zero when it has never heard of a package; those are
  # simply absent from its output, hence missing.
  while read -r name status; do
    [[ "${status}" == "install ok installed" ]] && installed["${name}"]=1
  done < <(dpkg-query -W -f='${Package} ${Status}\n' "$@" 2>/dev/null || true)
  for name in "$@"; do
    [[ -n "${installed[${name}]:-}" ]] || echo "${name}"
  done
}

mapfile -t missing < <(missing_packages "${wanted[@]}")

if ((${#missing[@]})); then
  if ((EUID != 0)); then
    die "missing Debian packages: ${missing[*]}
  install them as root: sudo ${BASH_SOURCE[0]} $*"
  fi
  echo "setup.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# npm tools: installed only when the test suite asks for them and absent.
if ((with_test_tools)) && ((${#TEST_NPM_TOOLS[@]})); then
  npm_missing=()
  for tool in "${TEST_NPM_TOOLS[@]}"; do
    # Installed at exactly the pinned version, or (re)installed.
    npm ls --global --depth=0 "${tool}" >/dev/null 2>&1 ||
      npm_missing+=("${tool}")
  done
  if ((${#npm_missing[@]})); then
    ((EUID == 0)) || die "missing npm tools: ${npm_missing[*]} (run as root)"
    echo "setup.sh: installing npm ${npm_missing[*]}"
    npm install --global --no-fund --no-audit --loglevel=error \
      "${npm_missing[@]}" >/dev/null
  fi
fi
