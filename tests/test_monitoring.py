"""Prometheus around the ensemble plugin: the shipped config and alert rules through the real promtool,
the rules' own unit tests (`promtool test rules`), the Grafana dashboard's PromQL, and a real Prometheus
on 127.0.0.1 started, queried and stopped by monitoring/prometheus_ctl.py (scraping itself, since these
tests run no TorchServe; tests/test_integration.py scrapes a real one). Every wait is bounded.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml
from PIL import Image

from archive_scripts.waiting import wait_for
from handlers.config.files import read_properties
from monitoring import prometheus_ctl, report
from monitoring.prometheus_ctl import ALERTS, PROMTOOL, ROOT, Prometheus, PrometheusError, query, write_test_config

# Starts a real Prometheus on 127.0.0.1 and runs promtool.
pytestmark = pytest.mark.integration

MONITORING = ROOT / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
ALERT_NAMES = [
    "TorchServeMetricsDown",
    "EnsembleErrorRateHigh",
    "EnsembleQuorumFailures",
    "EnsembleAbstentionRateHigh",
    "EnsembleDisagreementRising",
    "EnsembleMemberCostDoubled",
    "EnsembleMemberDrift",
    "EnsembleMemberMissing",
]
RECORDED = [
    "ensemble:error_ratio:rate5m",
    "ensemble:quorum_failure_ratio:rate5m",
    "ensemble:abstention_ratio:rate15m",
    "ensemble:disagreement_ratio:rate1h",
    "ensemble:disagreement_ratio:rate1d_offset1h",
    "ensemble:batch_fill:rate10m",
    "ensemble:batch_fill:rate1d_offset1h",
    "ensemble_member:seconds_per_image:rate10m",
    "ensemble_member:seconds_per_image:rate1d_offset1h",
    "ensemble_member:positive_share:rate1h",
    "ensemble_member:positive_share_vs_peers:rate1h",
    "ensemble_member:missing_ratio:rate5m",
]
PANEL_TITLES = [
    "Member cost per image (ms)",
    "Disagreement rate",
    "Abstention rate",
    "Policy mix (requests/s by policy)",
    "Refused requests/s by error type",
    "Images/s",
    "Batch fill (images per TorchServe batch)",
    "Member positive share by label",
    "Member images skipped by early exit (share)",
    "Deferral rate",
    "Members missing from answers",
    "Partial answer rate",
    "Quorum failure rate",
]
WAIT_S = 30


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """promtool from .tools/prometheus, run in monitoring/ so its output names files as given."""
    prometheus_ctl.require_tools()
    return subprocess.run(
        [str(PROMTOOL), *args], cwd=MONITORING, capture_output=True, text=True, timeout=120, check=False
    )


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- the shipped files, through promtool -------------------------------------------------------------


def test_promtool_accepts_the_shipped_config() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines() == [
        "Checking prometheus.yml",
        "  SUCCESS: 1 rule files found",
        " SUCCESS: prometheus.yml is valid prometheus config file syntax",
        "",
        "Checking alerts.yml",
        "  SUCCESS: 20 rules found",
        "",
    ]


def test_promtool_accepts_the_alert_rules() -> None:
    result = promtool("check", "rules", "alerts.yml")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines() == ["Checking alerts.yml", "  SUCCESS: 20 rules found", ""]


def test_alert_rules_pass_their_unit_tests() -> None:
    """Each alert fires above its threshold at the expected time, with the exact annotations, and not below."""
    result = promtool("test", "rules", "alerts_test.yml")
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert result.stdout.splitlines() == ["Unit Testing:  alerts_test.yml", "  SUCCESS", ""]


def test_shipped_config_scrapes_torchserve_every_5s() -> None:
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    assert config == {
        "global": {"scrape_interval": "5s", "scrape_timeout": "4s", "evaluation_interval": "15s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [
            {"job_name": "torchserve", "metrics_path": "/metrics", "static_configs": [{"targets": ["127.0.0.1:8082"]}]}
        ],
    }
    shipped = read_properties(ROOT / "config.properties")
    assert shipped["metrics_address"] == "http://127.0.0.1:8082"


def test_every_alert_is_labelled_annotated_and_unit_tested() -> None:
    [group] = yaml.safe_load(ALERTS.read_text())["groups"]
    rules = group["rules"]
    assert [r["record"] for r in rules if "record" in r] == RECORDED
    alerts = [r for r in rules if "alert" in r]
    assert [a["alert"] for a in alerts] == ALERT_NAMES
    for alert in alerts:
        assert alert["labels"]["severity"] in ("warning", "critical")
        assert set(alert["annotations"]) == {"summary", "description"}
        assert re.fullmatch(r"\d+m", alert["for"])
    # Every alert is checked both firing and quiet.
    checks = [
        c
        for test in yaml.safe_load((MONITORING / "alerts_test.yml").read_text())["tests"]
        for c in test.get("alert_rule_test", [])
    ]
    assert sorted({c["alertname"] for c in checks if c["exp_alerts"]}) == sorted(ALERT_NAMES)
    assert sorted({c["alertname"] for c in checks if not c["exp_alerts"]}) == sorted(ALERT_NAMES)


# --- the Grafana dashboard ----------------------------------------------------------------------------


def test_dashboard_structure() -> None:
    board = dashboard()
    assert [p["title"] for p in board["panels"]] == PANEL_TITLES
    assert (board["schemaVersion"], board["uid"]) == (39, "torchserve-ensembles")
    assert [i["name"] for i in board["__inputs"]] == ["DS_PROMETHEUS"]
    variables = board["templating"]["list"]
    assert [(v["name"], v["type"]) for v in variables] == [("DS_PROMETHEUS", "datasource"), ("model", "query")]
    assert variables[1]["query"]["query"] == "label_values(ensemble_images_total, ModelName)"
    assert len({p["id"] for p in board["panels"]}) == len(PANEL_TITLES)
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        assert [t["datasource"]["uid"] for t in panel["targets"]] == ["${DS_PROMETHEUS}"]
        grid = panel["gridPos"]
        cell = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & cell, f"{panel['title']} overlaps another panel"
        cells |= cell


@pytest.mark.parametrize("panel", dashboard()["panels"], ids=lambda p: p["title"])
def test_dashboard_promql_is_valid(panel: dict, tmp_path: Path) -> None:
    """Each panel's expression, with Grafana's variables filled in, passes promtool as a recording rule."""
    [target] = panel["targets"]
    expr = target["expr"]
    selectors = re.findall(r"\b(ensemble_\w+)(\{[^}]*\})?", expr)
    assert selectors and all(labels == '{ModelName=~"$model"}' for _, labels in selectors), (
        "every series filtered by $model"
    )
    assert "$__rate_interval" in expr
    filled = expr.replace("$__rate_interval", "1m").replace("$model", ".+")
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": "dashboard:panel", "expr": filled}]}]}
    (tmp_path / "panel.yml").write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [str(PROMTOOL), "check", "rules", "panel.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout.splitlines()) == (
        0,
        ["Checking panel.yml", "  SUCCESS: 1 rules found", ""],
    ), result.stderr


def test_report_draws_the_dashboards_panels() -> None:
    panels = report.dashboard_panels()
    assert [p.title for p in panels] == list(report.REPORT_PANELS)
    assert report.promql(panels[1], model="shapes", rate_window_s=60) == (
        'sum by (ModelName) (rate(ensemble_disagreements_total{ModelName=~"shapes"}[60s]))\n'
        '/ sum by (ModelName) (rate(ensemble_images_total{ModelName=~"shapes"}[60s]))'
    )
    assert (
        report.legend("{{ModelName}} {{Member}}", {"ModelName": "shapes", "Member": "strided", "Level": "Model"})
        == "shapes strided"
    )
    assert [report.steps(minutes) for minutes in (5, 30, 120)] == [(5, 60), (8, 60), (30, 120)]


# --- a real Prometheus ----------------------------------------------------------------------------------


def test_write_test_config(tmp_path: Path) -> None:
    path = write_test_config(tmp_path / "prometheus.yml", target="127.0.0.1:18182")
    assert yaml.safe_load(path.read_text()) == {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": "torchserve", "metrics_path": "/metrics", "static_configs": [{"targets": ["127.0.0.1:18182"]}]}
        ],
    }


@pytest.mark.parametrize(
    "listen", ["0.0.0.0:9091", "[::]:9091", "localhost:9091"], ids=["any-ipv4", "any-ipv6", "name"]
)
def test_refuses_a_listener_off_loopback(listen: str, tmp_path: Path) -> None:
    with pytest.raises(PrometheusError, match=re.escape(f"refusing to listen on {listen}")):
        prometheus_ctl.start(tmp_path / "prometheus.yml", tmp_path / "data", listen)
    assert not (tmp_path / "data").exists()


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """A real Prometheus on a free loopback port, scraping itself every second with the shipped rules loaded."""
    folder = tmp_path_factory.mktemp("prometheus")
    listen = f"127.0.0.1:{free_port()}"
    config = write_test_config(folder / "prometheus.yml", target=listen, job="prometheus")
    instance = prometheus_ctl.start(config, folder / "data", listen, timeout_s=WAIT_S)
    try:
        yield instance
    finally:
        assert prometheus_ctl.stop(instance) == 0


def test_prometheus_scrapes_itself_on_loopback(prometheus: Prometheus) -> None:
    # Prometheus hands new targets to its scrapers at most every 5 s: the first scrape comes about 5 s after ready.
    up = wait_for(lambda: query(prometheus.url, 'up{job="prometheus"} == 1'), "up == 1", WAIT_S)
    assert [(s["metric"]["instance"], s["value"][1]) for s in up] == [(prometheus.url.removeprefix("http://"), "1")]
    assert prometheus.url.startswith("http://127.0.0.1:")
    assert query(prometheus.url, "1 + 1")[0]["value"][1] == "2"


def test_prometheus_loads_and_evaluates_the_shipped_rules(prometheus: Prometheus) -> None:
    def evaluated() -> list[tuple[str, str]]:
        groups = requests.get(f"{prometheus.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = [(rule["name"], rule["health"]) for group in groups for rule in group["rules"]]
        return rules if rules and all(health != "unknown" for _, health in rules) else []

    assert wait_for(evaluated, "the rules' first evaluation", WAIT_S) == [
        (name, "ok") for name in RECORDED + ALERT_NAMES
    ]
    assert (
        query(prometheus.url, "ALERTS") == []
    )  # No ensemble counters here, and the self-scrape job is not torchserve.


def test_query_reports_prometheus_errors(prometheus: Prometheus) -> None:
    with pytest.raises(PrometheusError) as refused:
        query(prometheus.url, "rate(up)")
    assert str(refused.value) == (
        "query 'rate(up)': bad_data: invalid parameter \"query\": 1:6: parse error: "
        'expected type range vector in call to function "rate", got instant vector'
    )


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("POST", "/api/v1/admin/tsdb/snapshot", 500), ("POST", "/-/quit", 403), ("POST", "/-/reload", 403)],
    ids=["admin-api", "lifecycle-quit", "lifecycle-reload"],
)
def test_admin_and_lifecycle_apis_stay_off(prometheus: Prometheus, method: str, path: str, status: int) -> None:
    response = requests.request(method, f"{prometheus.url}{path}", timeout=10)
    assert response.status_code == status
    assert ("admin APIs disabled" if "admin" in path else "Lifecycle API is not enabled") in response.text


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [("http://evil.example", None), ("null", None), ("own", "own")],
    ids=["other-site", "null", "own-ui"],
)
def test_cors_allows_only_prometheus_own_origin(prometheus: Prometheus, origin: str, allowed: str | None) -> None:
    """Prometheus's default (any origin) would let any web page open on this machine read the API."""
    origin = prometheus.url if origin == "own" else origin
    response = requests.get(
        f"{prometheus.url}/api/v1/query", params={"query": "up"}, headers={"Origin": origin}, timeout=10
    )
    assert response.headers.get("Access-Control-Allow-Origin") == (prometheus.url if allowed else None)


def test_report_plots_real_series(prometheus: Prometheus, tmp_path: Path) -> None:
    """The report's fetch and draw on series Prometheus really scraped (its own); an empty panel says so."""
    # Three scrapes a second apart, so that every rate below has at least two samples.
    wait_for(lambda: query(prometheus.url, 'count_over_time(up{job="prometheus"}[1m]) >= 3'), "three scrapes", WAIT_S)
    panels = [
        report.Panel("Scrapes' samples", 'sum by (job) (scrape_samples_scraped{job=~"$model"})', "short", "{{job}}"),
        report.Panel(
            "HTTP requests/s",
            'sum by (handler) (rate(prometheus_http_requests_total{job=~"$model"}[$__rate_interval]))',
            "reqps",
            "{{handler}}",
        ),
        report.Panel("Nothing", 'ensemble_images_total{ModelName=~"$model"}', "short", "{{ModelName}}"),
    ]
    results = report.fetch(prometheus.url, panels, minutes=1, model="prometheus")
    assert [len(results[p.title]) > 0 for p in panels] == [True, True, False]
    [samples] = results["Scrapes' samples"]
    assert samples.name == "prometheus" and all(value > 0 for value in samples.values if value == value)
    out = tmp_path / "report.png"
    report.draw(panels, results, out, heading="test")
    with Image.open(out) as picture:
        assert (picture.format, picture.size) == ("PNG", (1430, 792))


def test_report_without_ensemble_series_draws_nothing(
    prometheus: Prometheus, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report.png"
    assert report.main(["--url", prometheus.url, "--minutes", "5", "--out", str(out)]) == 1
    assert not out.exists()
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(
        f"no ensemble series in Prometheus at {prometheus.url} over the last 5 minutes (ModelName=~'.+'), so no "
        "picture was drawn."
    )


def test_report_without_prometheus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert report.main(["--url", url, "--out", str(tmp_path / "report.png")]) == 2
    assert (
        capsys.readouterr().err
        == f"no Prometheus answers at {url}: start it with `make monitor` (and TorchServe with `make serve`)\n"
    )


def test_command_line_start_status_stop(tmp_path: Path) -> None:
    """`make monitor` / `make monitor-stop`: a detached Prometheus, its pid file, and a stop that ends it."""
    listen = f"127.0.0.1:{free_port()}"
    config = write_test_config(tmp_path / "prometheus.yml", target=listen, job="torchserve", rules=())
    data = tmp_path / "data"
    cli = [sys.executable, "-m", "monitoring.prometheus_ctl"]
    options = ["--config", str(config), "--data", str(data), "--listen", listen]

    def run(action: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cli, action, *options], cwd=ROOT, capture_output=True, text=True, timeout=90, check=False
        )

    try:
        started = run("start")
        assert started.returncode == 0, started.stderr
        lines = started.stdout.splitlines()
        pid = int((data / "prometheus.pid").read_text())
        assert (
            lines[0]
            == f"Prometheus is up at http://{listen} (pid {pid}, data and log in {data}); graphs at http://{listen}/classic/graph"
        )
        assert lines[1] == f"  scraping {listen}/metrics: up"  # It scrapes itself here, as job torchserve.
        assert run("status").stdout == f"Prometheus running (pid {pid}) at http://{listen}\n"
        again = run("start")
        assert (again.returncode, again.stderr) == (
            1,
            f"a Prometheus already runs on {data}: `make monitor-stop` first\n",
        )
    finally:
        stopped = run("stop")
    assert stopped.stdout == "Prometheus stopped\n"
    assert not (data / "prometheus.pid").exists()
    status = run("status")
    assert (status.returncode, status.stdout) == (1, "no Prometheus running\n")
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://{listen}/-/ready", timeout=5)
