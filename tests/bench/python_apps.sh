#!/usr/bin/env bash
# Python web apps head to head: the same FastAPI app
# (worker/python/examples/fastapi_app.py) under gunicorn -w N -k
# uvicorn.workers.UvicornWorker, uvicorn --workers N and fdbroker with N
# runner workers (python3 -m fdbroker_worker.run), by hand-off (fdbroker)
# and with --placement=kernel (fdbroker-kernel), with wrk: keep-alive,
# one connection per request, and a mixed load (a few clients on /cpu?ms=20
# while 32 keep-alive clients measure GET /). Interleaved rounds, medians,
# min-max spread, server CPU per request, ratios to gunicorn, PASS/MISS per
# target; writes tests/bench/results/python-apps-<UTC date>.json and .md.
# Method and figures: docs/benchmarks.md, "Python web apps".
#
#   tests/bench/python_apps.sh [options]
#
#   --rounds=N        interleaved rounds (default 3)
#   --duration=S      seconds per measured run (default 8)
#   --warmup=S        warm-up seconds before each run (default 2)
#   --workers=N       worker processes per server (default 2)
#   --loads=LIST      subset of keepalive,close,mixed
#   --servers=LIST    subset of gunicorn,uvicorn,fdbroker,fdbroker-kernel
#   --profile         afterwards, cProfile one runner worker under the
#                     connection-per-request load (<results>.profile.txt)
#   --bin-dir=DIR     fdbroker from DIR (handoff_pb2.py from DIR/../gen/python)
#                     instead of building Release in build/bench
#   --smoke           1 round x 1 s per load, results in a temporary
#                     directory; fails unless every server answered every
#                     load with no error (ctest bench_python_apps_smoke)
#   Other options go to python_apps_bench.py (--help lists them).
#
# Exit status: 0 done, 1 a server failed or (--smoke) had errors, 2 bad usage.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
python=/usr/bin/python3 # Debian's: fastapi, uvicorn, gunicorn, protobuf

bin_dir="" smoke=0 json=0 args=()
for arg in "$@"; do
  case "${arg}" in
    --bin-dir=*) bin_dir=${arg#*=} ;;
    --smoke) smoke=1 args+=("${arg}") ;;
    --json=*) json=1 args+=("${arg}") ;;
    -h | --help)
      sed -n '2,28s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
      exit 0
      ;;
    *) args+=("${arg}") ;;
  esac
done

if [[ -z "${bin_dir}" ]]; then
  bin_dir=$(tests/bench/build.sh)
  ninja -C "${bin_dir}/.." --quiet fdbroker_python_proto >&2
fi

out=""
if ((smoke && !json)); then
  out=$(mktemp -d -t fdbroker-pyapps-smoke.XXXXXX)
  trap 'rm -rf "${out}"' EXIT
  args+=("--json=${out}/python-apps-smoke.json")
fi
"${python}" tests/bench/python_apps_bench.py --bin-dir="${bin_dir}" "${args[@]}"
