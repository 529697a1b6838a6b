#!/usr/bin/python3
"""Checks the shipped dashboard and alerting rules against the metrics fdbroker
exports (tests/deploy/exported_metrics.txt), and prints their PromQL.

  promql_refs.py check                  dashboard + alerts: structure, metric
                                        names, label names, functions
  promql_refs.py exprs [--rate-interval=1m]
                                        every dashboard query, one a line, with
                                        Grafana's variables replaced so that
                                        Prometheus can evaluate it
  promql_refs.py rules [--rate-interval=1m]
                                        the same queries as a rules file for
                                        `promtool check rules` (syntax check
                                        without a server)

Paths default to the repository's files; --dashboard, --alerts and --metrics
override them. The parser is deliberately small: it knows the PromQL that a
dashboard uses (selectors, functions, aggregations with by/without, vector
matching with on/ignoring/group_*), and rejects anything it does not know
rather than letting an unknown name through.
"""

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DASHBOARD = REPO / "deploy/grafana/dashboards/fdbroker.json"
DEFAULT_ALERTS = REPO / "deploy/prometheus/alerts.yml"
DEFAULT_METRICS = REPO / "tests/deploy/exported_metrics.txt"

# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"job", "instance"}
# Series that Prometheus itself produces for a scrape target.
SYNTHETIC_METRICS = {"up": set()}

FUNCTIONS = {
    "abs", "absent", "absent_over_time", "avg_over_time", "ceil", "changes",
    "clamp", "clamp_max", "clamp_min", "count_over_time", "deriv", "delta",
    "floor", "histogram_quantile", "idelta", "increase", "irate",
    "label_replace", "last_over_time", "max_over_time", "min_over_time",
    "predict_linear", "quantile_over_time", "rate", "resets", "round",
    "scalar", "sort", "sort_desc", "sum_over_time", "time", "timestamp",
    "vector",
}
AGGREGATIONS = {"sum", "avg", "min", "max", "count", "topk", "bottomk",
                "quantile", "stddev", "stdvar", "count_values", "group"}
LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left",
                       "group_right"}
OPERATOR_KEYWORDS = {"and", "or", "unless", "bool", "offset"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<number>\d+(?:\.\d+)?(?:ms|[smhdwy])?(?:\d+(?:ms|[smhdwy]))*)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^<>=,(){}\[\]])
""", re.VERBOSE)


class Catalogue:
    """The exported families: name -> (type, set of label names)."""

    def __init__(self, path):
        self.families = {}
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            fields = line.split()
            if len(fields) != 3 or fields[1] not in ("counter", "gauge",
                                                     "histogram", "summary"):
                raise SystemExit(f"{path}:{number}: want 'NAME TYPE LABELS'")
            labels = set() if fields[2] == "-" else set(fields[2].split(","))
            self.families[fields[0]] = (fields[1], labels)

    def lookup(self, name):
        """Returns the label names a series of this name may carry, or None."""
        if name in self.families:
            kind, labels = self.families[name]
            if kind == "histogram":
                return None  # only its _bucket/_sum/_count series exist
            if kind == "summary":
                return labels | TARGET_LABELS | {"quantile"}
            return labels | TARGET_LABELS
        for suffix in HISTOGRAM_SUFFIXES:
            base = name[: -len(suffix)] if name.endswith(suffix) else None
            kind = self.families.get(base, ("",))[0] if base else ""
            if kind == "histogram" or (kind == "summary" and suffix != "_bucket"):
                extra = {"le"} if suffix == "_bucket" else set()
                return self.families[base][1] | TARGET_LABELS | extra
        if name in SYNTHETIC_METRICS:
            return SYNTHETIC_METRICS[name] | TARGET_LABELS
        return None


def tokenize(expr):
    tokens, pos = [], 0
    while pos < len(expr):
        match = TOKEN.match(expr, pos)
        if not match:
            raise ValueError(f"cannot parse at {expr[pos:pos + 20]!r}")
        pos = match.end()
        if match.lastgroup != "space":
            tokens.append((match.lastgroup, match.group()))
    return tokens


def analyse(expr, catalogue):
    """Returns (errors, metric names, label names the result may carry)."""
    errors, metrics, all_labels = [], [], set()
    try:
        tokens = tokenize(expr)
    except ValueError as error:
        return [str(error)], metrics, all_labels
    grouping = []  # label names from by/on/... lists, checked at the end
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else None
        if kind != "ident":
            i += 1
            continue
        if text in LABEL_LIST_KEYWORDS:
            if following == "(":
                j = i + 2
                while j < len(tokens) and tokens[j][1] != ")":
                    if tokens[j][0] == "ident":
                        grouping.append(tokens[j][1])
                    j += 1
                i = j + 1
            else:
                i += 1  # group_left without a list
            continue
        if text in OPERATOR_KEYWORDS:
            i += 1
            continue
        if text in AGGREGATIONS and following in LABEL_LIST_KEYWORDS:
            i += 1  # sum by (...) (...)
            continue
        if following == "(" and text in FUNCTIONS | AGGREGATIONS:
            i += 1
            continue
        if following == "(":
            errors.append(f"unknown function {text}()")
            i += 1
            continue
        # A metric name, maybe with a {matcher list}.
        labels = catalogue.lookup(text)
        if labels is None and text in catalogue.families:
            errors.append(f"{text} is a histogram: query {text}_bucket, "
                          f"_sum or _count")
            labels = set()
        elif labels is None:
            errors.append(f"{text} is not an exported metric "
                          f"(tests/deploy/exported_metrics.txt)")
            labels = set()
        metrics.append(text)
        all_labels |= labels
        i += 1
        if i < len(tokens) and tokens[i][1] == "{":
            i += 1
            while i < len(tokens) and tokens[i][1] != "}":
                if tokens[i][0] == "ident" and i + 1 < len(tokens) and \
                        tokens[i + 1][1] in ("=", "!=", "=~", "!~"):
                    if tokens[i][1] not in labels and labels:
                        errors.append(f"{text} has no label "
                                      f"{tokens[i][1]!r}")
                i += 1
            i += 1
    for label in grouping:
        if label not in all_labels:
            errors.append(f"no metric in the query has label {label!r}")
    if not metrics:
        errors.append("queries no metric")
    return errors, metrics, all_labels


def substitute(expr, rate_interval):
    """Replaces the Grafana variables the dashboard uses."""
    expr = expr.replace("$__rate_interval", rate_interval)
    expr = expr.replace("$__interval", rate_interval)
    expr = expr.replace("$__range", rate_interval)
    # Template variables appear only inside =~ matchers: match everything.
    expr = re.sub(r"\$\{?[A-Za-z_]\w*(?::\w+)?\}?", ".*", expr)
    return expr


def walk_panels(panels):
    for panel in panels:
        yield panel
        yield from walk_panels(panel.get("panels", []))


def dashboard_queries(dashboard):
    """Yields (where, expr, legendFormat) for every query of the dashboard."""
    for panel in walk_panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            yield (f"panel {panel.get('title')!r} target {target.get('refId')}",
                   target.get("expr", ""), target.get("legendFormat", ""))
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        match = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*",
                             query or "")
        if variable.get("type") == "query":
            if not match:
                yield (f"variable {variable.get('name')!r}", query or "", "")
            else:
                yield (f"variable {variable.get('name')!r}", match.group(1),
                       "{{" + match.group(2) + "}}")


def check_dashboard(path, catalogue):
    errors = []
    try:
        dashboard = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        return [f"{path}: {error}"]

    def fail(message):
        errors.append(f"{path}: {message}")

    if not dashboard.get("uid") or not dashboard.get("title"):
        fail("uid and title are required")
    if not isinstance(dashboard.get("schemaVersion"), int):
        fail("schemaVersion missing")
    ids, titles, cells = set(), set(), {}
    panels = list(walk_panels(dashboard.get("panels", [])))
    if not any(p.get("type") != "row" for p in panels):
        fail("no panels")
    for panel in panels:
        title = panel.get("title", "")
        if panel.get("id") in ids:
            fail(f"panel id {panel.get('id')} is used twice")
        ids.add(panel.get("id"))
        if panel.get("type") == "row":
            continue
        if not title or title in titles:
            fail(f"panel title {title!r} is empty or used twice")
        titles.add(title)
        grid = panel.get("gridPos", {})
        if grid.get("x", 0) + grid.get("w", 0) > 24:
            fail(f"panel {title!r} is wider than the 24-column grid")
        for x in range(grid.get("x", 0), grid.get("x", 0) + grid.get("w", 0)):
            for y in range(grid.get("y", 0), grid.get("y", 0) + grid.get("h", 0)):
                if (x, y) in cells:
                    fail(f"panel {title!r} overlaps {cells[(x, y)]!r}")
                    break
                cells[(x, y)] = title
            else:
                continue
            break
        targets = panel.get("targets") or []
        if not targets:
            fail(f"panel {title!r} has no targets")
        for target in targets:
            if not target.get("expr", "").strip():
                fail(f"panel {title!r} target {target.get('refId')} "
                     "has no expr")
            datasource = target.get("datasource") or panel.get("datasource")
            if not datasource or datasource.get("uid") != "prometheus":
                fail(f"panel {title!r} must use the datasource uid "
                     "'prometheus' (deploy/grafana/provisioning)")
    for where, expr, legend in dashboard_queries(dashboard):
        problems, _, labels = analyse(substitute(expr, "1m"), catalogue)
        for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
            if label not in labels:
                problems.append(f"legend uses {{{{{label}}}}}, "
                                "which the result does not carry")
        for problem in problems:
            fail(f"{where}: {problem}\n    {expr}")
    return errors


def check_alerts(path, catalogue):
    errors = []
    try:
        rules = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        return [f"{path}: {error}"]
    count = 0
    for group in rules.get("groups", []):
        for rule in group.get("rules", []):
            count += 1
            name = rule.get("alert") or rule.get("record")
            problems, _, _ = analyse(rule.get("expr", ""), catalogue)
            if rule.get("alert") and "severity" not in rule.get("labels", {}):
                problems.append("no severity label")
            for problem in problems:
                errors.append(f"{path}: rule {name}: {problem}")
    if not count:
        errors.append(f"{path}: no rules")
    return errors


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["check", "exprs", "rules"])
    parser.add_argument("--dashboard", default=DEFAULT_DASHBOARD)
    parser.add_argument("--alerts", default=DEFAULT_ALERTS)
    parser.add_argument("--metrics", default=DEFAULT_METRICS)
    parser.add_argument("--rate-interval", default="1m")
    args = parser.parse_args()

    catalogue = Catalogue(args.metrics)
    if args.command == "check":
        errors = check_dashboard(args.dashboard, catalogue)
        errors += check_alerts(args.alerts, catalogue)
        for error in errors:
            print(error, file=sys.stderr)
        if errors:
            return 1
        dashboard = json.loads(Path(args.dashboard).read_text())
        print(f"{len(list(dashboard_queries(dashboard)))} dashboard queries and "
              f"the alerting rules use only exported metrics "
              f"({len(catalogue.families)} families)")
        return 0

    dashboard = json.loads(Path(args.dashboard).read_text())
    exprs = [substitute(expr, args.rate_interval)
             for _, expr, _ in dashboard_queries(dashboard)]
    if args.command == "exprs":
        for expr in exprs:
            print(" ".join(expr.split()))
    else:
        rules = [{"record": f"fdbroker_dashboard:query{n}", "expr": expr}
                 for n, expr in enumerate(exprs)]
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]},
                       sys.stdout, sort_keys=False, width=1000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
