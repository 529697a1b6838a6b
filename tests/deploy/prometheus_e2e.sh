#!/usr/bin/env bash
# Starts a real Prometheus (Debian's /usr/bin/prometheus) on loopback, scraping
# one target every second, and prints the results of PromQL queries through
# its HTTP API. For end-to-end tests: start the broker (and its traffic) first,
# then call this; it cleans up its Prometheus and temp files on exit.
#
#   prometheus_e2e.sh [options] TARGET [QUERY...]
#
#   TARGET             host:port of a /metrics endpoint, e.g. 127.0.0.1:9464
#                      (scraped as job="fdbroker", instance=TARGET)
#   QUERY...           instant queries, evaluated after the waits below
#   --wait-for=EXPR    after the target is up, also wait until EXPR returns a
#                      non-empty result (e.g. 'rate(x_total[1m]) > 0': two
#                      scrapes seen). May be repeated.
#   --rules=FILE       load this rules file too (e.g. deploy/prometheus/alerts.yml)
#   --timeout=SECS     bound on each wait (default 60)
#
# Output, on stdout, one line per sample of each query's result:
#   INDEX<TAB>SERIES<TAB>VALUE
# INDEX is the query's position (0-based), SERIES the sample's metric name and
# labels as Prometheus prints them ('{}' for none), VALUE Prometheus's string
# ("42", "0.5", "NaN"). A query with an empty result prints no line.
#   prometheus_e2e.sh 127.0.0.1:9464 'sum(fdbroker_connections_accepted_total)' | cut -f3
#
# Exit status: 0 all queries evaluated (some may be empty); 3 Prometheus
# rejected a query (message on stderr; the others are still printed); 1 set-up
# failed or a wait timed out (Prometheus's log on stderr); 2 bad usage.
set -euo pipefail

usage() {
  sed -n '2,29s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

timeout_s=60
rules=""
wait_for=()
while (($#)); do
  case "$1" in
    --wait-for=*) wait_for+=("${1#*=}") ;;
    --rules=*) rules="$(realpath "${1#*=}")" ;;
    --timeout=*) timeout_s="${1#*=}" ;;
    -h | --help)
      usage
      exit 0
      ;;
    --) shift; break ;;
    -*)
      echo "prometheus_e2e.sh: unknown option $1 (try --help)" >&2
      exit 2
      ;;
    *) break ;;
  esac
  shift
done
if (($# < 1)); then
  usage >&2
  exit 2
fi
target="$1"
shift
queries=("$@")

prometheus_bin="${PROMETHEUS:-/usr/bin/prometheus}"
python=/usr/bin/python3
[[ -x "${prometheus_bin}" ]] || {
  echo "prometheus_e2e.sh: ${prometheus_bin} not found (deploy/setup.sh --test-tools installs it)" >&2
  exit 1
}

workdir="$(mktemp -d -t fdbroker-prometheus.XXXXXX)"
prometheus_pid=""
cleanup() {
  if [[ -n "${prometheus_pid}" ]]; then
    kill "${prometheus_pid}" 2>/dev/null || true
    wait "${prometheus_pid}" 2>/dev/null || true
  fi
  rm -rf "${workdir}"
}
trap cleanup EXIT

# The HTTP API client: "nonempty EXPR" exits 0 when EXPR has a result, 1 when
# it is empty, 2 on an error; "print EXPR..." prints the format above.
cat >"${workdir}/query.py" <<'EOF'
import json, sys, urllib.error, urllib.parse, urllib.request

def query(base, expr):
    url = base + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
    except urllib.error.HTTPError as error:
        body = json.load(error)
    if body.get("status") != "success":
        raise ValueError(f"{body.get('errorType')}: {body.get('error')}")
    data = body["data"]
    if data["resultType"] == "scalar":
        return [({}, data["result"][1])]
    return [(sample["metric"], sample["value"][1]) for sample in data["result"]]

def series(metric):
    name = metric.get("__name__", "")
    labels = ", ".join(f'{k}="{v}"' for k, v in sorted(metric.items())
                       if k != "__name__")
    return f"{name}{{{labels}}}"

mode, base, exprs = sys.argv[1], sys.argv[2], sys.argv[3:]
if mode == "nonempty":
    try:
        sys.exit(0 if query(base, exprs[0]) else 1)
    except (ValueError, OSError) as error:
        print(error, file=sys.stderr)
        sys.exit(2)
status = 0
for index, expr in enumerate(exprs):
    try:
        for metric, value in query(base, expr):
            print(f"{index}\t{series(metric)}\t{value}")
    except ValueError as error:
        print(f"query {index} rejected: {error}\n  {expr}", file=sys.stderr)
        status = 3
sys.exit(status)
EOF

free_port() {
  "${python}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

write_config() {
  {
    echo "global:"
    echo "  scrape_interval: 1s"
    echo "  scrape_timeout: 1s"
    echo "  evaluation_interval: 1s"
    if [[ -n "${rules}" ]]; then
      echo "rule_files: [\"${rules}\"]"
    fi
    echo "scrape_configs:"
    echo "  - job_name: fdbroker"
    echo "    static_configs:"
    echo "      - targets: [\"${target}\"]"
  } >"${workdir}/prometheus.yml"
}

die_with_log() {
  echo "prometheus_e2e.sh: $*" >&2
  if [[ -s "${workdir}/prometheus.log" ]]; then
    echo "--- prometheus log (last 20 lines)" >&2
    tail -n 20 "${workdir}/prometheus.log" >&2
  fi
  exit 1
}

# Polls "$@" every 0.2 s until it succeeds, at most timeout_s seconds; fails
# early if Prometheus has exited.
poll() {
  local what="$1"
  shift
  local deadline=$((SECONDS + timeout_s))
  until "$@"; do
    kill -0 "${prometheus_pid}" 2>/dev/null ||
      die_with_log "prometheus exited while waiting for ${what}"
    ((SECONDS < deadline)) ||
      die_with_log "timed out after ${timeout_s}s waiting for ${what}"
    sleep 0.2
  done
}

write_config
# A port picked by binding port 0 may be taken before Prometheus binds it:
# try a few times.
for attempt in 1 2 3; do
  port="$(free_port)"
  base="http://127.0.0.1:${port}"
  rm -rf "${workdir}/data"
  "${prometheus_bin}" --config.file="${workdir}/prometheus.yml" \
    --storage.tsdb.path="${workdir}/data" \
    --web.listen-address="127.0.0.1:${port}" \
    --log.level=warn >"${workdir}/prometheus.log" 2>&1 &
  prometheus_pid=$!
  deadline=$((SECONDS + timeout_s))
  until curl -fsS -o /dev/null "${base}/-/ready" 2>/dev/null; do
    if ! kill -0 "${prometheus_pid}" 2>/dev/null; then
      wait "${prometheus_pid}" 2>/dev/null || true
      prometheus_pid=""
      break
    fi
    ((SECONDS < deadline)) ||
      die_with_log "timed out after ${timeout_s}s waiting for prometheus to be ready"
    sleep 0.2
  done
  [[ -n "${prometheus_pid}" ]] && break
  grep -q "address already in use" "${workdir}/prometheus.log" ||
    die_with_log "prometheus exited at start-up"
  ((attempt < 3)) || die_with_log "no free port after 3 attempts"
done

query_nonempty() {
  "${python}" "${workdir}/query.py" nonempty "${base}" "$1" 2>/dev/null
}
poll "target ${target} to be up" query_nonempty 'up{job="fdbroker"} == 1'
for expr in "${wait_for[@]}"; do
  poll "${expr}" query_nonempty "${expr}"
done

((${#queries[@]})) || exit 0
"${python}" "${workdir}/query.py" print "${base}" "${queries[@]}"
