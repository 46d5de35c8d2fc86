"""config/: the Prometheus config, the alert rules and their unit tests pass promtool; the Grafana
dashboard is well-formed and shows what docs/operations.md §4.2 lists (its PromQL is run by a real
Prometheus in test_cluster_observability)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from tests.observability.prometheus import CONFIG_DIR
from tests.observability.promtext import promtool
from tests.services import service_missing


def run_promtool(*args: str) -> str:
    result = subprocess.run(
        [promtool(), *args], cwd=CONFIG_DIR, capture_output=True, timeout=60, check=False
    )
    output = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, output
    return output


def test_prometheus_config_is_valid() -> None:
    assert "SUCCESS" in run_promtool("check", "config", "prometheus.yml")


def test_alert_rules_are_valid_and_cover_spec() -> None:
    output = run_promtool("check", "rules", "alerts.yml")
    assert "SUCCESS: 8 rules found" in output  # 7 alerts, 1 recording rule


def test_every_alert_rule_has_a_passing_unit_test() -> None:
    rules = (CONFIG_DIR / "alerts.yml").read_text()
    tests = (CONFIG_DIR / "alerts_test.yml").read_text()
    names = [line.split(":", 1)[1].strip() for line in rules.splitlines() if "- alert:" in line]
    assert len(names) == 7
    for name in names:
        assert f"alertname: {name}" in tests, f"{name} has no unit test"
    assert "SUCCESS" in run_promtool("test", "rules", "alerts_test.yml")


def amtool(*args: str) -> str:
    found = shutil.which("amtool")
    if found is None:
        service_missing("amtool", "not installed (apt-get install prometheus-alertmanager)")
    assert found is not None
    result = subprocess.run(
        [found, *args], cwd=CONFIG_DIR, capture_output=True, timeout=60, check=False
    )
    output = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, output
    return output


def test_alertmanager_config_is_valid() -> None:
    assert "SUCCESS" in amtool("check-config", "alertmanager.yml")


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (["alertname=ChefiaStorageDown", "severity=critical", "instance=n1"], "on-call"),
        (["alertname=ChefiaNodeDown", "severity=critical"], "on-call"),
        (["alertname=ChefiaHighLatencyP95", "severity=warning"], "operations"),
        (["alertname=ChefiaTerminalOffline", "severity=warning", "store_id=s1"], "operations"),
    ],
)
def test_alertmanager_routes_every_alert_somewhere(labels: list[str], receiver: str) -> None:
    """Each severity the rules give (config/alerts.yml) reaches the receiver meant for it."""
    routed = amtool("config", "routes", "test", "--config.file=alertmanager.yml", *labels)
    assert routed.splitlines()[0] == receiver, routed


def test_every_alert_has_a_routed_severity() -> None:
    rules = (CONFIG_DIR / "alerts.yml").read_text()
    assert set(re.findall(r"severity: (\w+)", rules)) == {"warning", "critical"}


def test_grafana_dashboard_panels() -> None:
    dashboard = json.loads((CONFIG_DIR / "grafana" / "chefia-rt.json").read_text())
    titles = {panel["title"]: panel for panel in dashboard["panels"]}
    expected = {
        "Connections": "websocket_active_connections",
        "Terminals online": "terminal_status",
        "Sync latency (receive → confirmation)": "websocket_message_duration_seconds_bucket",
        "Sync operations rate": "sync_operations_total",
        "Conflict rate": "sync_conflicts_total",
        "Commit latency": "sync_commit_duration_seconds_bucket",
        "Queue depth": "sync_write_queue_depth",
        "Where a batch's time goes": "sync_batch_stage_seconds_total",
    }
    for title, metric in expected.items():
        exprs = " ".join(t["expr"] for t in titles[title]["targets"])
        assert metric in exprs, title
    latency = [t["expr"] for t in titles["Sync latency (receive → confirmation)"]["targets"]]
    assert [e.split(",")[0] for e in latency] == [
        "histogram_quantile(0.5",
        "histogram_quantile(0.95",
        "histogram_quantile(0.99",
    ]
    # The capacity thresholds of the plan: 800 warning, 950 critical, on each node's line.
    connections = titles["Connections"]
    steps = connections["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [(step["color"], step["value"]) for step in steps] == [
        ("green", None),
        ("orange", 800),
        ("red", 950),
    ]
    assert connections["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] != "off"
    assert any("by (instance)" in t["expr"] for t in connections["targets"])
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
