"""The broker fetches tokens and keys from the emulator and serves them on both listeners."""

from __future__ import annotations

import asyncio
import ssl
import time

import aiohttp
import pytest

from broker.emulator import Emulator
from broker.emulator import seed as demo
from tests.e2e.conftest import LISTENERS, StartBroker

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("listener", LISTENERS)
async def test_token_service_is_served(
    start_broker: StartBroker, emulator: Emulator, listener: str
) -> None:
    """A token service's token comes as JSON with expiry and refresh_by; the model accepts it."""
    broker = await start_broker()
    reply = await broker.client(listener).get("/v1/token/fraud")
    assert reply.status == 200, reply.text
    body = reply.json()
    assert set(body) == {
        "service",
        "token_type",
        "access_token",
        "expires_on",
        "refresh_by",
        "auth",
    }
    assert body["service"] == "fraud" and body["auth"] == "token"
    assert body["token_type"] == "Bearer"
    assert time.time() < body["refresh_by"] < body["expires_on"]
    assert emulator.state.count("mms.token", service=demo.TOKEN_SERVICE) == 1
    detail = (await broker.client(listener).get("/v1/services/fraud")).json()
    assert await score(emulator, detail["scoring_uri"], body["access_token"]) == 200
    assert await score(emulator, detail["scoring_uri"], "not-a-token") == 401


async def score(emulator: Emulator, uri: str, credential: str) -> int:
    context = ssl.create_default_context(cafile=str(emulator.ca_path))
    headers = {"Authorization": f"Bearer {credential}"}
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session,
        session.post(uri, json={"data": [1]}, headers=headers) as resp,
    ):
        return resp.status


@pytest.mark.parametrize("listener", LISTENERS)
async def test_key_service_is_served(
    start_broker: StartBroker, emulator: Emulator, listener: str
) -> None:
    """A key service's primary key is served with a null expiry."""
    broker = await start_broker()
    reply = await broker.client(listener).get("/v1/token/churn")
    assert reply.status == 200, reply.text
    body = reply.json()
    primary, _ = emulator.state.current_keys(
        demo.SUBSCRIPTION_ID, demo.RESOURCE_GROUP, demo.WORKSPACE, demo.KEY_SERVICE
    )
    assert body["access_token"] == primary
    assert body["auth"] == "key" and body["expires_on"] is None
    assert body["refresh_by"] > time.time()
    detail = (await broker.client(listener).get("/v1/services/churn")).json()
    assert await score(emulator, detail["scoring_uri"], primary) == 200


@pytest.mark.parametrize("listener", LISTENERS)
async def test_header_format_is_the_bare_line(start_broker: StartBroker, listener: str) -> None:
    """`?format=header` answers `Bearer <token>` as text, for shell scripts."""
    broker = await start_broker()
    token = (await broker.client(listener).get("/v1/token/fraud")).json()["access_token"]
    reply = await broker.client(listener).get("/v1/token/fraud?format=header")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/plain")
    assert reply.text == f"Bearer {token}\n"


async def test_hundred_cold_requests_cause_one_fetch(
    start_broker: StartBroker, emulator: Emulator
) -> None:
    """100 concurrent requests for a service with nothing cached cause exactly one token call."""
    broker = await start_broker()
    client = broker.client("tcp")
    replies = await asyncio.gather(*(client.get("/v1/token/fraud") for _ in range(100)))
    assert {r.status for r in replies} == {200}
    assert len({r.json()["access_token"] for r in replies}) == 1
    assert emulator.state.count("mms.token", service=demo.TOKEN_SERVICE) == 1


async def test_discovered_region_is_cached(start_broker: StartBroker, emulator: Emulator) -> None:
    """Without a configured region, ARM and discovery are asked once, not on every refresh."""
    broker = await start_broker()
    await broker.settled()
    await broker.daemon.store.fetch("fraud")
    await broker.daemon.store.fetch("fraud")
    assert emulator.state.count("arm.workspace") == 1  # once per workspace, never per refresh
    assert emulator.state.count("discovery") == 1
    assert emulator.state.count("mms.describe") == 2  # once per service


async def test_configured_region_skips_discovery(
    start_broker: StartBroker, emulator: Emulator
) -> None:
    """With `region` set, the broker goes straight to the regional API."""
    broker = await start_broker(extra_service_keys=f'region = "{demo.REGION}"')
    await broker.settled()
    assert (await broker.client().get("/v1/token/fraud")).status == 200
    assert emulator.state.count("arm.workspace") == 0
    assert emulator.state.count("discovery") == 0


async def test_services_list_and_detail(start_broker: StartBroker) -> None:
    """`/v1/services` lists every service's state and never a credential."""
    broker = await start_broker()
    await broker.settled()
    client = broker.client()
    listing = await client.get("/v1/services")
    assert listing.status == 200
    states = {s["service"]: s for s in listing.json()["services"]}
    assert states["fraud"]["state"] == "fresh" and states["fraud"]["auth"] == "token"
    assert states["churn"]["state"] == "fresh" and states["churn"]["auth"] == "key"
    assert states["fraud"]["scoring_uri"].startswith("https://127.0.0.1:")
    token = (await client.get("/v1/token/fraud")).json()["access_token"]
    key = (await client.get("/v1/token/churn")).json()["access_token"]
    detail = await client.get("/v1/services/fraud")
    assert detail.json()["state"] == "fresh"
    for text in (listing.text, detail.text):
        assert token not in text and key not in text


@pytest.mark.parametrize("listener", LISTENERS)
async def test_local_errors_are_json(start_broker: StartBroker, listener: str) -> None:
    """Unknown services, routes and formats get JSON errors with the right status."""
    broker = await start_broker()
    client = broker.client(listener)
    unknown = await client.get("/v1/token/nope")
    assert unknown.status == 404 and unknown.json()["error"] == "unknown_service"
    assert "nope" in unknown.json()["message"]
    assert (await client.get("/v1/services/nope")).status == 404
    route = await client.get("/v2/whatever")
    assert route.status == 404 and route.json()["error"] == "not_found"
    fmt = await client.get("/v1/token/fraud?format=xml")
    assert fmt.status == 400 and "format" in fmt.json()["message"]


async def test_health_and_readiness(start_broker: StartBroker, emulator: Emulator) -> None:
    """`/healthz` is 200 at once; `/readyz` is 503 until every service has a credential."""
    emulator.state.fail("mms.token", status=503, times=1)
    broker = await start_broker()
    client = broker.client()
    assert (await client.get("/healthz")).status == 200
    await broker.settled()
    not_ready = await client.get("/readyz")
    assert not_ready.status == 503
    assert not_ready.json()["waiting_for"] == ["fraud"]
    await broker.daemon.store.fetch("fraud")
    assert (await client.get("/readyz")).status == 200
