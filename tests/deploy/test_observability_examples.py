"""The compose example's Prometheus and Grafana files: prometheus.yml passes `promtool check config`, the
provisioned datasources are the ones the dashboard refers to, the dashboard is well-formed Grafana JSON, its
PromQL parses (`promtool check rules`), and every metric it queries is one a real sidecar exposes after real
traffic (the same scrape as tests/sidecar/test_telemetry.py), so renaming a metric breaks this test.

promtool comes from Debian's `prometheus` package (apt-get install --no-install-recommends prometheus)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from circuitwatch.sidecar.telemetry import METRICS

from support.metrics_scrape import Scrape, scrape_sidecar_after_traffic

COMPOSE = Path(__file__).resolve().parents[2] / "examples" / "compose"
PROMETHEUS_YML = COMPOSE / "prometheus" / "prometheus.yml"
DATASOURCES = COMPOSE / "grafana" / "provisioning" / "datasources"
PROVIDERS = COMPOSE / "grafana" / "provisioning" / "dashboards"
DASHBOARD = COMPOSE / "grafana" / "dashboards" / "circuitwatch.json"
METRIC_NAME = re.compile(r"\bcircuitwatch_[a-zA-Z0-9_]+")
# Grafana's variables, as PromQL that promtool can parse
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$job": "circuitwatch-sidecar"}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: apt-get install -y --no-install-recommends prometheus (Debian)")
    return path


@pytest.fixture(scope="module")
def scrape(tmp_path_factory: pytest.TempPathFactory) -> Scrape:
    return scrape_sidecar_after_traffic(tmp_path_factory.mktemp("scrape"), seed=1)


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def provisioned_datasources() -> dict[str, dict]:
    out = {}
    for path in sorted(DATASOURCES.glob("*.y*ml")):
        for source in yaml.safe_load(path.read_text())["datasources"]:
            assert source["uid"] not in out, f"{path}: uid {source['uid']} twice"
            out[source["uid"]] = source
    return out


def promql(dashboard: dict) -> list[str]:
    """Every PromQL expression in the dashboard: Prometheus targets and Prometheus template variables."""
    prometheus = {uid for uid, s in provisioned_datasources().items() if s["type"] == "prometheus"}
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            if (target.get("datasource") or panel["datasource"])["uid"] in prometheus:
                out.append(target["expr"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query" and variable["datasource"]["uid"] in prometheus:
            query = variable["query"]
            out.append(query["query"] if isinstance(query, dict) else query)
    return out


def test_prometheus_config_passes_promtool() -> None:
    result = subprocess.run(
        [promtool(), "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    targets = {
        job["job_name"]: [t for c in job["static_configs"] for t in c["targets"]] for job in config["scrape_configs"]
    }
    # the compose services: the sidecar's scrape endpoint and the collector's Prometheus exporter
    assert targets == {"circuitwatch-sidecar": ["sidecar:9464"], "otel-collector": ["otel-collector:8889"]}


def test_grafana_provisioning() -> None:
    sources = provisioned_datasources()
    by_type = {s["type"]: s for s in sources.values()}
    assert by_type["prometheus"]["url"] == "http://prometheus:9090"
    assert by_type["jaeger"]["url"] == "http://jaeger:16686"
    assert sum(bool(s.get("isDefault")) for s in sources.values()) == 1
    providers = [p for path in sorted(PROVIDERS.glob("*.y*ml")) for p in yaml.safe_load(path.read_text())["providers"]]
    assert [p["type"] for p in providers] == ["file"]
    assert providers[0]["options"]["path"] == "/var/lib/grafana/dashboards"  # where compose mounts grafana/dashboards


def test_dashboard_is_grafana_dashboard_json(dashboard: dict) -> None:
    sources = provisioned_datasources()
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and dashboard["title"]
    assert "id" not in dashboard or dashboard["id"] is None  # provisioned dashboards get their id from Grafana
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids), ids
    cells = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("h", "w", "x", "y")), panel["title"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        cell = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & cell, f"panel {panel['title']!r} overlaps another"
        cells |= cell
        assert panel["type"] and panel["title"]
        refs = [panel["datasource"]] + [t["datasource"] for t in panel["targets"] if "datasource" in t]
        for ref in refs:
            assert ref["uid"] in sources, (panel["title"], ref)
            assert ref["type"] == sources[ref["uid"]]["type"], (panel["title"], ref)
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert panel["targets"] and len(ref_ids) == len(set(ref_ids)), panel["title"]
    for variable in dashboard["templating"]["list"]:
        if "datasource" in variable:
            assert variable["datasource"]["uid"] in sources, variable["name"]
    # every variable a query uses is defined (or is one of Grafana's own)
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    for expr in promql(dashboard):
        for name in re.findall(r"\$(\w+)", expr):
            assert name in defined or name.startswith("__"), (name, expr)


def test_dashboard_promql_parses(dashboard: dict, tmp_path: Path) -> None:
    rules = []
    for i, expr in enumerate(promql(dashboard)):
        # Grafana's label_values(selector, label) for variables: the selector is the PromQL
        expr = re.sub(r"^label_values\((.+),\s*\w+\)$", r"\1", expr.strip())
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:expr_{i}", "expr": expr})
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool(), "check", "rules", str(tmp_path / "rules.yml")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_metrics_exist_on_a_real_sidecar(dashboard: dict, scrape: Scrape) -> None:
    exposed = {sample.name for sample in scrape.samples}
    referenced = {name for expr in promql(dashboard) for name in METRIC_NAME.findall(expr)}
    assert referenced, "the dashboard queries no circuitwatch metric"
    # without the [fleet] extra in this venv the sidecar has no fleet metrics: the fleet panels' names are checked
    # against METRICS below, and tests/sidecar/test_telemetry.py scrapes them from a sidecar that exports
    scraped = referenced if scrape.fleet else {n for n in referenced if not n.startswith("circuitwatch_fleet_")}
    missing = sorted(scraped - exposed)
    assert not missing, f"the dashboard queries metrics the sidecar does not expose: {missing}"
    # and it shows every metric the sidecar documents
    families = {m.prometheus for m in METRICS}
    shown = {f for f in families if any(name == f or name.startswith(f + "_") for name in referenced)}
    assert shown == families, sorted(families - shown)
