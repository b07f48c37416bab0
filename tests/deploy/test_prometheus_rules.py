"""The Prometheus alert rules: promtool accepts them, their unit tests pass at the production
durations, and every expression names only what the broker exports."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.promql import TARGET_LABELS, exported, names, problems, promtool

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parents[2]
RULES_DIR = REPO / "deploy" / "prometheus"
RULES = RULES_DIR / "token-broker.rules.yml"
RULE_TESTS = RULES_DIR / "token-broker.rules.test.yml"
SEVERITIES = {"critical", "warning"}
TEMPLATE_LABEL = re.compile(r"\$labels\.([A-Za-z_][A-Za-z0-9_]*)")


def alerts(path: Path = RULES) -> list[dict[str, Any]]:
    loaded = yaml.safe_load(path.read_text())
    return [rule for group in loaded["groups"] for rule in group["rules"] if "alert" in rule]


def run(*args: str, cwd: Path = RULES_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=20, check=False
    )


def test_promtool_accepts_the_rules() -> None:
    """`promtool check rules` parses every expression and template of the rules file."""
    result = run("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_rules_pass_their_unit_tests() -> None:
    """`promtool test rules` passes: each alert fires after its production `for:`, not before."""
    result = run("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_firing_and_silent() -> None:
    """Each alert has a promtool case where it fires and one where it does not yet."""
    cases = [
        case
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    ]
    for rule in alerts():
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in mine), f"{rule['alert']} never fires"
        assert any(not case["exp_alerts"] for case in mine), f"{rule['alert']} always fires"


def test_a_changed_duration_fails_the_unit_tests(tmp_path: Path) -> None:
    """The unit tests pin the thresholds: halving TokenBrokerDown's `for:` breaks them."""
    text = RULES.read_text()
    down = text.index("alert: TokenBrokerDown")
    changed = text[:down] + text[down:].replace("for: 5m", "for: 2m", 1)
    (tmp_path / RULES.name).write_text(changed)
    (tmp_path / RULE_TESTS.name).write_text(RULE_TESTS.read_text())
    result = run("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert result.returncode != 0
    assert "TokenBrokerDown" in result.stdout + result.stderr


@pytest.mark.parametrize("rule", alerts(), ids=lambda rule: rule["alert"])
def test_alert_names_only_what_the_broker_exports(rule: dict[str, Any]) -> None:
    """The expression's metrics, labels and label values are in the pinned metrics schema."""
    assert problems(rule["expr"]) == []


@pytest.mark.parametrize("rule", alerts(), ids=lambda rule: rule["alert"])
def test_alert_says_how_bad_and_what_to_do(rule: dict[str, Any]) -> None:
    """A severity, a summary and a description whose `$labels` the series carry."""
    assert rule["labels"]["severity"] in SEVERITIES
    assert {"summary", "description"} <= set(rule["annotations"])
    known = exported() | {"up": frozenset()}
    carried = set(TARGET_LABELS)
    for selector in names(rule["expr"]).selectors:
        carried |= known[str(selector.metric)]
    for text in rule["annotations"].values():
        assert set(TEMPLATE_LABEL.findall(text)) <= carried, text


def test_the_fleet_alert_watches_redis_being_out_of_reach() -> None:
    """The fleet's alert fires on the broker's own view of Redis, the series only fleet mode
    exports."""
    [fleet] = [rule for rule in alerts() if "fleet" in rule["alert"].lower()]
    assert fleet["alert"] == "TokenBrokerFleetUnavailable"
    assert names(fleet["expr"]).selectors[0].metric == "token_broker_fleet_up"


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("token_broker_service_stat == 1", "metric 'token_broker_service_stat' is not exported"),
        ('token_broker_refreshes_total{region="x"}', "has no label 'region'"),
        ('token_broker_service_state{state="expird"}', "is never 'expird'"),
        ('token_broker_refreshes_total{reason=~"sign_in|signin"}', "is never 'signin'"),
        ("sum by (route) (token_broker_refreshes_total)", "no metric in the query has label"),
        ('{__name__="token_broker_build_info"}', "metric None is not exported"),
    ],
)
def test_the_schema_check_is_not_vacuous(expr: str, problem: str) -> None:
    """A misspelt metric, label or state, or a grouping by a missing label, is reported."""
    found = problems(expr)
    assert any(problem in each for each in found), found
