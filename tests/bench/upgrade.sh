#!/usr/bin/env bash
# Upgrades under wrk load: 3 `fdbroker --upgrade` in a row during a wrk run
# with a connection per request, against a steady run of the same length
# right before it, in interleaved rounds (upgrade_bench.py). Issue "Nothing
# lost": zero socket errors, zero requests over 1 s, the worst request
# during the upgrades within 5x the steady p99. Writes
# tests/bench/results/upgrade-<UTC date>.json and .md.
# Method and figures: docs/reliability.md, "Upgrades".
#
#   tests/bench/upgrade.sh [options]
#
#   --rounds=N        rounds (default 5)
#   --duration=S      seconds per wrk run (default 6)
#   --upgrades=N      upgrades per upgrade run (default 3)
#   --connections=N   wrk connections (default 32)
#   --placement=P     handoff (default) or kernel
#   --bin-dir=DIR     fdbroker from DIR instead of building Release in
#                     build/bench
#   --results-dir=D   where the results go (default tests/bench/results)
#
# Exit status: 0 done (the ratio target may be missed: see the table), 1 a
# request failed or took over 1 s, or the run failed; 2 bad usage.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
bin_dir="" results=tests/bench/results args=()
for arg in "$@"; do
  case "${arg}" in
    --bin-dir=*) bin_dir=${arg#*=} ;;
    --results-dir=*) results=${arg#*=} ;;
    -h | --help)
      sed -n '2,23s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
      exit 0
      ;;
    *) args+=("${arg}") ;;
  esac
done
[[ -n "${bin_dir}" ]] || bin_dir=$(tests/bench/build.sh)
stamp=$(date -u +%Y-%m-%dT%H%M%SZ)
/usr/bin/python3 tests/bench/upgrade_bench.py --bin-dir="${bin_dir}" \
  --json="${results}/upgrade-${stamp}.json" "${args[@]}"
