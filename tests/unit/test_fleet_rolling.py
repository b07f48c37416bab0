"""Rolling the fleet's encryption key on a real Redis: a broker reads entries sealed with
its current key or a previous one, and seals with the current key only."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from broker.assembly import new_fleet
from broker.config import Config, load_config
from broker.fleet import Fleet
from broker.models import AccessToken, AuthKind
from broker.saved_credentials import Saved
from tests.conftest import RedisServer

pytestmark = pytest.mark.timeout(30)

OLD_KEY, NEW_KEY = bytes(range(32)), bytes(range(64, 96))
SERVICE = "aml"


def saved(value: str, expires_in: float) -> Saved:
    now = time.time()
    return Saved(AccessToken(value, AuthKind.TOKEN, now + expires_in, now + expires_in / 2), now)


MakeFleet = Callable[[str, list[str]], Fleet]


@pytest.fixture
async def make_fleet(redis: RedisServer, tmp_path: Path) -> AsyncIterator[MakeFleet]:
    """A broker's fleet from a configuration whose current key is the file named, with the
    previous keys named; closed after the test."""
    for name, key in (("old.key", OLD_KEY), ("new.key", NEW_KEY)):
        (tmp_path / name).write_bytes(key)
        (tmp_path / name).chmod(0o600)
    made: list[Fleet] = []

    def make(current: str, previous: list[str]) -> Fleet:
        path = tmp_path / f"broker-{len(made)}.toml"
        path.write_text(
            '[cloud]\nname = "AzureCloud"\n\n[identity.main]\ntenant_id = "t"\n'
            'client_id = "11111111-0000-0000-0000-000000000001"\nclient_secret_env = "S"\n\n'
            f'[[service]]\nname = "{SERVICE}"\nkind = "entra"\n'
            'scope = "https://ml.azure.com/.default"\n\n'
            f'[fleet]\nenabled = true\nredis_url = "{redis.unix_url}"\n'
            f'encryption_key_file = "{current}"\n'
            f"previous_encryption_key_files = {previous!r}\n".replace("'", '"')
        )
        config: Config = load_config(path, environ={"S": "secret-value"})
        fleet = new_fleet(config, config.service_identity)
        assert fleet is not None
        made.append(fleet)
        return fleet

    yield make
    for fleet in made:
        await fleet.close()


async def test_an_entry_sealed_with_a_previous_key_opens(make_fleet: MakeFleet) -> None:
    """A broker moved to the new key, the old one listed as previous, adopts what a broker
    still on the old key shared."""
    old, rolled = make_fleet("old.key", []), make_fleet("new.key", ["old.key"])
    credential = saved("sealed-with-OLD-key-0001", 600)
    assert await old.write(SERVICE, credential, 600)
    assert await rolled.read(SERVICE) == credential


async def test_new_entries_are_sealed_with_the_current_key_only(make_fleet: MakeFleet) -> None:
    """What a rolled broker writes opens with the new key alone, and not with the old key
    alone: the previous key is read with, never written with."""
    rolled = make_fleet("new.key", ["old.key"])
    only_new, only_old = make_fleet("new.key", []), make_fleet("old.key", [])
    credential = saved("sealed-with-NEW-key-0001", 600)
    assert await rolled.write(SERVICE, credential, 600)
    assert await only_new.read(SERVICE) == credential
    assert await only_old.read(SERVICE) is None


async def test_the_first_step_of_a_roll_reads_the_next_key(make_fleet: MakeFleet) -> None:
    """The roll's first step (still writing with the old key, the new one listed) reads
    what a broker already on the new key wrote, and is read by it: no broker of the fleet
    ever misses an entry during the roll."""
    first_step = make_fleet("old.key", ["new.key"])
    second_step = make_fleet("new.key", ["old.key"])
    newer = saved("sealed-with-NEW-key-0002", 900)
    assert await second_step.write(SERVICE, newer, 900)
    assert await first_step.read(SERVICE) == newer
    newest = saved("sealed-with-OLD-key-0003", 1200)
    assert await first_step.write(SERVICE, newest, 1200)
    assert await second_step.read(SERVICE) == newest


async def test_the_current_key_listed_as_previous_is_harmless(make_fleet: MakeFleet) -> None:
    """The current key also listed as a previous one (a file copied by mistake) is used
    once, and the broker reads and writes as usual."""
    fleet = make_fleet("new.key", ["new.key"])
    assert repr(fleet._sealer) == "Sealer(keys=1)"
    credential = saved("sealed-with-NEW-key-0004", 600)
    assert await fleet.write(SERVICE, credential, 600)
    assert await fleet.read(SERVICE) == credential
