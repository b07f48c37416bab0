"""The fleet against a real redis-server: entries, leases, notices, bounded failures."""

from __future__ import annotations

import asyncio
import io
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from broker.config import FleetConfig, Secret, SecretBytes
from broker.errors import FleetUnavailableError
from broker.fleet import Fleet, HoldBacks
from broker.fleet.shared import _unless_cancelled
from broker.models import AccessToken, AuthKind, fingerprint
from broker.saved_credentials import Saved
from tests.conftest import RedisServer, logged

pytestmark = pytest.mark.timeout(30)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
IDENTITIES = {
    "fraud": fingerprint("cloud", "tenant", "client", "fraud"),
    "churn": fingerprint("cloud", "tenant", "client", "churn"),
}
VALUE = "shared-token-VALUE-0001"


def saved(value: str = VALUE, expires_in: float = 600.0) -> Saved:
    now = time.time()
    return Saved(AccessToken(value, AuthKind.TOKEN, now + expires_in, now + expires_in / 2), now)


def fleet_config(url: str, **changes: Any) -> FleetConfig:
    options: dict[str, Any] = {
        "enabled": True,
        "redis_url": url,
        "encryption_key": SecretBytes(KEY),
        "lease_s": 3.0,
        "connect_timeout_s": 0.5,
        "command_timeout_s": 0.5,
    }
    options.update(changes)
    return FleetConfig(**options)


MakeFleet = Callable[..., Fleet]


@pytest.fixture
async def make_fleet(redis: RedisServer) -> AsyncIterator[MakeFleet]:
    """Fleets (brokers' parts) on the test's Redis, closed after the test."""
    made: list[Fleet] = []

    def make(url: str | None = None, **changes: Any) -> Fleet:
        fleet = Fleet(fleet_config(url or redis.unix_url, **changes), IDENTITIES.get)
        made.append(fleet)
        return fleet

    yield make
    for fleet in made:
        await fleet.close()


async def test_a_written_entry_is_read_by_another_broker(
    make_fleet: MakeFleet, redis: RedisServer
) -> None:
    """What one broker writes, another reads back whole; Redis holds no plaintext token."""
    one, other = make_fleet(), make_fleet(redis.url)
    assert await other.read("fraud") is None
    credential = saved()
    assert await one.write("fraud", credential, 600.0)
    assert await other.read("fraud") == credential
    keys = one.keys("fraud")
    assert keys is not None
    assert VALUE.encode() not in redis.command("GET", keys.credential)
    assert 595_000 < int(redis.command("PTTL", keys.credential)) <= 600_000


async def test_an_older_credential_never_replaces_a_newer_one(make_fleet: MakeFleet) -> None:
    """The write is compare-and-set on the stamp: the shared entry never goes backwards."""
    one, two = make_fleet(), make_fleet()
    newer, older = saved("newer-token-0001", 900.0), saved("older-token-0001", 600.0)
    assert await one.write("fraud", newer, 900.0)
    assert not await two.write("fraud", older, 600.0)
    assert not await two.write("fraud", newer, 900.0)  # the same: nothing to do
    found = await two.read("fraud")
    assert found is not None and found.token.value == "newer-token-0001"


async def test_one_lease_at_a_time_released_only_by_its_holder(
    make_fleet: MakeFleet, redis: RedisServer
) -> None:
    """A lease is held by one broker; release deletes it only while it is still ours."""
    one, two = make_fleet(), make_fleet()
    lease = await one.lease("fraud")
    assert lease is not None and await two.lease("fraud") is None
    await lease.release()
    second = await two.lease("fraud")
    assert second is not None
    keys = one.keys("fraud")
    assert keys is not None
    redis.command("SET", keys.lease, "someone-else")
    await second.release()
    assert redis.command("GET", keys.lease).strip() == b"someone-else"


async def test_a_dead_holders_lease_lapses_after_lease_s(make_fleet: MakeFleet) -> None:
    """A lease never renewed (its broker died) lapses after lease_s and another takes it."""
    one, two = make_fleet(lease_s=0.6, command_timeout_s=0.2), make_fleet()
    lease = await one.lease("fraud")
    assert lease is not None
    lease._renewer.cancel()  # the holder dies: nothing renews its lease any more
    assert await two.lease("fraud") is None
    await asyncio.sleep(0.8)
    assert await two.lease("fraud") is not None


async def test_a_live_holder_keeps_its_lease_beyond_lease_s(make_fleet: MakeFleet) -> None:
    """A holder renews its lease (compare-and-extend) while it fetches."""
    one, two = make_fleet(lease_s=0.6, command_timeout_s=0.2), make_fleet()
    lease = await one.lease("fraud")
    assert lease is not None
    await asyncio.sleep(1.5)
    assert lease.held and await two.lease("fraud") is None
    await lease.release()


async def test_a_lease_taken_away_is_noticed_as_lost(
    make_fleet: MakeFleet, redis: RedisServer, logs: io.StringIO
) -> None:
    """When the lease no longer holds our value, the holder learns it has lost it."""
    one = make_fleet(lease_s=0.6, command_timeout_s=0.2)
    lease = await one.lease("fraud")
    assert lease is not None
    keys = one.keys("fraud")
    assert keys is not None
    redis.command("SET", keys.lease, "another-broker")
    await asyncio.sleep(0.5)
    assert not lease.held and logged(logs, "fleet.lease_lost")
    await lease.release()


async def test_a_write_wakes_the_brokers_waiting(make_fleet: MakeFleet) -> None:
    """A broker waiting on a lease is woken by the writer's notice, well before its poll."""
    writer, waiter = make_fleet(), make_fleet()
    heard: list[str] = []
    waiter.on_notice(heard.append)
    waiter.watch(["fraud", "churn"])
    await _subscribed(waiter)
    started = time.monotonic()
    waiting = asyncio.create_task(waiter.wait("fraud", 10.0))
    await asyncio.sleep(0)  # the waiter is waiting
    await writer.write("fraud", saved(), 600.0)
    await waiting
    assert time.monotonic() - started < 2.0
    assert heard == ["fraud"]


async def _subscribed(fleet: Fleet) -> None:
    """Wait until Redis has confirmed `fleet`'s subscription to its notices."""
    await asyncio.wait_for(fleet.listening.wait(), 10)


@pytest.mark.parametrize("damage", ["altered", "moved", "other_key", "garbage"])
async def test_untrustworthy_entries_are_ignored_then_replaced(
    make_fleet: MakeFleet, redis: RedisServer, logs: io.StringIO, damage: str
) -> None:
    """An altered entry, one moved from another service, one written with another key or
    plain garbage reads as nothing, is logged once, and the next good write replaces it."""
    one = make_fleet()
    fraud, churn = one.keys("fraud"), one.keys("churn")
    assert fraud is not None and churn is not None
    credential = saved(expires_in=10_000.0)  # a stamp later than the good write's below
    if damage == "other_key":
        await make_fleet(encryption_key=SecretBytes(OTHER_KEY)).write("fraud", credential, 600)
    else:
        await one.write("churn" if damage == "moved" else "fraud", credential, 600)
        value = redis.command("GET", churn.credential if damage == "moved" else fraud.credential)
        value = value[:-1]  # redis-cli's newline
        if damage == "altered":
            value = value[:-1] + bytes([value[-1] ^ 1])
        elif damage == "garbage":
            value = b"not an entry"
        _set_raw(redis, fraud.credential, value)
    assert await one.read("fraud") is None
    assert await one.read("fraud") is None
    ignored = logged(logs, "fleet.entry_ignored")
    assert len(ignored) == 1 and ignored[0]["service"] == "fraud"
    good = saved("good-token-0001")
    assert await one.write("fraud", good, 600)
    assert await one.read("fraud") == good


def _set_raw(redis: RedisServer, key: str, value: bytes) -> None:
    """SET with arbitrary bytes (redis-cli's arguments are text)."""
    import socket as sockets

    command = b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
        len(key),
        key.encode(),
        len(value),
        value,
    )
    with sockets.socket(sockets.AF_UNIX) as conn:
        conn.connect(str(redis.socket))
        conn.sendall(command)
        assert conn.recv(16).startswith(b"+OK")


async def test_redis_stopped_fails_fast_says_so_once_and_recovers(
    make_fleet: MakeFleet, redis: RedisServer, logs: io.StringIO
) -> None:
    """With Redis stopped every call fails within its bound; `fleet.unavailable` is logged
    once, and `fleet.recovered` once Redis answers again."""
    fleet = make_fleet(redis.url)
    await fleet.write("fraud", saved(), 600)
    redis.stop()
    for _ in range(3):
        started = time.monotonic()
        with pytest.raises(FleetUnavailableError) as caught:
            await fleet.read("fraud")
        assert time.monotonic() - started < 1.5
    assert caught.value.operation == "read" and "did not answer" in caught.value.message
    assert not await fleet.write("fraud", saved(), 600)  # never raises
    assert fleet.health == "down" and len(logged(logs, "fleet.unavailable")) == 1
    redis.start()
    assert await fleet.read("fraud") is None  # a restarted Redis has lost its entries
    assert fleet.health == "up" and len(logged(logs, "fleet.recovered")) == 1


async def test_a_frozen_redis_costs_one_bounded_wait(
    make_fleet: MakeFleet, redis: RedisServer
) -> None:
    """A Redis that accepts but never answers (stopped with SIGSTOP) fails within the
    command timeout, never hangs."""
    fleet = make_fleet(redis.url)
    await fleet.read("fraud")
    assert redis.process is not None
    redis.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(FleetUnavailableError):
            await fleet.lease("fraud")
        assert time.monotonic() - started < 1.5
    finally:
        redis.process.send_signal(signal.SIGCONT)


async def test_an_acl_user_with_a_password(make_fleet: MakeFleet, redis: RedisServer) -> None:
    """An ACL user limited to the prefix and the commands the broker needs can do its work
    (the scripts' commands included: Redis checks them too), with the fleet up throughout;
    a wrong password is refused with a message that says where to look."""
    # the README's ACL, less +client|setinfo, which Debian's Redis 7.0 does not know
    assert redis.command(
        "ACL", "SETUSER", "broker", "on", ">broker-PASSWORD-1", "resetkeys",
        "~token-broker:*", "resetchannels", "&token-broker:*", "-@all",
        "+get", "+set", "+del", "+pexpire", "+pttl", "+evalsha", "+script|load",
        "+publish", "+subscribe", "+unsubscribe", "+ping", "+client|setname",
    ).strip() == b"OK"  # fmt: skip
    try:
        user = {"username": "broker", "password": Secret("broker-PASSWORD-1")}
        fleet = make_fleet(lease_s=0.6, command_timeout_s=0.2, **user)
        fleet.watch(["fraud"])
        lease = await fleet.lease("fraud")
        assert lease is not None
        await asyncio.sleep(0.5)  # renewed (compare-and-extend) at least once
        assert lease.held
        assert await fleet.write("fraud", saved(), 600)
        await lease.release()  # compare-and-delete: the lease is free at once
        retaken = await make_fleet(**user).lease("fraud")
        assert retaken is not None
        await retaken.release()
        assert await fleet.read("fraud") is not None
        holds = HoldBacks(fleet)
        await holds.hold(("client", "subscription"), 30.0)
        assert await holds.held_for(("client", "subscription")) is not None
        await _subscribed(fleet)
        assert fleet.health == "up"
        wrong = make_fleet(username="broker", password=Secret("wrong-PASSWORD-2"))
        with pytest.raises(FleetUnavailableError) as caught:
            await wrong.read("fraud")
        assert "refused the broker's login" in caught.value.message
        assert "wrong-PASSWORD-2" not in caught.value.message
    finally:
        redis.command("ACL", "DELUSER", "broker")


async def test_a_cancelled_loop_stops_even_when_redis_py_turns_the_cancel_into_an_error() -> None:
    """A retry loop of the fleet whose cancellation comes out of redis-py as a connection
    error stops at once instead of retrying, so a lease's release or a stop never hangs."""
    retries = 0

    async def retrying() -> None:
        nonlocal retries
        while True:
            try:
                try:
                    await asyncio.sleep(10)
                except asyncio.CancelledError:
                    raise FleetUnavailableError("lost", operation="extend") from None
            except FleetUnavailableError:
                _unless_cancelled()
                retries += 1

    task = asyncio.get_running_loop().create_task(retrying())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2)
    assert retries == 0
