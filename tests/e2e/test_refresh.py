"""Tokens are refreshed before Azure's refreshAfter, and kept serving while refresh fails."""

from __future__ import annotations

import time

import pytest

from broker.emulator import Emulator
from broker.emulator import seed as demo
from broker.models import State
from tests.e2e.conftest import StartBroker

pytestmark = pytest.mark.timeout(30)

ONLY_FRAUD = {"fraud": demo.TOKEN_SERVICE}


def short_lived(emulator: Emulator, lifetime_s: float = 4.0) -> None:
    emulator.state.set_token_lifetime(lifetime_s, refresh_after_s=lifetime_s / 2)


async def test_token_refreshed_before_refresh_after(
    start_broker: StartBroker, emulator: Emulator
) -> None:
    """With a 4 s token whose refreshAfter is at 2 s, the broker renews it before those 2 s."""
    short_lived(emulator)
    broker = await start_broker(services=ONLY_FRAUD)
    client = broker.client()
    first = (await client.get("/v1/token/fraud")).json()
    store = broker.daemon.store
    refresh_by = store.refresh_by(store.entry("fraud"))  # unrounded, unlike the JSON's
    assert refresh_by is not None
    entry = await broker.next_result("fraud")
    second = (await client.get("/v1/token/fraud")).json()
    assert entry.last_error is None
    assert second["access_token"] != first["access_token"]
    # The broker's decision is what it controls: it started the refresh ahead of
    # refreshAfter, by a margin that scales with the token's life (Azure's latency is not
    # part of the promise).
    assert entry.last_attempt_at is not None and entry.last_attempt_at < refresh_by
    assert second["refresh_by"] > first["refresh_by"]
    assert emulator.state.count("mms.token", service=demo.TOKEN_SERVICE) == 2


async def test_stale_token_served_while_azure_fails_then_503_at_expiry(
    start_broker: StartBroker, emulator: Emulator
) -> None:
    """While token calls fail, the valid token is served as `stale`; once expired, 503."""
    short_lived(emulator)
    broker = await start_broker(services=ONLY_FRAUD)
    client = broker.client()
    first = (await client.get("/v1/token/fraud")).json()
    emulator.state.fail("mms.token", status=500)
    entry = await broker.next_result("fraud")
    assert entry.last_error is not None and entry.last_error.status == 500
    served = await client.get("/v1/token/fraud")
    assert served.status == 200
    assert served.json()["access_token"] == first["access_token"]
    detail = (await client.get("/v1/services/fraud")).json()
    assert detail["state"] == State.STALE.value
    assert "HTTP 500" in detail["last_error"]["message"]
    assert detail["next_attempt"] is not None

    broker.clock.advance(first["expires_on"] - time.time())
    expired = await client.get("/v1/token/fraud")
    assert expired.status == 503
    assert expired.json()["error"] == "not_ready"
    assert "HTTP 500" in expired.json()["message"]
    assert int(expired.headers["Retry-After"]) >= 1
    assert (await client.get("/v1/services/fraud")).json()["state"] == State.EXPIRED.value
    assert (await client.get("/readyz")).status == 503


async def test_recovers_when_azure_returns(start_broker: StartBroker, emulator: Emulator) -> None:
    """After failures, the next retry that succeeds makes the service fresh again."""
    emulator.state.fail("mms.token", status=503, times=2)
    broker = await start_broker(
        services=ONLY_FRAUD, refresh="retry_min_s = 0.05\nretry_max_s = 0.2"
    )
    for _ in range(3):
        entry = await broker.next_result("fraud")
        if entry.last_error is None:
            break
    detail = (await broker.client().get("/v1/services/fraud")).json()
    assert detail["state"] == "fresh" and detail["failures"] == 0
    assert emulator.state.count("mms.token", service=demo.TOKEN_SERVICE) == 3


async def test_keys_are_relisted_on_interval(start_broker: StartBroker, emulator: Emulator) -> None:
    """Keys are listed again after `key_interval_s`, picking up a rotation done elsewhere."""
    broker = await start_broker(
        services={"churn": demo.KEY_SERVICE}, refresh="key_interval_s = 0.5"
    )
    first = (await broker.client().get("/v1/token/churn")).json()
    assert first["refresh_by"] - time.time() <= 1
    await broker.next_result("churn")
    assert emulator.state.count("mms.listkeys", service=demo.KEY_SERVICE) == 2
