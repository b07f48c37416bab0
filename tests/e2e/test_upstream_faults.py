"""Each upstream fault: the retries the broker makes, the states it reports, what clients get."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from broker.emulator import Emulator, http_date
from broker.emulator import seed as demo
from broker.errors import ThrottledError
from tests.e2e.conftest import Broker, StartBroker

pytestmark = pytest.mark.timeout(30)

FAST_RETRIES = "timeout_s = 0.5\nretry_min_s = 0.05\nretry_max_s = 0.2\nmax_concurrency = 4"
ONLY_FRAUD = {"fraud": demo.TOKEN_SERVICE}

# fault on mms.token -> a phrase of the error the operator sees
FAULTS: dict[str, tuple[dict[str, Any], str]] = {
    "5xx": ({"status": 503}, "HTTP 503"),
    "500 with a body": (
        {"status": 500, "body": {"code": "InternalError", "message": "boom"}},
        "boom",
    ),
    "reset": ({"kind": "reset"}, "cannot reach"),
    "hang": ({"kind": "hang"}, "within the timeout"),
    "slow past the timeout": ({"kind": "slow", "delay_s": 2.0}, "within the timeout"),
    "malformed JSON": ({"kind": "malformed"}, "not JSON"),
    "partial JSON": ({"kind": "partial"}, "not JSON"),
    "missing fields": ({"kind": "missing_fields"}, "no accessToken"),
}


async def until_fresh(broker: Broker, service: str = "fraud", attempts: int = 10) -> None:
    """Wait through refresh results until one succeeds."""
    for _ in range(attempts):
        if broker.daemon.store.entry(service).last_error is None:
            return
        await broker.next_result(service)
    raise AssertionError(f"{service} did not recover")


@pytest.mark.parametrize("case", list(FAULTS))
async def test_fault_kind_is_retried_while_the_valid_token_is_served(
    case: str, start_broker: StartBroker, emulator: Emulator
) -> None:
    """A failing refresh keeps serving the valid token as stale, retries, then recovers."""
    fault, phrase = FAULTS[case]
    broker = await start_broker(services=ONLY_FRAUD, refresh=FAST_RETRIES)
    client = broker.client()
    first = (await client.get("/v1/token/fraud")).json()["access_token"]
    emulator.state.fail("mms.token", times=2, **fault)

    await asyncio.wait([broker.daemon.store.fetch("fraud")])
    detail = (await client.get("/v1/services/fraud")).json()
    assert detail["state"] == "stale"
    assert phrase in detail["last_error"]["message"]
    assert detail["last_error"]["retryable"] is True
    served = await client.get("/v1/token/fraud")
    assert served.status == 200 and served.json()["access_token"] == first

    await until_fresh(broker)
    assert emulator.state.count("mms.token") == 4  # first fetch, two failures, one success
    after = (await client.get("/v1/token/fraud")).json()["access_token"]
    assert after != first
    assert (await client.get("/v1/services/fraud")).json()["state"] == "fresh"


@pytest.mark.parametrize("form", ["seconds", "http-date"])
async def test_429_retry_after_is_honoured_and_holds_back_the_subscription(
    form: str, start_broker: StartBroker, emulator: Emulator
) -> None:
    """A 429's Retry-After delays the retry and holds back the principal's other services."""
    broker = await start_broker(refresh=FAST_RETRIES)
    await broker.settled()
    store = broker.daemon.store
    retry_after: float | str = 3 if form == "seconds" else http_date(emulator.state.clock() + 3)
    emulator.state.fail("mms.token", status=429, retry_after=retry_after, times=1)
    await asyncio.wait([store.fetch("fraud")])
    entry = store.entry("fraud")
    assert entry.last_error is not None and entry.last_error.status == 429
    assert entry.next_attempt_at is not None and entry.next_attempt_at - time.time() >= 1.5
    listed = emulator.state.count("mms.listkeys")
    with pytest.raises(ThrottledError, match="holding back"):
        await store.fetch("churn")
    assert emulator.state.count("mms.listkeys") == listed  # no call was spent on a sure 429
    assert (await broker.client().get("/v1/token/churn")).status == 200  # still served


async def test_entra_429_at_sign_in_holds_back_the_principal(
    start_broker: StartBroker, emulator: Emulator
) -> None:
    """Entra's 429 at sign-in is a throttle like ARM's: each service of the principal fails
    with its Retry-After, no second sign-in is tried meanwhile, and all recover after it."""
    emulator.state.fail("entra.token", status=429, retry_after=3, times=1)
    broker = await start_broker(refresh=FAST_RETRIES)
    await broker.settled()
    store = broker.daemon.store
    for service in ("fraud", "churn"):
        error = store.entry(service).last_error
        assert isinstance(error, ThrottledError) and error.status == 429, error
        assert error.retry_after is not None and 2.0 <= error.retry_after <= 3.0
        attempt_at = store.entry(service).next_attempt_at
        assert attempt_at is not None and attempt_at - time.time() >= 1.5
    assert emulator.state.count("entra.token") == 1
    await until_fresh(broker, "fraud")
    await until_fresh(broker, "churn")
    assert emulator.state.count("entra.token") == 2


async def test_error_only_an_operator_can_fix_backs_off_long(
    start_broker: StartBroker, emulator: Emulator
) -> None:
    """A 403 is not hammered: the next attempt is a minute or more away, and it says so."""
    broker = await start_broker(services=ONLY_FRAUD, refresh=FAST_RETRIES)
    client = broker.client()
    assert (await client.get("/v1/token/fraud")).status == 200
    emulator.state.fail("mms.token", status=403)
    await asyncio.wait([broker.daemon.store.fetch("fraud")])
    detail = (await client.get("/v1/services/fraud")).json()
    assert detail["last_error"]["retryable"] is False
    assert "lacks the Reader role" in detail["last_error"]["message"]
    entry = broker.daemon.store.entry("fraud")
    assert entry.next_attempt_at is not None and entry.next_attempt_at - time.time() >= 59
    assert (await client.get("/v1/token/fraud")).status == 200


async def test_region_outage_then_recovery(start_broker: StartBroker, emulator: Emulator) -> None:
    """While the workspace's region is dark the token is served stale; it recovers after."""
    broker = await start_broker(services=ONLY_FRAUD, refresh=FAST_RETRIES)
    client = broker.client()
    first = (await client.get("/v1/token/fraud")).json()["access_token"]
    emulator.state.region_down(demo.REGION)
    await asyncio.wait([broker.daemon.store.fetch("fraud")])
    assert (await client.get("/v1/services/fraud")).json()["state"] == "stale"
    assert (await client.get("/v1/token/fraud")).json()["access_token"] == first
    await broker.next_result("fraud")  # a retry during the outage fails too
    assert broker.daemon.store.entry("fraud").last_error is not None
    emulator.state.region_up(demo.REGION)
    await until_fresh(broker)
    assert (await client.get("/v1/token/fraud")).json()["access_token"] != first


async def test_start_with_azure_down_becomes_ready_without_restart(
    start_broker: StartBroker, emulator: Emulator
) -> None:
    """Started during an outage: healthz 200, readyz and tokens 503; ready once Azure returns."""
    emulator.state.region_down(demo.REGION)
    broker = await start_broker(refresh=FAST_RETRIES)
    client = broker.client()
    await broker.settled()
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 503
    refused = await client.get("/v1/token/fraud")
    assert refused.status == 503 and "Retry-After" in refused.headers
    assert refused.json()["error"] == "not_ready" and "cannot reach" in refused.json()["message"]
    assert (await client.get("/v1/services/fraud")).json()["state"] == "failed"
    emulator.state.region_up(demo.REGION)
    await until_fresh(broker, "fraud")
    await until_fresh(broker, "churn")
    assert (await client.get("/readyz")).status == 200
    assert (await client.get("/v1/token/fraud")).status == 200


@pytest.mark.parametrize("placement", ["normal", "past", "after_expiry", "absent"])
async def test_refresh_after_placement(
    placement: str, start_broker: StartBroker, emulator: Emulator
) -> None:
    """A usable refreshAfter is followed; absent, past or after expiry, half the lifetime is."""
    emulator.state.set_token_lifetime(60, refresh_after_s=20, placement=placement)
    broker = await start_broker(services=ONLY_FRAUD)
    await broker.settled()
    entry = broker.daemon.store.entry("fraud")
    token, obtained_at = entry.token, entry.obtained_at
    assert token is not None and obtained_at is not None and token.expires_on is not None
    refresh_by = broker.daemon.store.refresh_by(entry)
    assert refresh_by is not None
    if placement == "normal":
        assert refresh_by == token.refresh_after
    else:
        assert refresh_by == pytest.approx(obtained_at + (token.expires_on - obtained_at) / 2)
    assert refresh_by < token.expires_on


async def test_clock_skew_is_detected_and_deadlines_corrected(
    start_broker: StartBroker, emulator: Emulator
) -> None:
    """With Azure's clock ten minutes ahead, status says so and expiry is moved onto ours."""
    emulator.state.clock = lambda: time.time() + 600
    broker = await start_broker(services=ONLY_FRAUD)
    body = (await broker.client().get("/v1/token/fraud")).json()
    detail = (await broker.client().get("/v1/services/fraud")).json()
    assert detail["clock_skew_s"] == pytest.approx(600, abs=2)
    assert body["expires_on"] - time.time() == pytest.approx(60, abs=3)


async def test_thousand_cold_requests_one_token_call(
    start_broker: StartBroker, emulator: Emulator
) -> None:
    """1,000 concurrent requests for a cold service cause exactly one upstream token call."""
    emulator.state.fail("mms.token", kind="slow", delay_s=0.5, times=1)
    broker = await start_broker(services=ONLY_FRAUD)
    client = broker.client("tcp")
    replies = await asyncio.gather(*(client.get("/v1/token/fraud") for _ in range(1000)))
    assert {r.status for r in replies} == {200}
    assert len({r.json()["access_token"] for r in replies}) == 1
    assert emulator.state.count("mms.token") == 1
