"""A 429's hold-back shared through a real Redis: one broker throttled holds the fleet back
for the Retry-After, on each broker's own (fake) clock and Redis's TTL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from broker.config import FleetConfig, SecretBytes
from broker.errors import ThrottledError
from broker.fleet import Fleet, HoldBacks
from broker.fleet.naming import holdback_key
from broker.models import fingerprint
from broker.providers import Throttles
from tests.conftest import RedisServer
from tests.unit.fakes import FakeClock

pytestmark = pytest.mark.timeout(30)

KEY = bytes(range(32))
PAIR = ("11111111-2222-3333-4444-555555555555", "sub-0001")
OTHER_PAIR = (PAIR[0], "sub-0002")


class Commands:
    """The fleet's Redis commands, by operation (its observer)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bool]] = []

    def fleet_command(self, operation: str, seconds: float, ok: bool) -> None:
        self.seen.append((operation, ok))

    def fleet_lease(self, service: str, outcome: str) -> None:
        """Not counted here."""

    def fleet_health(self, up: bool) -> None:
        """Not counted here."""

    def count(self, operation: str) -> int:
        return sum(op == operation for op, _ in self.seen)


MakeThrottles = Callable[..., tuple[Throttles, Commands]]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(time.time())


@pytest.fixture
async def make_throttles(redis: RedisServer, clock: FakeClock) -> AsyncIterator[MakeThrottles]:
    """Each call is one broker's `Throttles`, held back with the fleet on the test's Redis."""
    fleets: list[Fleet] = []

    def make(url: str | None = None, **changes: Any) -> tuple[Throttles, Commands]:
        options: dict[str, Any] = {
            "encryption_key": SecretBytes(KEY),
            "connect_timeout_s": 0.3,
            "command_timeout_s": 0.3,
        }
        options.update(changes)
        config = FleetConfig(True, url or redis.unix_url, **options)
        commands = Commands()
        fleet = Fleet(config, lambda name: fingerprint("test", name), observer=commands)
        fleets.append(fleet)
        return Throttles(clock, HoldBacks(fleet)), commands

    yield make
    for fleet in fleets:
        await fleet.close()


def stored_key(prefix: str = "token-broker:") -> str:
    return holdback_key(prefix, *PAIR)


async def test_one_brokers_429_holds_back_the_others(make_throttles: MakeThrottles) -> None:
    """A 429 noted by one broker makes another refuse to call Azure for that principal and
    subscription, with what is left of the Retry-After; other pairs are not held."""
    throttled, _ = make_throttles()
    other, _ = make_throttles()
    await throttled.note(PAIR, 30.0)
    with pytest.raises(ThrottledError) as caught:
        await other.check(PAIR, "mms.token")
    assert caught.value.status == 429 and caught.value.retry_after is not None
    assert 29.0 < caught.value.retry_after <= 30.0
    assert "another broker of the fleet" in caught.value.message
    await other.check(OTHER_PAIR, "mms.token")  # another subscription: not held


async def test_the_hold_lives_in_redis_for_the_retry_after(
    make_throttles: MakeThrottles, redis: RedisServer
) -> None:
    """The hold-back is a Redis key with a TTL of the Retry-After, named by a digest and
    holding neither the principal nor the subscription; a shorter 429 does not shorten it."""
    first, _ = make_throttles()
    second, _ = make_throttles()
    await first.note(PAIR, 30.0)
    await second.note(PAIR, 2.0)
    key = stored_key()
    assert 28_000 < int(redis.command("PTTL", key)) <= 30_000
    assert redis.command("GET", key).strip() == b"429"
    assert PAIR[0].encode() not in key.encode() and PAIR[1].encode() not in key.encode()


async def test_a_broker_held_back_asks_redis_no_more_until_its_clock_passes_the_hold(
    make_throttles: MakeThrottles, clock: FakeClock
) -> None:
    """Once the fleet's hold-back is read, the broker holds back on its own clock without
    reading Redis again; past it, it reads again."""
    throttled, _ = make_throttles()
    other, commands = make_throttles()
    await throttled.note(PAIR, 20.0)
    for _ in range(3):
        with pytest.raises(ThrottledError):
            await other.check(PAIR, "mms.token")
    assert commands.count("holdback.read") == 1
    clock.now += 21.0
    with pytest.raises(ThrottledError):  # Redis's own clock has not moved: still held there
        await other.check(PAIR, "mms.token")
    assert commands.count("holdback.read") == 2


async def test_when_the_redis_hold_lapses_the_fleet_calls_again(
    make_throttles: MakeThrottles, redis: RedisServer, clock: FakeClock
) -> None:
    """A short Retry-After lapses in Redis (its TTL) and on the broker's clock: the next
    check lets the call through."""
    throttled, _ = make_throttles()
    other, _ = make_throttles()
    await throttled.note(PAIR, 0.3)
    with pytest.raises(ThrottledError):
        await other.check(PAIR, "mms.token")
    for _ in range(200):  # until Redis has expired the key
        if int(redis.command("PTTL", stored_key())) == -2:
            break
        await asyncio.sleep(0.01)
    clock.now += 1.0
    await other.check(PAIR, "mms.token")
    await throttled.check(PAIR, "mms.token")


async def test_redis_down_holds_nobody_back_and_costs_one_bounded_wait(
    make_throttles: MakeThrottles, redis: RedisServer
) -> None:
    """With Redis stopped a 429 is still held by the broker that got it, the others call
    Azure, the first check waits at most the command bound and later ones not at all."""
    throttled, _ = make_throttles(redis.url)
    other, commands = make_throttles(redis.url)
    redis.stop()
    await throttled.note(PAIR, 30.0)  # never raises
    with pytest.raises(ThrottledError):
        await throttled.check(PAIR, "mms.token")
    started = time.monotonic()
    await other.check(PAIR, "mms.token")
    assert time.monotonic() - started < 1.0
    started = time.monotonic()
    await other.check(PAIR, "mms.token")
    assert time.monotonic() - started < 0.05  # the fleet is known to be down: not asked
    assert commands.count("holdback.read") == 1


async def test_deployments_with_other_prefixes_do_not_hold_each_other_back(
    make_throttles: MakeThrottles,
) -> None:
    """A hold-back lives under the fleet's key prefix: another deployment is not held."""
    throttled, _ = make_throttles()
    elsewhere, _ = make_throttles(key_prefix="other-deployment:")
    await throttled.note(PAIR, 30.0)
    await elsewhere.check(PAIR, "mms.token")
