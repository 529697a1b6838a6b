#!/usr/bin/python3
"""Serves /metrics with every family of tests/deploy/exported_metrics.txt, with
counters that grow over time: a stand-in broker for testing the Prometheus
helper and the dashboard's queries without building fdbroker.

  fake_exporter.py [--metrics=FILE]

Binds 127.0.0.1 on a free port, prints "port N" on stdout, then serves until
it is killed.
"""

import argparse
import http.server
import sys
import time
from pathlib import Path

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, str(Path(__file__).resolve().parent))
from promql_refs import DEFAULT_METRICS, Catalogue  # noqa: E402

# Plausible values for each label (the broker's bounded label sets).
LABEL_VALUES = {
    "reason": {
        "fdbroker_handoff_failures_total": [
            "worker_lost", "rejected_by_worker", "send_error", "channel_full",
            "too_many_attempts"],
        "fdbroker_connections_rejected_total": ["overload", "shutdown",
                                                "proxy_protocol"],
        "fdbroker_connections_migrated_total": ["rebalance", "drain"],
        "fdbroker_connections_lost_total": [
            "worker_crash", "worker_timeout", "drain_deadline", "shutdown",
            "upgrade_deadline", "release_truncated", "cut_by_worker"],
        "fdbroker_workers_declared_dead_total": [
            "heartbeat_timeout", "ack_timeout", "channel_stuck",
            "worker_timeout"],
        "fdbroker_worker_recycles_total": [
            "restart", "max_connections", "max_rss", "max_age"],
    },
    "result": ["done", "failed"],
    "state": ["starting", "ready", "draining"],
    "listener": ["0.0.0.0:8080", "unix:/run/fdbroker/clients.sock"],
    "worker": ["1", "2", "3"],
}
CONTROL_CALLS = [("ListWorkers", "OK"), ("ScaleWorkers", "OK"),
                 ("ScaleWorkers", "INVALID_ARGUMENT")]
BUCKETS = [1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2,
           2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]
START = time.time()


def label_sets(name, labels):
    if not labels:
        return [{}]
    if labels == {"method", "code"}:
        return [{"method": m, "code": c} for m, c in CONTROL_CALLS]
    (label,) = labels
    values = LABEL_VALUES[label]
    if isinstance(values, dict):
        values = values[name]
    return [{label: value} for value in values]


def render(labels):
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def exposition(catalogue):
    elapsed = time.time() - START
    lines = []
    for n, (name, (kind, labels)) in enumerate(sorted(catalogue.families.items())):
        lines.append(f"# HELP {name} Fake {name}.")
        lines.append(f"# TYPE {name} {kind}")
        for i, label_set in enumerate(label_sets(name, labels)):
            if kind == "histogram":
                count = int(100 * elapsed) + 1
                for bound in BUCKETS:
                    share = min(1.0, 0.2 + bound * 200)
                    le = dict(label_set, le=repr(float(bound)))
                    lines.append(f"{name}_bucket{render(le)} {int(count * share)}")
                lines.append(f"{name}_bucket{render(dict(label_set, le='+Inf'))} {count}")
                lines.append(f"{name}_sum{render(label_set)} {count * 0.0002}")
                lines.append(f"{name}_count{render(label_set)} {count}")
            elif kind == "summary":
                count = int(10 * elapsed) + 1
                for quantile in ("0.5", "0.9", "0.99"):
                    q = dict(label_set, quantile=quantile)
                    lines.append(f"{name}{render(q)} {float(quantile) * 1000}")
                lines.append(f"{name}_sum{render(label_set)} {count * 500}")
                lines.append(f"{name}_count{render(label_set)} {count}")
            elif kind == "counter":
                value = (n + i + 1) * (1 + elapsed)
                lines.append(f"{name}{render(label_set)} {value:.3f}")
            else:
                if name == "process_max_fds":
                    value = 1024
                elif name == "fdbroker_accepting":
                    value = 1
                else:
                    value = n + i + 1
                lines.append(f"{name}{render(label_set)} {value}")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--metrics", default=DEFAULT_METRICS)
    args = parser.parse_args()
    catalogue = Catalogue(args.metrics)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/metrics":
                self.send_error(404)
                return
            body = exposition(catalogue).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(f"port {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
