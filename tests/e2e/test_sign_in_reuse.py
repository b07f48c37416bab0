"""An identity asks Entra ID for a new token exactly when MSAL would: never while its token
has more than five minutes left, every time once it has less."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.emulator import Emulator
from tests.conftest import config_text
from tests.e2e.conftest import StartBroker

pytestmark = pytest.mark.timeout(30)


async def test_a_long_lived_token_is_reused(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path
) -> None:
    """Fetches after the first reuse the identity's hour-long Entra token, not a new one."""
    broker = await start_broker(config_text(emulator, short_dir))
    await broker.settled()
    credential = broker.daemon.credentials["main"]
    scope = broker.daemon.config.cloud.arm_scope
    first = await credential.get_token(scope)
    asked = emulator.state.count("entra.token")
    for _ in range(3):
        assert (await credential.get_token(scope)).value == first.value
    await broker.daemon.store.fetch("fraud")
    assert emulator.state.count("entra.token") == asked


async def test_a_token_near_expiry_is_asked_for_again(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path
) -> None:
    """A token with less than five minutes to live is never reused: Entra ID is asked again."""
    emulator.state.entra_token_lifetime_s = 120.0
    broker = await start_broker(config_text(emulator, short_dir))
    await broker.settled()
    credential = broker.daemon.credentials["main"]
    scope = broker.daemon.config.cloud.arm_scope
    asked = emulator.state.count("entra.token")
    await credential.get_token(scope)
    await credential.get_token(scope)
    assert emulator.state.count("entra.token") == asked + 2
