"""Logs never flood: a repeating warning is written once per interval, with a count."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import pytest

from broker import log
from tests.unit.fakes import FakeClock

pytestmark = pytest.mark.timeout(5)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_repeating_warning_is_written_once_per_interval(
    logs: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same event, service and reason 500 times in a second: one line; the first after
    the interval says how many were left out. Other services and reasons are not held back."""
    clock = FakeClock()
    monkeypatch.setattr(log.REPEATS, "_clock", clock)
    logger = log.get_logger("test")
    for _ in range(500):
        logger.warning("token.refresh_failed", service="a", reason="UnavailableError")
    logger.warning("token.refresh_failed", service="b", reason="UnavailableError")
    logger.warning("token.refresh_failed", service="a", reason="ThrottledError")
    clock.now += log.REPEATS.interval_s
    logger.warning("token.refresh_failed", service="a", reason="UnavailableError")
    written = [(e["service"], e["reason"], e.get("repeats_suppressed")) for e in lines(logs)]
    assert written == [
        ("a", "UnavailableError", None),
        ("b", "UnavailableError", None),
        ("a", "ThrottledError", None),
        ("a", "UnavailableError", 499),
    ]


def test_info_lines_are_not_limited(logs: io.StringIO) -> None:
    """Routine info lines (one per refresh, bounded by the call budget) are all written."""
    logger = log.get_logger("test")
    for _ in range(5):
        logger.info("token.refreshed", service="a")
    assert len(lines(logs)) == 5


def test_a_library_warning_repeating_is_limited_too(logs: io.StringIO) -> None:
    """aiohttp's or MSAL's records go through the standard library: they are held back the
    same way."""
    for name in ("aiohttp.server", "msal.application"):
        library = logging.getLogger(name)
        for _ in range(100):
            library.error("Error in the handler")
    written = [line["component"] for line in lines(logs) if "component" in line]
    assert written.count("aiohttp.server") == 1
    assert sum("Error in the handler" in line for line in logs.getvalue().splitlines()) == 1
