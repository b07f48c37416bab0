"""Fleet mode with whole daemons in this process: real Redis, the emulator over HTTPS, and
each daemon's own clock, for what needs a look inside the broker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from broker.emulator import Emulator
from broker.emulator import seed as demo
from tests.conftest import RedisServer, config_text
from tests.e2e.conftest import Broker, StartBroker

pytestmark = pytest.mark.timeout(60)

FLEET_KEY = bytes(range(9, 73))
SERVICES = {"fraud": demo.TOKEN_SERVICE, "churn": demo.KEY_SERVICE}


def fleet_text(
    emulator: Emulator, directory: Path, redis: RedisServer, *, refresh: str = ""
) -> str:
    """A broker.toml for a daemon of the fleet, its sockets in `directory`."""
    directory.mkdir(exist_ok=True)
    key_file = directory.parent / "fleet.key"
    if not key_file.exists():
        key_file.write_bytes(FLEET_KEY)
        key_file.chmod(0o600)
    text = config_text(emulator, directory, services=SERVICES, refresh=refresh)
    return text + (
        f'\n[fleet]\nenabled = true\nredis_url = "{redis.unix_url}"\n'
        f'encryption_key_file = "{key_file}"\nlease_s = 3\n'
    )


async def start_member(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, redis: RedisServer, name: str
) -> Broker:
    broker = await start_broker(fleet_text(emulator, short_dir / name, redis))
    await broker.settled()
    return broker


async def test_a_404_describes_again_from_azure_not_from_the_fleet(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, redis: RedisServer
) -> None:
    """A web service answered 404 (redeployed, perhaps) is described again by Azure, even
    though the fleet holds its description: the fleet's may be as stale as the broker's."""
    broker = await start_member(start_broker, emulator, short_dir, redis, "a")
    store = broker.daemon.store
    described = emulator.state.count("mms.describe", demo.TOKEN_SERVICE)
    assert described == 1
    emulator.state.fail("mms.token", status=404, times=1, service=demo.TOKEN_SERVICE)
    await asyncio.wait([store.fetch("fraud")])
    assert store.entry("fraud").last_error is not None
    broker.clock.advance(5.0)  # past retry_min_s: the next fetch is not held by pacing
    await store.fetch("fraud")
    assert emulator.state.count("mms.describe", demo.TOKEN_SERVICE) == described + 1
