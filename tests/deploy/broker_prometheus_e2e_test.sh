#!/usr/bin/env bash
# End to end: a real Prometheus on loopback scrapes the real broker while wrk
# loads it; every query of the shipped dashboard is evaluated through
# Prometheus's HTTP API. Each must be valid PromQL (prometheus_e2e.sh exits 3
# otherwise) and the core panels must return data that moves with the
# traffic: the accepted rate must be close to what wrk reports.
#
#   broker_prometheus_e2e_test.sh BIN_DIR
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="${1:?usage: $0 BIN_DIR}"
python=/usr/bin/python3

workdir="$(mktemp -d -t fdbroker-broker-e2e.XXXXXX)"
broker_pid=""
wrk_pid=""
cleanup() {
  [[ -n "${wrk_pid}" ]] && kill "${wrk_pid}" 2>/dev/null || true
  if [[ -n "${broker_pid}" ]]; then
    kill -TERM "${broker_pid}" 2>/dev/null || true
    wait "${broker_pid}" 2>/dev/null || true
  fi
  rm -rf "${workdir}"
}
trap cleanup EXIT

"${bin}/fdbroker" --listen=127.0.0.1:0 --control=127.0.0.1:0 \
  --metrics=127.0.0.1:0 --workers=2 --socket="${workdir}/h.sock" \
  --ready_file="${workdir}/ready" 2>"${workdir}/broker.log" &
broker_pid=$!
for _ in $(seq 200); do
  [[ -f "${workdir}/ready" ]] && break
  kill -0 "${broker_pid}" || { cat "${workdir}/broker.log"; exit 1; }
  sleep 0.05
done
listen="$(sed -n 's/^listen=//p' "${workdir}/ready")"
metrics="$(sed -n 's/^metrics=//p' "${workdir}/ready")"
[[ -n "${listen}" && -n "${metrics}" ]] || { echo "no ready file" >&2; exit 1; }
# Both workers serve before the load starts.
for _ in $(seq 200); do
  pids="$(for i in 1 2 3 4 5 6; do curl -fsS -D - -o /dev/null \
    "http://${listen}/" 2>/dev/null | sed -n 's/^X-Worker-Pid: //ip'; done |
    sort -u | wc -l)"
  ((pids == 2)) && break
  sleep 0.05
done

# Connection-per-request load, so that accepts keep moving for the whole run.
wrk -t1 -c8 -d25s -H 'Connection: close' "http://${listen}/" \
  >"${workdir}/wrk.out" 2>&1 &
wrk_pid=$!

mapfile -t queries < <("${python}" "${here}/promql_refs.py" exprs \
  --rate-interval=5s)
((${#queries[@]} > 10)) || { echo "too few dashboard queries" >&2; exit 1; }
# Last, the overall accepted rate, to compare with what wrk measures.
rate_index=${#queries[@]}
"${here}/prometheus_e2e.sh" --timeout=60 \
  --wait-for='rate(fdbroker_connections_accepted_total[5s]) > 0' \
  --wait-for='rate(fdbroker_handoff_latency_seconds_count[5s]) > 0' \
  --wait-for='count_over_time(fdbroker_connections_accepted_total[10s]) >= 6' \
  "${metrics}" "${queries[@]}" \
  'sum(rate(fdbroker_connections_accepted_total[5s]))' \
  >"${workdir}/results.tsv"

# The core panels: traffic, balance, latency, workers, and the process.
core=(
  'sum by (instance) (rate(fdbroker_connections_accepted_total'
  'sum by (instance) (rate(fdbroker_connections_handed_off_total'
  'sum by (instance, worker) (fdbroker_worker_connections_active'
  'histogram_quantile(0.5, sum by (instance, le)'
  'histogram_quantile(0.99, sum by (instance, le)'
  'sum by (state) (fdbroker_workers'
  'rate(process_cpu_seconds_total'
  'process_resident_memory_bytes'
  'process_open_fds'
)
missing=0
for i in "${!queries[@]}"; do
  for prefix in "${core[@]}"; do
    if [[ "${queries[i]}" == "${prefix}"* ]] &&
      ! cut -f1 "${workdir}/results.tsv" | grep -qx "${i}"; then
      echo "core panel without data: ${queries[i]}" >&2
      missing=$((missing + 1))
    fi
  done
done
((missing == 0))

# The metrics move with the traffic: Prometheus's accepted rate over 5 s is
# within a factor of three of wrk's average rate (both are noisy on a
# shared 2-core machine; a broken counter is off by far more).
rate="$(awk -F'\t' -v i="${rate_index}" '$1 == i {print $3}' \
  "${workdir}/results.tsv")"
wait "${wrk_pid}" || true
wrk_pid=""
wrk_rate="$(sed -n 's/^Requests\/sec: *//p' "${workdir}/wrk.out")"
echo "Prometheus: ${rate} accepted/s; wrk: ${wrk_rate} requests/s"
grep -q 'Non-2xx\|Socket errors' "${workdir}/wrk.out" &&
  { cat "${workdir}/wrk.out"; exit 1; }
"${python}" - "${rate}" "${wrk_rate}" <<'PY'
import sys
rate, wrk = float(sys.argv[1]), float(sys.argv[2])
assert wrk > 0 and wrk / 3 <= rate <= 3 * wrk, (rate, wrk)
PY
echo "${#queries[@]} dashboard queries valid; core panels have data"
