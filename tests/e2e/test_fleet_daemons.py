"""Fleet mode with whole daemons in this process: real Redis, the emulator over HTTPS, and
each daemon's own clock, for what needs a look inside the broker."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from broker.emulator import Emulator
from broker.emulator import seed as demo
from broker.errors import LeaseBusyError
from tests.conftest import RedisServer, config_text
from tests.e2e.conftest import Broker, StartBroker

pytestmark = pytest.mark.timeout(60)

FLEET_KEY = bytes(range(9, 73))
SERVICES = {"fraud": demo.TOKEN_SERVICE, "churn": demo.KEY_SERVICE}


def fleet_text(
    emulator: Emulator,
    directory: Path,
    redis: RedisServer,
    *,
    refresh: str = "",
    lease_s: float = 3.0,
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
        f'encryption_key_file = "{key_file}"\nlease_s = {lease_s}\n'
    )


async def start_member(
    start_broker: StartBroker,
    emulator: Emulator,
    short_dir: Path,
    redis: RedisServer,
    name: str,
    lease_s: float = 3.0,
) -> Broker:
    broker = await start_broker(fleet_text(emulator, short_dir / name, redis, lease_s=lease_s))
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


KEY_COORDINATES = (demo.SUBSCRIPTION_ID, demo.RESOURCE_GROUP, demo.WORKSPACE, demo.KEY_SERVICE)


async def serving(broker: Broker, value: str, within: float = 10.0) -> None:
    """Wait until `broker` serves `value` for churn."""
    deadline = time.monotonic() + within
    while (token := broker.daemon.store.entry("churn").token) is None or token.value != value:
        assert time.monotonic() < deadline, "the broker never served the fleet's key"
        await asyncio.sleep(0.02)


async def test_a_key_rotation_holds_the_lease_and_the_fleet_follows_it(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, redis: RedisServer
) -> None:
    """One broker rotating a key holds the service's lease throughout: the fleet serves the
    other key before the chosen one is regenerated and the new key after, and a second
    broker asked to rotate meanwhile is refused without regenerating anything."""
    rotating, other = [
        await start_member(start_broker, emulator, short_dir, redis, name, lease_s=1.5)
        for name in ("a", "b")
    ]
    rotating.daemon.rotations.poll_s = 0.1
    old_primary, secondary = emulator.state.current_keys(*KEY_COORDINATES)
    await serving(other, old_primary)
    emulator.state.fail("mms.regenerate", status=None, delay_s=6.0, times=1)
    rotation = asyncio.create_task(rotating.daemon.rotations.rotate("churn", "primary"))
    await serving(other, secondary)  # switched before the primary is regenerated
    assert emulator.state.current_keys(*KEY_COORDINATES)[0] == old_primary
    with pytest.raises(LeaseBusyError):  # within two lease_s
        await asyncio.wait_for(other.daemon.rotations.rotate("churn", "secondary"), 10)
    await asyncio.wait_for(rotation, 30)  # the regenerate's 6 s and a fetch on each side
    new_primary, same_secondary = emulator.state.current_keys(*KEY_COORDINATES)
    assert new_primary != old_primary and same_secondary == secondary
    await serving(other, new_primary)
    assert emulator.state.count("mms.regenerate") == 1
