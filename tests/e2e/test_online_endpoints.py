"""Azure ML v2 online endpoints: each auth mode served, and a 403 naming the missing action."""

from __future__ import annotations

import ssl
from pathlib import Path

import aiohttp
import pytest

from broker.emulator import Emulator
from broker.emulator import seed as demo
from tests.conftest import config_text
from tests.e2e.conftest import LISTENERS, StartBroker

pytestmark = pytest.mark.timeout(30)

ENDPOINTS = {
    "v2-token": demo.ENDPOINT_TOKEN,
    "v2-key": demo.ENDPOINT_KEY,
    "v2-aad": demo.ENDPOINT_AAD,
}


def endpoints_config(emulator: Emulator, short_dir: Path, endpoints: dict[str, str]) -> str:
    text = config_text(emulator, short_dir, services={"fraud": demo.TOKEN_SERVICE})
    for name, endpoint in endpoints.items():
        text += (
            f'\n[[service]]\nname = "{name}"\nkind = "azureml-online-endpoint"\n'
            f'subscription_id = "{demo.SUBSCRIPTION_ID}"\n'
            f'resource_group = "{demo.RESOURCE_GROUP}"\n'
            f'workspace = "{demo.WORKSPACE}"\nendpoint = "{endpoint}"\n'
        )
    return text


async def score(emulator: Emulator, uri: str, credential: str) -> int:
    context = ssl.create_default_context(cafile=str(emulator.ca_path))
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session,
        session.post(
            uri, json={"data": [1]}, headers={"Authorization": f"Bearer {credential}"}
        ) as resp,
    ):
        return resp.status


@pytest.mark.parametrize("listener", LISTENERS)
async def test_each_auth_mode_is_served_and_accepted(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, listener: str
) -> None:
    """AMLToken, Key and AADToken endpoints each get a credential their scoring URI accepts."""
    broker = await start_broker(endpoints_config(emulator, short_dir, ENDPOINTS))
    client = broker.client(listener)
    expected = {"v2-token": "token", "v2-key": "key", "v2-aad": "entra"}
    for name, auth in expected.items():
        reply = await client.get(f"/v1/token/{name}")
        assert reply.status == 200, reply.text
        body = reply.json()
        assert body["auth"] == auth
        uri = (await client.get(f"/v1/services/{name}")).json()["scoring_uri"]
        assert await score(emulator, uri, body["access_token"]) == 200, name
    assert emulator.state.count("arm.endpoint_token") == 1
    assert emulator.state.count("arm.endpoint_keys") == 1


async def test_missing_action_is_named(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path
) -> None:
    """Without the token action a 403 names it: Reader is not enough for v2 tokens."""
    emulator.state.revoke_action(
        demo.CLIENT_ID,
        demo.SUBSCRIPTION_ID,
        demo.RESOURCE_GROUP,
        demo.WORKSPACE,
        "Microsoft.MachineLearningServices/workspaces/onlineEndpoints/token/action",
    )
    broker = await start_broker(
        endpoints_config(emulator, short_dir, {"v2-token": demo.ENDPOINT_TOKEN})
    )
    await broker.settled()
    error = (await broker.client().get("/v1/services/v2-token")).json()["last_error"]
    assert error["status"] == 403 and error["retryable"] is False
    assert "onlineEndpoints/token/action" in error["message"]


async def test_endpoint_token_deadlines_follow_azures_clock(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path
) -> None:
    """With ARM's clock ten minutes ahead, the endpoint token's expiry is moved onto ours."""
    import time

    emulator.state.clock = lambda: time.time() + 600
    broker = await start_broker(
        endpoints_config(emulator, short_dir, {"v2-token": demo.ENDPOINT_TOKEN})
    )
    body = (await broker.client().get("/v1/token/v2-token")).json()
    detail = (await broker.client().get("/v1/services/v2-token")).json()
    assert detail["clock_skew_s"] == pytest.approx(600, abs=2)
    assert body["expires_on"] < time.time() + 600


@pytest.mark.parametrize(
    ("name", "endpoint", "issued_by"),
    [("v2-token", demo.ENDPOINT_TOKEN, "arm.endpoint_token"), ("v2-aad", demo.ENDPOINT_AAD, None)],
)
async def test_endpoint_tokens_are_refreshed_and_accepted(
    start_broker: StartBroker,
    emulator: Emulator,
    short_dir: Path,
    name: str,
    endpoint: str,
    issued_by: str | None,
) -> None:
    """`AMLToken` and `AADToken` endpoints with 4-second tokens: the broker renews each
    before it lapses, and the endpoint accepts the new token."""
    target = emulator.state.online_endpoint(
        demo.SUBSCRIPTION_ID, demo.RESOURCE_GROUP, demo.WORKSPACE, endpoint
    )
    assert target is not None
    target.token_lifetime_s, target.refresh_after_s = 4.0, 2.0
    emulator.state.entra_token_lifetime_s = 4.0
    broker = await start_broker(endpoints_config(emulator, short_dir, {name: endpoint}))
    client = broker.client()
    first = (await client.get(f"/v1/token/{name}")).json()
    entry = await broker.next_result(name)
    assert entry.last_error is None
    second = (await client.get(f"/v1/token/{name}")).json()
    assert second["access_token"] != first["access_token"]
    assert second["expires_on"] >= first["expires_on"]
    uri = (await client.get(f"/v1/services/{name}")).json()["scoring_uri"]
    assert await score(emulator, uri, second["access_token"]) == 200
    if issued_by is not None:
        assert emulator.state.count(issued_by) == 2


async def test_deadlines_are_on_the_brokers_clock(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path
) -> None:
    """With the broker's clock and Azure's both a day ahead of the wall clock (agreeing
    with each other), no skew is seen and every kind of token is fresh: Azure's times are
    compared with the broker's clock, never the wall clock."""
    text = endpoints_config(emulator, short_dir, {"v2-token": demo.ENDPOINT_TOKEN})
    text += '\n[[service]]\nname = "aml"\nkind = "entra"\nscope = "https://ml.azure.com/.default"\n'
    broker = await start_broker(text)
    emulator.state.clock = broker.clock
    broker.clock.advance(86400)
    client = broker.client()
    for name in ("fraud", "v2-token", "aml"):
        await broker.daemon.store.fetch(name)
        token = (await client.get(f"/v1/token/{name}")).json()
        assert token["expires_on"] > broker.clock() + 10, name
        detail = (await client.get(f"/v1/services/{name}")).json()
        assert detail["state"] == "fresh", name
        assert detail["clock_skew_s"] in (None, pytest.approx(0, abs=2)), name
