"""The Grafana dashboard: every query parses in Prometheus, names only what the broker exports,
and together the panels show every metric the broker has."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.promql import TARGET_LABELS, exported, names, problems, promtool
from tests.e2e.test_metrics_scrape import FLEET_SCHEMA, SCHEMA

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "token-broker.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# What Grafana puts in place of its variables before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$job": ".+", "$instance": ".+", "$service": ".+"}
LABEL_VALUES = re.compile(r"label_values\((?P<selector>.+),\s*(?P<label>[A-Za-z_][A-Za-z0-9_]*)\)")
LEGEND_LABEL = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> list[dict[str, Any]]:
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


def targets() -> list[tuple[str, dict[str, Any]]]:
    """(panel title, target) of every query on the dashboard."""
    return [(panel["title"], target) for panel in panels() for target in panel["targets"]]


def expanded(expr: str) -> str:
    """The query as Prometheus receives it, Grafana's variables filled in."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a variable this test does not know: {expr}"
    return expr


def variables() -> dict[str, dict[str, Any]]:
    return {var["name"]: var for var in dashboard()["templating"]["list"]}


def check_parses(exprs: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`promtool check rules` on one recording rule per expression: Prometheus's own parser."""
    rules = [{"record": f"dashboard:query_{i}", "expr": expr} for i, expr in enumerate(exprs)]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    return subprocess.run(
        [promtool(), "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


def test_every_query_parses_in_prometheus(tmp_path: Path) -> None:
    """Prometheus's parser accepts every panel query, variables filled in as Grafana does."""
    exprs = [expanded(target["expr"]) for _, target in targets()]
    result = check_parses(exprs, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


def test_the_parse_check_is_not_vacuous(tmp_path: Path) -> None:
    """A query with a missing bracket is refused by the same check."""
    result = check_parses(["sum by (service) (rate(token_broker_refreshes_total[1m])"], tmp_path)
    assert result.returncode != 0


@pytest.mark.parametrize(
    ("title", "target"), targets(), ids=[f"{t}:{q['refId']}" for t, q in targets()]
)
def test_query_names_only_what_the_broker_exports(title: str, target: dict[str, Any]) -> None:
    """Each query's metrics, labels and label values, and its legend's labels, exist."""
    expr = expanded(target["expr"])
    assert problems(expr) == [], title
    known = exported() | {"up": frozenset()}
    carried = set(TARGET_LABELS)
    for selector in names(expr).selectors:
        carried |= known[str(selector.metric)]
    assert set(LEGEND_LABEL.findall(target.get("legendFormat", ""))) <= carried, title


def test_variables_list_only_exported_labels(tmp_path: Path) -> None:
    """The job, instance and service pickers read label values the broker's series carry."""
    queried = {name: var for name, var in variables().items() if var["type"] == "query"}
    assert set(queried) == {"job", "instance", "service"}
    selectors = []
    for name, var in queried.items():
        found = LABEL_VALUES.fullmatch(var["query"]["query"])
        assert found is not None, name
        assert found["label"] == name
        selector = expanded(found["selector"])
        assert problems(selector) == [], name
        [metric] = names(selector).selectors
        assert name in exported()[str(metric.metric)] | TARGET_LABELS
        selectors.append(selector)
    assert check_parses(selectors, tmp_path).returncode == 0


def test_every_exported_metric_is_on_the_dashboard() -> None:
    """Service states, expiry, refresh age, outcomes, skew, Azure latency, local and proxied
    requests, versions and the fleet: no metric of the pinned schema is left off."""
    shown = {
        str(selector.metric)
        for _, target in targets()
        for selector in names(expanded(target["expr"])).selectors
    }
    schema = SCHEMA | FLEET_SCHEMA
    families = {
        max((f for f in schema if metric.startswith(f)), key=len, default=metric)
        for metric in shown - {"up"}
    }
    assert families == set(schema)
    assert "up" in shown


def test_panels_use_the_datasource_variable_and_do_not_overlap() -> None:
    """Every panel and query reads the dashboard's Prometheus variable; ids are unique and
    no two panels share a grid cell."""
    board = dashboard()
    assert board["uid"] == "token-broker"
    assert variables()["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        grid = panel["gridPos"]
        mine = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine
    for panel in panels():
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert all(target["datasource"] == DATASOURCE for target in panel["targets"])
