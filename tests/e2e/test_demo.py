"""`token-broker demo` (what `make demo` runs) passes every step and leaves nothing behind."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest

from broker.demo import run_demo

pytestmark = pytest.mark.timeout(60)


def test_demo_passes_and_cleans_up(capsys: pytest.CaptureFixture[str]) -> None:
    """The demo fetches over both listeners, scores, sees a refresh, and removes its files."""
    before = set(Path(tempfile.gettempdir()).glob("token-broker-demo-*"))
    assert asyncio.run(run_demo(lifetime_s=4.0))
    out = capsys.readouterr().out
    for step in (
        "token over the Unix socket",
        "same=True",
        "HTTP 200",
        "new=True",
        "before refresh_by=True",
    ):
        assert step in out
    assert "every step passed" in out
    assert set(Path(tempfile.gettempdir()).glob("token-broker-demo-*")) == before
