"""Facts the providers learnt of Azure (discovery, describe results), shared through a real
Redis: sealed like credentials, bound to their key, bounded when Redis is down."""

from __future__ import annotations

import io
import socket
import time
from collections.abc import AsyncIterator, Callable

import pytest

from broker.config import FleetConfig, SecretBytes
from broker.fleet import Fleet, FleetFacts
from broker.fleet.facts import FACT_TTL_S
from broker.fleet.naming import fact_key
from broker.models import fingerprint
from tests.conftest import RedisServer, logged

pytestmark = pytest.mark.timeout(30)

KEY, OTHER_KEY = bytes(range(32)), bytes(range(1, 33))
WORKSPACE = ("workspace", "https://management.example", "sub-1", "rg-1", "ws-1")
OTHER_WORKSPACE = ("workspace", "https://management.example", "sub-1", "rg-1", "ws-2")
MMS = "https://westeurope.modelmanagement.example/mms-SECRET-LOOKING-0001"

MakeFacts = Callable[..., FleetFacts]


@pytest.fixture
async def make_facts(redis: RedisServer) -> AsyncIterator[MakeFacts]:
    """Each call is one broker's facts, on the test's Redis."""
    fleets: list[Fleet] = []

    def make(url: str | None = None, key: bytes = KEY) -> FleetFacts:
        config = FleetConfig(
            True,
            url or redis.unix_url,
            encryption_key=SecretBytes(key),
            connect_timeout_s=0.3,
            command_timeout_s=0.3,
        )
        fleet = Fleet(config, lambda name: fingerprint("test", name))
        fleets.append(fleet)
        return FleetFacts(fleet)

    yield make
    for fleet in fleets:
        await fleet.close()


async def test_a_fact_one_broker_learnt_is_recalled_by_another(
    make_facts: MakeFacts, redis: RedisServer
) -> None:
    """What one broker remembers another recalls whole; Redis holds it sealed, under a
    digest, for an hour."""
    one, other = make_facts(), make_facts()
    assert await other.recall(WORKSPACE) is None
    await one.remember(WORKSPACE, {"mms": MMS})
    assert await other.recall(WORKSPACE) == {"mms": MMS}
    assert await other.recall(OTHER_WORKSPACE) is None
    key = fact_key("token-broker:", WORKSPACE)
    stored = redis.command("GET", key)
    assert stored.startswith(b"TBFACT1:") and b"SECRET-LOOKING" not in stored
    assert b"ws-1" not in key.encode()
    ttl_ms = int(redis.command("PTTL", key))
    assert (FACT_TTL_S - 5) * 1000 < ttl_ms <= FACT_TTL_S * 1000


@pytest.mark.parametrize("damage", ["altered", "moved", "other_key"])
async def test_a_fact_that_does_not_open_is_ignored_once_and_replaced(
    make_facts: MakeFacts, redis: RedisServer, logs: io.StringIO, damage: str
) -> None:
    """A fact altered, copied under another fact's key or written with another encryption
    key reads as nothing, is logged once, and the next broker to learn it replaces it."""
    one = make_facts()
    key = fact_key("token-broker:", WORKSPACE)
    if damage == "other_key":
        await make_facts(key=OTHER_KEY).remember(WORKSPACE, {"mms": "https://attacker.example"})
    else:
        await one.remember(OTHER_WORKSPACE if damage == "moved" else WORKSPACE, {"mms": MMS})
        source = fact_key("token-broker:", OTHER_WORKSPACE) if damage == "moved" else key
        value = redis.command("GET", source)[:-1]  # redis-cli's newline
        if damage == "altered":
            value = value[:-1] + bytes([value[-1] ^ 1])
        _set_raw(redis, key, value)
    assert await one.recall(WORKSPACE) is None
    assert await one.recall(WORKSPACE) is None
    assert len(logged(logs, "fleet.fact_ignored")) == 1
    await one.remember(WORKSPACE, {"mms": MMS})
    assert await one.recall(WORKSPACE) == {"mms": MMS}


async def test_redis_down_knows_nothing_within_the_bound(
    make_facts: MakeFacts, redis: RedisServer
) -> None:
    """With Redis stopped a recall answers None within one bounded wait, then at once, and
    remembering never raises."""
    facts = make_facts(redis.url)
    redis.stop()
    started = time.monotonic()
    assert await facts.recall(WORKSPACE) is None
    assert time.monotonic() - started < 1.0
    started = time.monotonic()
    await facts.remember(WORKSPACE, {"mms": MMS})
    assert await facts.recall(WORKSPACE) is None
    assert time.monotonic() - started < 0.05


def _set_raw(redis: RedisServer, key: str, value: bytes) -> None:
    """SET with arbitrary bytes (redis-cli's arguments are text)."""
    command = b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
        len(key),
        key.encode(),
        len(value),
        value,
    )
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(str(redis.socket))
        conn.sendall(command)
        assert conn.recv(16).startswith(b"+OK")
