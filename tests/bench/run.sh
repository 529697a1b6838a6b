#!/usr/bin/env bash
# The fdbroker benchmark (issue 6): builds Release in build/bench and measures
# direct (SO_REUSEPORT workers), fdbroker, HAProxy (mode tcp) and Node.js
# cluster (SCHED_RR) side by side, interleaved over several rounds, with wrk
# on loopback: keep-alive and one connection per request. Then the scale run
# (idle connections through the broker) and a perf profile of the broker.
# Prints medians, ratios and PASS/MISS per target; writes
# tests/bench/results/<date>.json and docs/benchmarks.png. Method and
# figures: docs/benchmarks.md.
#
#   tests/bench/run.sh [options]
#
#   --rounds=N        interleaved rounds (default 3)
#   --duration=S      seconds per measured run (default 10)
#   --warmup=S        warm-up seconds before each run (default 2)
#   --workers=N       worker processes per variant (default 2)
#   --idle=N          idle connections for the scale run (default 100000; 0 skips)
#   --variants=LIST   subset of direct,fdbroker,fdbroker-kernel,haproxy,
#                     node-cluster (fdbroker-kernel: --placement=kernel)
#   --no-profile      skip the perf profile of the broker
#   --no-chart        skip docs/benchmarks.png
#   --bin-dir=DIR     use these binaries instead of building build/bench
#   --results-dir=DIR where the JSON (and profile) go (default tests/bench/results)
#   --chart=PATH      where the chart goes (default docs/benchmarks.png)
#   --smoke           1 round x 2 s, 1 s warm-up, 2,000 idle connections, no
#                     profile; only shows that everything works end to end
#   --balance         measure how evenly the workers share the load instead
#                     (wrk -c32 with tests/bench/balance.lua; no scale run,
#                     profile or chart); docs/benchmarks.md "Kernel placement
#                     balance"
#   --broker-flag=F   an extra fdbroker flag, e.g. --broker-flag=--policy=p2c
#                     (repeatable)
#
# Environment: FDBROKER_JOBS  compile jobs (default 1).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
python=/usr/bin/python3 # Debian's, not a pyenv one without Debian modules

rounds=3 duration=10 warmup=2 workers=2 idle=100000
profile=1 chart=docs/benchmarks.png bin_dir="" results_dir=tests/bench/results
variants=direct,fdbroker,fdbroker-kernel,haproxy,node-cluster
balance=0 broker_flags=()
for arg in "$@"; do
  case "${arg}" in
    --rounds=*) rounds=${arg#*=} ;;
    --duration=*) duration=${arg#*=} ;;
    --warmup=*) warmup=${arg#*=} ;;
    --workers=*) workers=${arg#*=} ;;
    --idle=*) idle=${arg#*=} ;;
    --variants=*) variants=${arg#*=} ;;
    --no-profile) profile=0 ;;
    --no-chart) chart="" ;;
    --chart=*) chart=${arg#*=} ;;
    --bin-dir=*) bin_dir=${arg#*=} ;;
    --results-dir=*) results_dir=${arg#*=} ;;
    --smoke) rounds=1 duration=2 warmup=1 idle=2000 profile=0 ;;
    --balance) balance=1 ;;
    --broker-flag=*) broker_flags+=("${arg}") ;;
    -h | --help)
      sed -n '2,32s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
      exit 0
      ;;
    *)
      echo "run.sh: unknown argument '${arg}' (try --help)" >&2
      exit 2
      ;;
  esac
done

./deploy/setup.sh --bench-tools

if [[ -z "${bin_dir}" ]]; then
  bin_dir="$(tests/bench/build.sh)"
fi
for binary in fdbroker fdbroker-http-worker; do
  [[ -x "${bin_dir}/${binary}" ]] || {
    echo "run.sh: ${bin_dir}/${binary} not found" >&2
    exit 1
  }
done

suffix=""
if ((balance)); then
  idle=0 profile=0 chart="" suffix=-balance
fi

mkdir -p "${results_dir}"
stamp="$(date -u +%Y-%m-%dT%H%M%SZ)"
idle_json="${results_dir}/${stamp}-idle.json"
trap 'rm -f "${idle_json}"' EXIT # folded into the main JSON below

if ((idle > 0)); then
  echo "== scale run: ${idle} idle connections through the broker"
  "${python}" tests/bench/idle.py --bin-dir="${bin_dir}" \
    --connections="${idle}" --workers="${workers}" --json="${idle_json}"
fi

echo "== throughput and CPU: ${rounds} round(s) x ${duration} s, ${workers} workers"
bench_args=(
  --bin-dir="${bin_dir}" --rounds="${rounds}" --duration="${duration}"
  --warmup="${warmup}" --workers="${workers}" --variants="${variants}"
  --json="${results_dir}/${stamp}${suffix}.json" --chart="${chart}"
  --idle-json="${idle_json}" "${broker_flags[@]}"
)
((balance)) && bench_args+=(--balance --connections=32)
((profile)) && bench_args+=(--profile="${results_dir}/${stamp}")
"${python}" tests/bench/bench.py "${bench_args[@]}"
