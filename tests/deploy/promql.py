"""What a PromQL expression names, checked against what the broker exports.

Prometheus parses our queries (through `promtool`); this module only reads the metric
names, label matchers and grouping labels out of them, which no Prometheus tool prints,
so the tests can hold every alert and panel to the pinned metrics schema.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field

import pytest

from broker.metrics import REASONS
from broker.models import State
from tests.e2e.test_metrics_scrape import FLEET_SCHEMA, SAMPLE_SUFFIXES, SCHEMA

# Labels Prometheus adds to every series it scrapes, whatever the target exports.
TARGET_LABELS = frozenset({"job", "instance"})
# The series Prometheus writes itself for each scrape.
SCRAPE_SERIES: dict[str, frozenset[str]] = {"up": frozenset()}
# Labels whose values are the broker's own names: a query asking for another is a typo.
DOMAINS: dict[str, frozenset[str]] = {
    "state": frozenset(state.value for state in State),
    "reason": REASONS,
    "outcome": frozenset({"success", "failure", "taken", "busy", "lost"}),
    "origin": frozenset({"azure", "fleet"}),
}
_GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_OPERATORS = frozenset({"and", "or", "unless", "bool", "offset", "atan2"})
_TOKEN = re.compile(
    r"""
    (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    |(?P<range>\[[^\]]*\])
    |(?P<number>\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)
    |(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    |(?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=(){},])
    |(?P<space>\s+)
    """,
    re.VERBOSE,
)


def exported() -> dict[str, frozenset[str]]:
    """Every sample name the broker's /metrics has, with its label names (the pinned schema,
    fleet mode's series included)."""
    names: dict[str, frozenset[str]] = {}
    for family, (kind, labels) in (SCHEMA | FLEET_SCHEMA).items():
        for suffix in SAMPLE_SUFFIXES[kind]:
            names[family + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return names


@dataclass
class Selector:
    """One vector selector: its metric name and its label matchers (name, operator, value)."""

    metric: str | None
    matchers: list[tuple[str, str, str]] = field(default_factory=list)


@dataclass
class Names:
    """What one expression names."""

    selectors: list[Selector]
    grouping: set[str]


def _tokens(expr: str) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    at = 0
    while at < len(expr):
        match = _TOKEN.match(expr, at)
        if match is None:
            raise ValueError(f"cannot read {expr[at:]!r} in {expr!r}")
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            found.append((kind, match.group()))
        at = match.end()
    return found


def names(expr: str) -> Names:
    """The selectors and grouping labels of `expr` (a valid PromQL expression)."""
    tokens = _tokens(expr)
    selectors: list[Selector] = []
    grouping: set[str] = set()
    at = 0
    while at < len(tokens):
        kind, text = tokens[at]
        following = tokens[at + 1][1] if at + 1 < len(tokens) else ""
        if kind == "ident" and text in _GROUPING and following == "(":
            end = _closing(tokens, at + 1)
            grouping |= {t for k, t in tokens[at + 2 : end] if k == "ident"}
            at = end + 1
        elif kind == "ident" and (following == "(" or following in _GROUPING or text in _OPERATORS):
            at += 1
        elif kind == "ident":
            selector = Selector(text)
            selectors.append(selector)
            at = _matchers(tokens, at + 1, selector)
        elif text == "{":
            selector = Selector(None)
            selectors.append(selector)
            at = _matchers(tokens, at, selector)
        else:
            at += 1
    return Names(selectors, grouping)


def _closing(tokens: list[tuple[str, str]], opening: int) -> int:
    return next(i for i in range(opening, len(tokens)) if tokens[i][1] == ")")


def _matchers(tokens: list[tuple[str, str]], at: int, selector: Selector) -> int:
    """Read `{name op "value", …}` at `at` into `selector`; the index after it."""
    if at >= len(tokens) or tokens[at][1] != "{":
        return at
    at += 1
    while tokens[at][1] != "}":
        if tokens[at][1] == ",":
            at += 1
            continue
        (_, label), (_, op), (_, quoted) = tokens[at : at + 3]
        selector.matchers.append((label, op, quoted[1:-1]))
        at += 3
    return at + 1


def problems(expr: str, *, extra_labels: frozenset[str] = frozenset()) -> list[str]:
    """What in `expr` the broker does not export: unknown metrics, labels, or label values
    outside the broker's own names; empty when the expression only asks for what exists."""
    known = {**exported(), **SCRAPE_SERIES}
    found = names(expr)
    wrong: list[str] = []
    labels_in_query: set[str] = set(TARGET_LABELS | extra_labels)
    for selector in found.selectors:
        if selector.metric not in known:
            wrong.append(f"metric {selector.metric!r} is not exported")
            continue
        allowed = known[selector.metric] | TARGET_LABELS | extra_labels
        labels_in_query |= allowed
        for label, op, value in selector.matchers:
            if label not in allowed:
                wrong.append(f"{selector.metric} has no label {label!r}")
            elif label in DOMAINS and op in ("=", "=~"):
                alternatives = set(value.split("|")) if op == "=~" else {value}
                wrong += [
                    f"{selector.metric}{{{label}}} is never {each!r}"
                    for each in sorted(alternatives - DOMAINS[label])
                ]
    wrong += [f"no metric in the query has label {g!r}" for g in found.grouping - labels_in_query]
    return wrong


def promtool() -> str:
    """The path of promtool; fails the test, with the fix, when it is missing."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed: these tests check the Prometheus rules and the Grafana "
            "dashboard with it. `make tools` installs it (Debian: apt-get install prometheus).",
            pytrace=False,
        )
    return path
