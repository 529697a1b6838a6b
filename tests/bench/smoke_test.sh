#!/usr/bin/env bash
# ctest "bench_smoke" (label bench): a very short run of the benchmark with the
# binaries of the build under test. It checks only that the harness works end
# to end (every variant starts and serves, the scale run holds its
# connections, the JSON is complete, the chart is drawn); it does not judge
# performance.
#
#   smoke_test.sh BIN_DIR
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="${1:?usage: $0 BIN_DIR}"
out="$(mktemp -d -t fdbroker-bench-smoke.XXXXXX)"
trap 'rm -rf "${out}"' EXIT

"${here}/run.sh" --smoke --bin-dir="${bin}" --results-dir="${out}" \
  --chart="${out}/chart.png"

/usr/bin/python3 - "${out}" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
files = [f for f in glob.glob(f"{out}/*.json")]
assert len(files) == 1, files
r = json.load(open(files[0]))
variants = ["direct", "fdbroker", "fdbroker-kernel", "haproxy", "node-cluster"]
assert r["settings"]["variants"] == variants, r["settings"]["variants"]
for v in variants:
    for w in ("keepalive", "close"):
        cell = r["medians"][v][w]
        assert cell["rps"] > 0 and cell["cpu_per_request_us"] > 0, (v, w, cell)
        assert cell["errors"] == 0 and cell["non_2xx"] == 0, (v, w, cell)
fd = r["medians"]["fdbroker"]["close"]
for key in ("broker_cpu_per_handoff_us", "handoff_p50_us", "handoff_p99_us",
            "front_runq_share", "front_runq_wait_us", "workers_runq_share"):
    assert fd.get(key) is not None, key
assert 0 <= fd["front_runq_share"] <= 1 and 0 <= fd["workers_runq_share"] <= 1, fd
cost = r["machine"]["wake_cost"]
if len(os.sched_getaffinity(0)) >= 2:
    for mode in ("same", "cross", "free"):
        assert cost[mode]["parent_cpu_us"] > 0 and cost[mode]["wall_us"] > 0, cost
# 8 for the hand-off mode, 4 for --placement=kernel.
assert len(r["targets"]) == 12 and all(t["verdict"] in ("PASS", "MISS") for t in r["targets"]), r["targets"]
idle = r["idle"]
assert idle and idle["ok"] and idle["requests_ok"] == idle["connections"], idle
with open(f"{out}/chart.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
print("bench smoke: JSON complete, chart drawn")
PY

# The balance variant (--balance): per-worker counts and spreads.
rm -f "${out}"/*.json
"${here}/run.sh" --smoke --balance --variants=fdbroker-kernel \
  --bin-dir="${bin}" --results-dir="${out}"
/usr/bin/python3 - "${out}" <<'PY'
import glob, json, sys
files = glob.glob(f"{sys.argv[1]}/*-balance.json")
assert len(files) == 1, files
r = json.load(open(files[0]))
assert r["settings"]["balance"] and r["settings"]["wrk_connections"] == 32
for run in r["runs"]:
    assert sum(run["worker_requests"].values()) > 0, run
    assert run.get("request_spread") is not None, run
    if run["workload"] == "keepalive":
        assert sum(run["worker_connections"]) == 32, run
        assert run.get("connection_spread") is not None, run
assert [t["verdict"] for t in r["targets"]] != [], r["targets"]
print("bench smoke: balance JSON complete")
PY
