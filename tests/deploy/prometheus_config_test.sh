#!/usr/bin/env bash
# deploy/prometheus/: the configuration and the alerting rules pass promtool,
# and the rules' unit tests (alerts_test.yml) pass: among them, the
# no-ready-worker and fd-usage alerts fire on synthetic series and stay quiet
# when they should.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../../deploy/prometheus"

echo "== promtool check config"
promtool check config prometheus.yml
echo "== promtool check rules"
promtool check rules alerts.yml
echo "== promtool test rules"
promtool test rules alerts_test.yml

# The tests must cover the alerts the issue asks for.
for alert in FdbrokerNoReadyWorker FdbrokerFdUsageHigh FdbrokerWorkerRestartLoop \
  FdbrokerHandoffFailures FdbrokerOverloadRejections FdbrokerDown; do
  grep -q "alertname: ${alert}\$" alerts_test.yml ||
    { echo "alerts_test.yml does not test ${alert}" >&2; exit 1; }
done
echo "ok"
