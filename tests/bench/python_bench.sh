#!/usr/bin/env bash
# Python workers benchmark: the same asyncio HTTP server
# (worker/python/examples/http_worker.py) as one process serving directly
# (--listen) against N processes behind fdbroker, under keep-alive wrk load
# on loopback. The two variants are measured interleaved (A B, then B A, ...)
# so that drift on a shared machine hits both; prints each run, the medians
# and the speed-up. Method and figures: docs/benchmarks.md, "Python workers".
#
#   tests/bench/python_bench.sh [options]
#
#   --rounds=N        interleaved rounds (default 3)
#   --duration=S      seconds per measured run (default 10)
#   --warmup=S        warm-up seconds before each run (default 2)
#   --workers=N       Python workers behind the broker (default 2)
#   --connections=N   wrk connections (default 64)
#   --threads=N       wrk threads (default 2)
#   --bin-dir=DIR     fdbroker from DIR (its handoff_pb2.py from DIR/../gen/python)
#                     instead of building Release in build/bench
#
# Exit status: 0 done, 1 a variant failed (non-2xx or socket errors count as
# failure), 2 bad usage.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
root=${PWD}
python=/usr/bin/python3 # Debian's: it has python3-protobuf
example="${root}/worker/python/examples/http_worker.py"

rounds=3 duration=10 warmup=2 workers=2 connections=64 threads=2 bin_dir=""
for arg in "$@"; do
  case "${arg}" in
    --rounds=*) rounds=${arg#*=} ;;
    --duration=*) duration=${arg#*=} ;;
    --warmup=*) warmup=${arg#*=} ;;
    --workers=*) workers=${arg#*=} ;;
    --connections=*) connections=${arg#*=} ;;
    --threads=*) threads=${arg#*=} ;;
    --bin-dir=*) bin_dir=${arg#*=} ;;
    -h | --help)
      sed -n '2,21s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
      exit 0
      ;;
    *)
      echo "python_bench.sh: unknown argument '${arg}' (try --help)" >&2
      exit 2
      ;;
  esac
done

if [[ -z "${bin_dir}" ]]; then
  bin_dir=$(tests/bench/build.sh)
  ninja -C "${bin_dir}/.." --quiet fdbroker_python_proto >&2
fi
bin_dir=$(realpath "${bin_dir}")
export FDBROKER_PYTHON_PROTO_DIR="${bin_dir}/../gen/python"

workdir=$(mktemp -d -t fdbroker-pybench.XXXXXX)
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do
    kill -TERM "${pid}" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    wait "${pid}" 2>/dev/null || true
  done
  rm -rf "${workdir}"
}
trap cleanup EXIT

# wait_ready FILE PID: waits (10 s at most) for a ready file written by PID.
wait_ready() {
  local i
  for ((i = 0; i < 200; i++)); do
    [[ -s "$1" ]] && return 0
    kill -0 "$2" 2>/dev/null || break
    sleep 0.05
  done
  echo "python_bench.sh: no ready file $1; log:" >&2
  cat "${workdir}"/*.log >&2
  exit 1
}

# Standalone: one asyncio process on its own listening socket.
"${python}" "${example}" --listen=127.0.0.1:0 \
  --ready_file="${workdir}/direct.ready" 2>"${workdir}/direct.log" &
pids+=($!)
wait_ready "${workdir}/direct.ready" "${pids[-1]}"
direct_port=$(sed -n 's/^listen=.*://p' "${workdir}/direct.ready")

# fdbroker with N workers running the same code.
"${bin_dir}/fdbroker" --listen=127.0.0.1:0 --control=127.0.0.1:0 --metrics= \
  --workers="${workers}" --socket="${workdir}/handoff.sock" \
  --ready_file="${workdir}/broker.ready" \
  --worker_cmd="${python} ${example}" 2>"${workdir}/broker.log" &
pids+=($!)
broker_pid=${pids[-1]}
wait_ready "${workdir}/broker.ready" "${broker_pid}"
broker_port=$(sed -n 's/^listen=.*://p' "${workdir}/broker.ready")
# Every worker answers before the load starts.
for ((i = 0; i < 400; i++)); do
  seen=$(for ((c = 0; c < 4 * workers; c++)); do
    curl -fsS -D - -o /dev/null "http://127.0.0.1:${broker_port}/" 2>/dev/null |
      sed -n 's/^X-Worker-Pid: //ip'
  done | sort -u | wc -l)
  ((seen == workers)) && break
  sleep 0.05
done
((seen == workers)) || {
  echo "python_bench.sh: ${seen} of ${workers} workers answer" >&2
  exit 1
}

# cpu_ticks PID: user + system CPU time of PID so far, in clock ticks.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

# measure NAME PORT: a warm-up, then one measured wrk run; appends req/s to
# workdir/NAME.rps (and, for the broker, its CPU share to broker.cpu).
measure() {
  local name=$1 port=$2 out="${workdir}/$1.wrk" before
  wrk -t"${threads}" -c"${connections}" -d"${warmup}s" \
    "http://127.0.0.1:${port}/" >/dev/null
  before=$(cpu_ticks "${broker_pid}")
  wrk -t"${threads}" -c"${connections}" -d"${duration}s" \
    "http://127.0.0.1:${port}/" >"${out}"
  if [[ "${name}" == fdbroker ]]; then
    echo "$(($(cpu_ticks "${broker_pid}") - before))" \
      "$(getconf CLK_TCK)" "${duration}" |
      awk '{ printf "%.2f\n", 100 * $1 / $2 / $3 }' >>"${workdir}/broker.cpu"
  fi
  if grep -q 'Non-2xx\|Socket errors' "${out}"; then
    echo "python_bench.sh: ${name} had errors:" >&2
    cat "${out}" >&2
    exit 1
  fi
  local rps
  rps=$(sed -n 's/^Requests\/sec: *//p' "${out}")
  echo "${rps}" >>"${workdir}/${name}.rps"
  printf '  %-10s %10.0f req/s\n' "${name}" "${rps}"
}

echo "Python workers: wrk -t${threads} -c${connections} keep-alive GET /," \
  "${rounds} rounds x ${duration} s (warm-up ${warmup} s), $(nproc) CPUs"
for ((round = 1; round <= rounds; round++)); do
  echo "round ${round}"
  if ((round % 2)); then
    measure direct "${direct_port}"
    measure fdbroker "${broker_port}"
  else
    measure fdbroker "${broker_port}"
    measure direct "${direct_port}"
  fi
done

median() { sort -g "$1" | awk '{v[NR] = $1} END {
  print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
direct=$(median "${workdir}/direct.rps")
brokered=$(median "${workdir}/fdbroker.rps")
printf 'median: 1 process direct %.0f req/s; %d workers via fdbroker %.0f req/s\n' \
  "${direct}" "${workers}" "${brokered}"
awk -v a="${brokered}" -v b="${direct}" \
  'BEGIN { printf "speed-up: %.2fx\n", a / b }'
echo "broker CPU during the fdbroker runs: $(paste -sd' ' "${workdir}/broker.cpu")" \
  "(% of one core)"
