"""Key rotation with no gap: clients never receive a key that Azure has invalidated."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import aiohttp
import pytest

from broker.cli import EXIT_FAILURE, EXIT_OK, main
from broker.emulator import Emulator
from broker.emulator import seed as demo
from broker.emulator.records import ENDPOINT_REGENERATE_ACTION
from tests.e2e.conftest import Broker, StartBroker
from tests.e2e.test_online_endpoints import endpoints_config

pytestmark = pytest.mark.timeout(60)

KEY_ONLY = {"churn": demo.KEY_SERVICE}
COORDINATES = (demo.SUBSCRIPTION_ID, demo.RESOURCE_GROUP, demo.WORKSPACE, demo.KEY_SERVICE)


async def rotate(broker: Broker, *extra: str) -> int:
    argv = ["keys", "rotate", "churn", "--socket", str(broker.daemon.unix_path), *extra]
    return await asyncio.to_thread(main, argv)


async def clients_scoring(
    broker: Broker, emulator: Emulator, stop: asyncio.Event, service: str = "churn"
) -> list[int]:
    """Fetch the key from the broker and use it at once, until told to stop."""
    context = ssl.create_default_context(cafile=str(emulator.ca_path))
    statuses: list[int] = []
    uri = (await broker.client().get(f"/v1/services/{service}")).json()["scoring_uri"]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        while not stop.is_set():
            key = (await broker.client().get(f"/v1/token/{service}")).json()["access_token"]
            headers = {"Authorization": f"Bearer {key}"}
            async with session.post(uri, json={"data": [1]}, headers=headers) as resp:
                statuses.append(resp.status)
            await asyncio.sleep(0)
    return statuses


async def test_rotation_under_load_has_no_gap(
    start_broker: StartBroker, emulator: Emulator, capsys: pytest.CaptureFixture[str]
) -> None:
    """While clients fetch and use the key, the primary is regenerated; every call succeeds."""
    broker = await start_broker(services=KEY_ONLY)
    broker.daemon.rotations.poll_s = 0.2
    old_primary, secondary = emulator.state.current_keys(*COORDINATES)
    assert (await broker.client().get("/v1/token/churn")).json()["access_token"] == old_primary
    stop = asyncio.Event()
    clients = [asyncio.create_task(clients_scoring(broker, emulator, stop)) for _ in range(6)]
    assert await rotate(broker) == EXIT_OK
    stop.set()
    statuses = [s for batch in await asyncio.gather(*clients) for s in batch]
    new_primary, same_secondary = emulator.state.current_keys(*COORDINATES)
    assert new_primary != old_primary and same_secondary == secondary
    assert len(statuses) > 20 and set(statuses) == {200}
    assert (await broker.client().get("/v1/token/churn")).json()["access_token"] == new_primary
    assert emulator.state.count("mms.regenerate") == 1
    assert emulator.state.count("mms.operation") >= 2
    assert "rotated the primary key of churn" in capsys.readouterr().out


async def test_failed_operation_is_reported_and_the_other_key_kept(
    start_broker: StartBroker, emulator: Emulator, capsys: pytest.CaptureFixture[str]
) -> None:
    """An operation ending Failed is reported with Azure's error; the valid key stays served."""
    broker = await start_broker(services=KEY_ONLY)
    broker.daemon.rotations.poll_s = 0.05
    primary, secondary = emulator.state.current_keys(*COORDINATES)
    failure = {"id": "op", "state": "Failed", "error": {"code": "Conflict", "message": "busy"}}
    emulator.state.fail("mms.operation", status=200, body=failure)
    assert await rotate(broker, "--key", "secondary") == EXIT_FAILURE
    err = capsys.readouterr().err
    assert "ended Failed" in err and "Conflict: busy" in err
    served = (await broker.client().get("/v1/token/churn")).json()["access_token"]
    assert served == primary  # the key not being regenerated
    assert emulator.state.current_keys(*COORDINATES) == (primary, secondary)


async def test_rotation_is_refused_on_tcp_and_for_token_services(start_broker: StartBroker) -> None:
    """Rotation is for key services, on the socket only."""
    broker = await start_broker()
    assert broker.daemon.tcp_address is not None
    host, port = broker.daemon.tcp_address
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://{host}:{port}/v1/services/churn/keys/rotate", headers={"Metadata": "true"}
        ) as resp,
    ):
        assert resp.status == 403
    async with (
        aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(broker.daemon.unix_path))
        ) as session,
        session.post(
            "http://localhost/v1/services/fraud/keys/rotate", headers={"Metadata": "true"}
        ) as resp,
    ):
        assert resp.status == 400 and (await resp.json())["error"] == "not_a_key_service"


V2_KEY = {"v2-key": demo.ENDPOINT_KEY}
V2_WORKSPACE = (demo.SUBSCRIPTION_ID, demo.RESOURCE_GROUP, demo.WORKSPACE)


def v2_keys(emulator: Emulator) -> tuple[str, str]:
    endpoint = emulator.state.online_endpoint(*V2_WORKSPACE, demo.ENDPOINT_KEY)
    assert endpoint is not None
    return endpoint.primary_key, endpoint.secondary_key


async def rotate_v2(broker: Broker, *extra: str) -> int:
    argv = ["keys", "rotate", "v2-key", "--socket", str(broker.daemon.unix_path), *extra]
    return await asyncio.to_thread(main, argv)


async def test_v2_endpoint_rotation_under_load_has_no_gap(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path
) -> None:
    """A v2 Key endpoint's primary is regenerated through ARM's long-running operation while
    clients score with the key the broker hands out; every call succeeds."""
    emulator.state.grant_action(demo.CLIENT_ID, *V2_WORKSPACE, ENDPOINT_REGENERATE_ACTION)
    broker = await start_broker(endpoints_config(emulator, short_dir, V2_KEY))
    broker.daemon.rotations.poll_s = 0.05
    old_primary, secondary = v2_keys(emulator)
    assert (await broker.client().get("/v1/token/v2-key")).json()["access_token"] == old_primary
    stop = asyncio.Event()
    clients = [
        asyncio.create_task(clients_scoring(broker, emulator, stop, "v2-key")) for _ in range(4)
    ]
    assert await rotate_v2(broker) == EXIT_OK
    stop.set()
    statuses = [s for batch in await asyncio.gather(*clients) for s in batch]
    new_primary, same_secondary = v2_keys(emulator)
    assert new_primary != old_primary and same_secondary == secondary
    assert len(statuses) > 10 and set(statuses) == {200}
    assert (await broker.client().get("/v1/token/v2-key")).json()["access_token"] == new_primary
    assert emulator.state.count("arm.endpoint_regenerate") == 1
    assert emulator.state.count("arm.operation") >= 2


async def test_v2_rotation_without_the_action_names_it(
    start_broker: StartBroker,
    emulator: Emulator,
    short_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Listing keys is not enough to regenerate them: the 403 names the missing action, and
    the broker keeps serving the key that was not being regenerated."""
    broker = await start_broker(endpoints_config(emulator, short_dir, V2_KEY))
    primary, secondary = v2_keys(emulator)
    assert await rotate_v2(broker) == EXIT_FAILURE
    assert "onlineEndpoints/regenerateKeys/action" in capsys.readouterr().err
    served = (await broker.client().get("/v1/token/v2-key")).json()["access_token"]
    assert served == secondary
    assert v2_keys(emulator) == (primary, secondary)


async def test_v2_failed_operation_is_reported(
    start_broker: StartBroker,
    emulator: Emulator,
    short_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An ARM operation ending Failed is reported with Azure's error."""
    emulator.state.grant_action(demo.CLIENT_ID, *V2_WORKSPACE, ENDPOINT_REGENERATE_ACTION)
    broker = await start_broker(endpoints_config(emulator, short_dir, V2_KEY))
    broker.daemon.rotations.poll_s = 0.05
    failure = {"status": "Failed", "error": {"code": "Conflict", "message": "busy"}}
    emulator.state.fail("arm.operation", status=200, body=failure)
    assert await rotate_v2(broker, "--key", "secondary") == EXIT_FAILURE
    err = capsys.readouterr().err
    assert "ended Failed" in err and "Conflict: busy" in err
    primary, _ = v2_keys(emulator)
    assert (await broker.client().get("/v1/token/v2-key")).json()["access_token"] == primary
