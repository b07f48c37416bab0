"""`POST /v1/token/{service}/refresh` refreshes at most once per service per window."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from broker.emulator import Emulator
from broker.emulator import seed as demo
from tests.e2e.conftest import Broker, StartBroker

pytestmark = pytest.mark.timeout(30)


async def post_refresh(broker: Broker, service: str = "fraud") -> tuple[int, dict[str, Any]]:
    assert broker.daemon.tcp_address is not None
    host, port = broker.daemon.tcp_address
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://{host}:{port}/v1/token/{service}/refresh", headers={"Metadata": "true"}
        ) as resp,
    ):
        return resp.status, await resp.json()


async def test_refresh_gets_a_new_token(start_broker: StartBroker, emulator: Emulator) -> None:
    """A client whose token was refused asks for a refresh and gets a new token."""
    broker = await start_broker(
        services={"fraud": demo.TOKEN_SERVICE}, refresh="client_refresh_window_s = 10"
    )
    first = (await broker.client().get("/v1/token/fraud")).json()
    broker.clock.advance(11)
    status, body = await post_refresh(broker)
    assert status == 200
    assert body["access_token"] != first["access_token"]
    assert emulator.state.count("mms.token") == 2


async def test_a_crowd_of_refreshes_causes_one_fetch(
    start_broker: StartBroker, emulator: Emulator
) -> None:
    """Fifty clients asking at once, and again inside the window, cause one upstream call."""
    broker = await start_broker(
        services={"fraud": demo.TOKEN_SERVICE}, refresh="client_refresh_window_s = 10"
    )
    await broker.settled()
    broker.clock.advance(11)
    replies = await asyncio.gather(*(post_refresh(broker) for _ in range(50)))
    assert {status for status, _ in replies} == {200}
    assert len({body["access_token"] for _, body in replies}) == 1
    again = await post_refresh(broker)
    assert again[0] == 200
    assert again[1]["access_token"] == replies[0][1]["access_token"]
    assert emulator.state.count("mms.token") == 2


async def test_refresh_of_unknown_service_is_404(start_broker: StartBroker) -> None:
    """Refreshing a service that is not configured is a JSON 404."""
    broker = await start_broker()
    status, body = await post_refresh(broker, "nope")
    assert status == 404 and body["error"] == "unknown_service"
