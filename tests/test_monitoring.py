"""deploy/monitoring/: the alert rules checked and unit-tested by promtool, the Grafana dashboard's structure and
queries checked, and every metric either names read from a real TorchServe's metrics endpoint, with the label
sets the rules' unit tests give their series.

promtool is Debian's (package prometheus, 2.42 on Debian 12), which scripts/test.sh installs.
"""

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml

from conftest import ROOT, SAMPLES, STYLES
from torchserve_instance import TorchServeInstance

MONITORING = ROOT / "deploy" / "monitoring"
RULES = MONITORING / "alerts.yaml"
RULE_TESTS = MONITORING / "alerts.test.yaml"
DASHBOARD = json.loads((MONITORING / "grafana-dashboard.json").read_text())
# Labels Prometheus adds when it scrapes a pod (docs/deployment.md, "Kubernetes"), on top of those TorchServe serves.
SCRAPE_LABELS = {"namespace", "pod", "instance", "job"}
# TorchServe's host name: the pod's name in a cluster, this machine's here.
HOST_NAME_LABELS = {"Hostname", "hostname"}
# Label values the rules must already handle that no request here can produce yet.
LATER_LABEL_VALUES: dict[tuple[str, str], set[str]] = {}


def promtool(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess:
    path = shutil.which("promtool")
    if path is None:  # a failure, not a skip: scripts/test.sh installs it
        pytest.fail("promtool is missing: scripts/test.sh installs it (Debian's prometheus package)")
    return subprocess.run([path, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


# --- metric names in PromQL -------------------------------------------------------------------------------------

PROMQL_TOKENS = re.compile(r"""
    (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<duration>\[[^\]]*\]|\d+(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*(?![\w.]))
  | (?P<number>0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_:][\w:]*)
  | (?P<other>\S)""", re.VERBOSE)
LABEL_LISTS_AFTER = {"by", "without", "on", "ignoring", "group_left", "group_right"}
NOT_METRICS = LABEL_LISTS_AFTER | {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan", "sum", "min",
                                   "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
                                   "topk", "quantile"}


def metric_names(expr: str) -> set[str]:
    """The metrics a PromQL expression selects: names outside label matchers ({…}) and label lists (by (…),
    on (…), group_left (…)) that are neither called (functions) nor keywords, plus {__name__="…"} matchers."""
    tokens = [(match.lastgroup, match.group()) for match in PROMQL_TOKENS.finditer(expr)]
    names, in_matchers, in_label_list = set(), False, False
    for index, (kind, text) in enumerate(tokens):
        before = tokens[index - 1][1] if index else ""
        after = [text for _, text in tokens[index + 1:index + 3]]
        if text in "{}":
            in_matchers = text == "{"
        elif text == "(" and before in LABEL_LISTS_AFTER:
            in_label_list = True
        elif text == ")" and in_label_list:
            in_label_list = False
        elif in_matchers and text == "__name__" and after[:1] == ["="]:
            names.add(after[1].strip("\"'`"))
        elif kind == "name" and not (in_matchers or in_label_list) and after[:1] != ["("] and text not in NOT_METRICS:
            names.add(text)
    return names


def test_metric_names_are_read_from_promql():
    expr = ('sum by (pod, Stage) (increase(StyleOutOfMemory{ModelName="x", Stage=~"run|admission"}[15m])) > 0 '
            'unless on (pod) group_left (job) (a_metric offset 5m) / ignoring (le) b:recorded or vector(1e6) '
            'and absent_over_time({__name__="c", job="sum"}[$__rate_interval]) > bool 2 * count(d) by (e)')
    assert metric_names(expr) == {"StyleOutOfMemory", "a_metric", "b:recorded", "c", "d"}


# --- the alert rules --------------------------------------------------------------------------------------------

def alert_expressions() -> dict[str, str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule["expr"] for group in groups for rule in group["rules"] if "alert" in rule}


def test_rules_pass_promtool_check():
    check = promtool("check", "rules", RULES.name)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(alert_expressions())} rules found" in check.stdout


def test_rule_unit_tests_pass():
    run = promtool("test", "rules", RULE_TESTS.name)
    assert run.returncode == 0, run.stdout + run.stderr


def test_every_alert_fires_in_a_unit_test_and_stays_quiet_in_one():
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    for alert in alert_expressions():
        expected = [case["exp_alerts"] for case in cases if case["alertname"] == alert]
        assert any(expected), f"{alert} never fires in alerts.test.yaml"
        assert [] in expected, f"{alert} is never shown quiet in alerts.test.yaml"


# --- the dashboard ----------------------------------------------------------------------------------------------

def dashboard_panels() -> list[dict]:
    return [panel for top in DASHBOARD["panels"] for panel in [top, *top.get("panels", [])]]


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard: its panels' and its variables' (label_values(EXPR, label))."""
    queries = [target["expr"] for panel in dashboard_panels() for target in panel.get("targets", [])]
    for variable in DASHBOARD["templating"]["list"]:
        if variable["type"] == "query":
            (expr,) = re.fullmatch(r"label_values\((.+),\s*\w+\)", variable["query"]["query"]).groups()
            queries.append(expr)
    return queries


def test_dashboard_panels_use_the_datasource_variable_and_do_not_overlap():
    variables = {variable["name"]: variable for variable in DASHBOARD["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    source = {"type": "prometheus", "uid": "${datasource}"}
    panels = dashboard_panels()
    assert len({panel["id"] for panel in panels}) == len(panels)
    cells = set()
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"] == source and all(t["datasource"] == source for t in panel["targets"])
            assert len({target["refId"] for target in panel["targets"]}) == len(panel["targets"])
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24, panel["title"]
        covered = {(x, y) for x in range(box["x"], box["x"] + box["w"]) for y in range(box["y"], box["y"] + box["h"])}
        assert not covered & cells, f"{panel['title']} overlaps another panel"
        cells |= covered


def test_dashboard_shows_what_operators_watch():
    names = set().union(*map(metric_names, dashboard_queries()))
    assert {"ts_inference_requests_total", "Requests2XX", "Requests4XX", "Requests5XX",  # requests
            "ts_inference_latency_microseconds", "ts_queue_latency_microseconds",  # latency, queue
            "WorkerLoadTime", "StyleWorkerStarts",  # workers
            "StyleSteps", "StyleStepsPerSecond", "StyleEarlyStops",  # optimisation
            "StyleOutOfMemory", "StyleRefusals", "StyleInternalErrors", "StyleStreamErrors"} <= names  # failures
    queries = " ".join(dashboard_queries())
    for split in ("by (StopReason) (increase(StyleEarlyStops", "by (Stage) (increase(StyleOutOfMemory",
                  "by (Reason) (increase(StyleRefusals", "by (Stage) (increase(StyleInternalErrors"):
        assert split in queries


def test_dashboard_queries_are_valid_promql(tmp_path):
    """promtool parses each query as a recording rule, with Grafana's variables replaced by what Grafana sends."""
    as_sent = [re.sub(r"\$\w+", ".*", expr.replace("$__rate_interval", "5m")) for expr in dashboard_queries()]
    rules = [{"record": f"dashboard:query_{index}", "expr": expr} for index, expr in enumerate(as_sent)]
    (tmp_path / "dashboard.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    check = promtool("check", "rules", "dashboard.yaml", cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr


# --- against a real TorchServe ----------------------------------------------------------------------------------

CONTENT = (SAMPLES / "tubingen.jpg").read_bytes()
STYLE = (STYLES / "starry_night.jpg").read_bytes()
# early_stop_tol 0.9 over 1 step: the optimisation stops as converged at once (StyleEarlyStops)
STOPS_EARLY = {"size": "64", "steps": "20", "early_stop_tol": "0.9", "early_stop_window": "1"}
# One scale at the largest size: its first pass through VGG19 needs hundreds of MB at once
NEEDS_MUCH_MEMORY = {"size": "1024", "min_scale": "1024", "steps": "1"}
MEMORY_HEADROOM = 512 * 2**20
SAMPLE_LINE = re.compile(r"([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+\S+(?:\s+-?\d+)?")
LABEL_PAIR = re.compile(r'([A-Za-z_]\w*)="((?:[^"\\]|\\.)*)"')


def predict(instance: TorchServeInstance, fields: dict) -> requests.Response:
    return requests.post(instance.url("inference", "/predictions/style_transfer"), headers=instance.auth(),
                         files={"content": CONTENT, "style": STYLE}, data=fields, timeout=120)


def limit_address_space(pid: int, headroom: int) -> None:
    """Hold a running process to the address space it has plus `headroom`, as `ulimit -v` would: a larger
    allocation then fails in its allocator for real."""
    status = Path(f"/proc/{pid}/status").read_text()
    in_use = int(re.search(r"^VmSize:\s+(\d+) kB$", status, flags=re.MULTILINE)[1]) * 1024
    resource.prlimit(pid, resource.RLIMIT_AS, (in_use + headroom, in_use + headroom))


def wait_for_a_new_worker(instance: TorchServeInstance, old_pid: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if set(instance.worker_pids(quiet=True)) - {old_pid}:
            return
        time.sleep(0.5)
    raise TimeoutError(f"no new worker after {timeout} s:\n{instance.log_tail()}")


def parse_exposition(text: str) -> dict[str, list[dict[str, str]]]:
    """Prometheus text format: metric name -> the label sets of its samples (names without samples left out)."""
    series: dict[str, list[dict[str, str]]] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, labels = SAMPLE_LINE.fullmatch(line).groups()
            series.setdefault(name, []).append(dict(LABEL_PAIR.findall(labels or "")))
    return series


def counted(text: str, name: str, labels: str = "") -> float:
    """The value of the model's counter `name` with the further `labels` in a /metrics text (0 before its first
    count)."""
    found = re.search(rf'^{name}\{{ModelName="style_transfer",Level="Model",{labels}Hostname="[^"]+",\}} (\S+)$',
                      text, flags=re.MULTILINE)
    return float(found[1]) if found else 0.0


@pytest.fixture(scope="module")
def served_series(breakable_server):
    """The tests' TorchServe for breaking (conftest.py) taken through every metric the dashboard and the alerts
    read: a request that stops early, a refused one (4xx), one that really runs out of memory (507) and a
    worker killed and restarted. Returns its /metrics, parsed and as text, and the text before."""
    instance = breakable_server
    (worker,) = instance.worker_pids()
    before = requests.get(instance.url("metrics", "/metrics"), timeout=10).text
    assert predict(instance, STOPS_EARLY).headers["X-Style-Stop-Reason"] == "converged"
    assert predict(instance, {"size": "huge"}).status_code == 400
    limit_address_space(worker, MEMORY_HEADROOM)
    refused = predict(instance, NEEDS_MUCH_MEMORY)
    assert (refused.status_code, refused.json()["type"]) == (507, "OutOfMemory"), refused.text
    os.kill(worker, signal.SIGKILL)
    wait_for_a_new_worker(instance, worker)
    text = requests.get(instance.url("metrics", "/metrics"), timeout=10).text
    return parse_exposition(text), text, before


@pytest.mark.integration
def test_out_of_memory_answers_and_worker_restarts_are_counted(served_series):
    _, text, before = served_series
    out_of_memory = 'Stage="run",'
    assert counted(text, "StyleOutOfMemory", out_of_memory) == counted(before, "StyleOutOfMemory", out_of_memory) + 1
    assert counted(text, "StyleWorkerStarts") == counted(before, "StyleWorkerStarts") + 1 >= 2


@pytest.mark.integration
def test_every_metric_the_dashboard_and_the_alerts_name_is_served(served_series):
    served, _, _ = served_series
    for source, queries in (("dashboard", dashboard_queries()), ("alerts", alert_expressions().values())):
        for query in queries:
            assert metric_names(query), query
            missing = metric_names(query) - set(served)
            assert not missing, f"{source}: {query}\nnames no series that TorchServe serves: {sorted(missing)}"


@pytest.mark.integration
def test_alert_unit_tests_give_their_series_the_labels_torchserve_serves(served_series):
    served, _, _ = served_series
    for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for series in test["input_series"]:
            name, labels = re.fullmatch(r"(\w+)\{(.*)\}", series["series"]).groups()
            labels = dict(LABEL_PAIR.findall(labels))
            assert SCRAPE_LABELS <= set(labels), series["series"]
            own = {key: value for key, value in labels.items() if key not in SCRAPE_LABELS}
            assert any(same_series(name, own, real) for real in served[name]), (
                f"{series['series']}\nTorchServe serves {name} with {served[name]}")


def same_series(name: str, own: dict[str, str], real: dict[str, str]) -> bool:
    """The same label names, and the same values but for the host name and values still to come."""
    return own.keys() == real.keys() and all(
        key in HOST_NAME_LABELS or value == real[key] or value in LATER_LABEL_VALUES.get((name, key), ())
        for key, value in own.items())
