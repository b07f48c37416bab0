"""A reload applies every key of `[refresh]`, the ones built into long-lived parts too."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from broker.config import load_config
from broker.emulator import Emulator
from broker.emulator import seed as demo
from broker.errors import UnavailableError
from tests.conftest import config_text
from tests.e2e.conftest import StartBroker

pytestmark = pytest.mark.timeout(30)


async def test_a_reload_applies_the_timeout_concurrency_and_budget(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path
) -> None:
    """After a reload, a slow answer is cut at the new `timeout_s`, and the store runs
    under the new `max_concurrency` and call budget."""
    services = {"fraud": demo.TOKEN_SERVICE}
    broker = await start_broker(services=services, refresh="retry_min_s = 0.05")
    await broker.settled()
    daemon = broker.daemon
    path = short_dir / "broker.toml"
    path.write_text(
        config_text(
            emulator,
            short_dir,
            services=services,
            refresh=(
                "retry_min_s = 0.05\ntimeout_s = 0.3\nmax_concurrency = 1\n"
                "service_calls_burst = 50\nservice_calls_per_minute = 600"
            ),
        )
    )
    await daemon.reload(load_config(path))
    assert daemon.store.max_concurrency == 1
    assert daemon.store.policy.config.timeout_s == 0.3
    emulator.state.fail("mms.token", kind="slow", delay_s=3.0, times=1)
    started = time.monotonic()
    with pytest.raises(UnavailableError, match="within the timeout"):
        await daemon.store.fetch("fraud")
    assert time.monotonic() - started < 2.0  # the old 30 s timeout would have waited 3 s
    await daemon.store.fetch("fraud")  # the fault is spent: the next answer is in time
    assert daemon.store.entry("fraud").last_error is None
