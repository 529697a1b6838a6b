#!/usr/bin/env bash
# Scale run: N concurrent idle keep-alive connections through fdbroker (default
# 100,000); reports the broker's RSS and fd count at N and checks that a
# request on each connection is still answered. See tests/bench/idle.py.
#
#   tests/bench/idle_connections.sh [--connections=N] [--workers=N]
#       [--sample=K] [--timeout=S] [--json=PATH] [--bin-dir=DIR]
#
# Without --bin-dir it builds build/bench (Release) like tests/bench/run.sh.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
args=()
bin_dir=""
for arg in "$@"; do
  case "${arg}" in
    --bin-dir=*) bin_dir=${arg#*=} ;;
    -h | --help)
      sed -n '2,9s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
      exit 0
      ;;
    *) args+=("${arg}") ;;
  esac
done
if [[ -z "${bin_dir}" ]]; then
  ./deploy/setup.sh
  bin_dir="$(tests/bench/build.sh)"
fi
exec /usr/bin/python3 tests/bench/idle.py --bin-dir="${bin_dir}" "${args[@]}"
