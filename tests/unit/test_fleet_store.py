"""Stores sharing one real Redis: adopt what the fleet holds, refresh once under the lease,
and refresh alone when Redis cannot be used."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from broker.cache import Entry, Policy, Refresher, Store
from broker.config import FleetConfig, RefreshConfig, SecretBytes
from broker.errors import UnavailableError
from broker.fleet import Fleet
from broker.models import AccessToken, AuthKind, fingerprint
from broker.saved_credentials import Saved
from tests.conftest import RedisServer, logged
from tests.unit.fakes import FakeClock, FakeProvider

pytestmark = pytest.mark.timeout(30)

KEY = bytes(range(32))


@dataclass
class Broker:
    """One broker's store, its provider and its part in the fleet."""

    store: Store
    provider: FakeProvider
    fleet: Fleet


MakeBroker = Callable[..., Broker]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(time.time())


@pytest.fixture
async def make_broker(redis: RedisServer, clock: FakeClock) -> AsyncIterator[MakeBroker]:
    """Brokers of one service "svc" on the test's Redis, sharing the fake clock."""
    made: list[Broker] = []

    def make(
        url: str | None = None, *, gated: bool = False, lease_s: float = 2.0, notices: bool = True
    ) -> Broker:
        config = FleetConfig(
            True,
            url or redis.unix_url,
            encryption_key=SecretBytes(KEY),
            lease_s=lease_s,
            connect_timeout_s=0.3,
            command_timeout_s=0.3,
        )
        fleet = Fleet(config, lambda name: fingerprint("test", name))
        provider = FakeProvider(gated=gated)
        store = Store([provider], Policy(RefreshConfig(retry_min_s=0.0)), clock)
        store.share(fleet)
        if notices:
            fleet.watch(["svc"])
        broker = Broker(store, provider, fleet)
        made.append(broker)
        return broker

    yield make
    for broker in made:
        await broker.fleet.close()


def token(clock: FakeClock, value: str, life: float = 100.0) -> AccessToken:
    return AccessToken(value, AuthKind.TOKEN, clock.now + life, clock.now + life / 2)


async def fetch_started(broker: Broker) -> None:
    """Return once the broker's provider has been asked for a credential."""
    for _ in range(500):
        if broker.provider.calls:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the provider was never asked")


async def refresh_if_due(broker: Broker, clock: FakeClock) -> None:
    """What the refresher does when a broker's time comes: fetch if still due (a notice
    may have brought a newer credential meanwhile)."""
    refresh_by = broker.store.refresh_by(broker.store.entry("svc"))
    if refresh_by is None or refresh_by <= clock.now:
        await broker.store.fetch("svc")


async def test_a_starting_broker_adopts_the_fleets_credential(
    make_broker: MakeBroker, clock: FakeClock
) -> None:
    """The first broker fetches and shares; the next is served with no upstream call."""
    first, second = make_broker(), make_broker()
    first.provider.outcomes.append(token(clock, "tok-1"))
    await first.store.fetch("svc")
    await second.store.fetch("svc")
    entry = second.store.entry("svc")
    assert entry.token is not None and entry.token.value == "tok-1"
    assert (first.provider.calls, second.provider.calls) == (1, 0)
    assert (first.store.entry("svc").origin, entry.origin) == ("azure", "fleet")
    assert entry.obtained_at == first.store.entry("svc").obtained_at


async def test_when_due_one_broker_fetches_and_the_rest_adopt(
    make_broker: MakeBroker, clock: FakeClock
) -> None:
    """At the refresh time the broker that comes first fetches; the others then find a
    newer credential and adopt it."""
    brokers = [make_broker() for _ in range(4)]
    brokers[0].provider.outcomes.append(token(clock, "tok-1"))
    for broker in brokers:
        await broker.store.credential("svc")  # fetches only what it does not hold yet
    clock.now += 50  # the credential is due (its refresh_by)
    brokers[2].provider.outcomes.append(token(clock, "tok-2"))
    for broker in (brokers[2], brokers[0], brokers[1], brokers[3]):
        await refresh_if_due(broker, clock)
    assert [b.provider.calls for b in brokers] == [1, 0, 1, 0]
    tokens = [b.store.entry("svc").token for b in brokers]
    assert {t.value if t else None for t in tokens} == {"tok-2"}


async def test_waiters_adopt_when_the_lease_holder_shares(
    make_broker: MakeBroker, clock: FakeClock
) -> None:
    """Brokers due while another holds the lease wait for its notice and adopt its
    credential: one upstream call however many ask."""
    holder = make_broker(gated=True)
    waiters = [make_broker() for _ in range(5)]
    holder.provider.outcomes.append(token(clock, "tok-1"))
    fetching = holder.store.fetch("svc")
    await fetch_started(holder)  # the holder has the lease and is fetching
    waiting = [asyncio.ensure_future(w.store.fetch("svc")) for w in waiters]
    await asyncio.sleep(0.2)
    assert not any(task.done() for task in waiting)
    holder.provider.gate.set()
    started = time.monotonic()
    await fetching
    await asyncio.gather(*waiting)
    assert time.monotonic() - started < 1.0  # woken by the notice, not at a deadline
    assert sum(w.provider.calls for w in waiters) == 0
    assert {w.store.entry("svc").origin for w in waiters} == {"fleet"}


async def test_a_notice_brings_every_broker_the_new_credential(
    make_broker: MakeBroker, clock: FakeClock
) -> None:
    """A broker not due adopts another's newer credential as soon as its notice comes."""
    one, other = make_broker(), make_broker()
    one.provider.outcomes.append(token(clock, "tok-1"))
    await one.store.fetch("svc")
    await other.store.credential("svc")
    await asyncio.wait_for(other.fleet.listening.wait(), 10)
    adopted: asyncio.Future[Entry] = asyncio.get_running_loop().create_future()

    def result(entry: Entry) -> None:
        if not adopted.done():
            adopted.set_result(entry)

    other.store.on_result(result)
    clock.now += 45
    one.provider.outcomes.append(token(clock, "tok-2"))
    await one.store.fetch("svc")
    await asyncio.wait_for(adopted, 10)
    assert other.store.entry("svc").token is not None
    assert other.store.entry("svc").token.value == "tok-2"  # type: ignore[union-attr]
    assert other.provider.calls == 0


async def test_an_unusable_shared_credential_is_not_adopted(
    make_broker: MakeBroker, clock: FakeClock, logs: io.StringIO
) -> None:
    """A shared credential within its clock-skew allowance is judged as a fetched one:
    refused, and fetched anew."""
    one, other = make_broker(), make_broker()
    one.provider.outcomes.append(token(clock, "tok-1", life=100.0))
    await one.store.fetch("svc")
    clock.now += 95  # 5 s left: within the 10 s allowance
    other.provider.outcomes.append(token(clock, "tok-2"))
    await other.store.fetch("svc")
    assert other.provider.calls == 1 and other.store.entry("svc").origin == "azure"
    assert logged(logs, "fleet.entry_unusable")


async def test_a_due_shared_credential_is_served_while_the_fleet_refreshes(
    make_broker: MakeBroker, clock: FakeClock
) -> None:
    """A broker starting when the fleet's credential is due serves it at once, and keeps
    serving it when its own refresh fails (the region is down)."""
    one, late = make_broker(), make_broker()
    one.provider.outcomes.append(token(clock, "tok-1"))
    await one.store.fetch("svc")
    clock.now += 60  # past refresh_by, still valid
    late.provider.outcomes.append(UnavailableError("region down", status=503))
    with pytest.raises(UnavailableError):
        await late.store.fetch("svc")
    entry = await late.store.credential("svc")
    assert entry.token is not None and entry.token.value == "tok-1"
    assert entry.origin == "fleet" and late.provider.calls == 1


async def test_redis_down_refreshes_alone_within_the_bound(
    make_broker: MakeBroker, clock: FakeClock, redis: RedisServer, logs: io.StringIO
) -> None:
    """With Redis stopped the broker fetches on its own after one bounded wait, and says
    so once; sharing resumes when Redis is back."""
    broker = make_broker(redis.url)
    redis.stop()
    broker.provider.outcomes += [token(clock, "tok-1"), token(clock, "tok-2", life=200)]
    started = time.monotonic()
    await broker.store.fetch("svc")
    assert time.monotonic() - started < 1.0
    assert broker.store.entry("svc").origin == "azure" and broker.provider.calls == 1
    assert len(logged(logs, "fleet.unavailable")) == 1
    redis.start()
    await broker.store.fetch("svc")
    other = make_broker(redis.url)
    await other.store.fetch("svc")
    assert other.provider.calls == 0 and other.store.entry("svc").token.value == "tok-2"  # type: ignore[union-attr]
    assert logged(logs, "fleet.recovered")


async def test_a_holder_slower_than_the_wait_leaves_the_others_to_refresh_alone(
    make_broker: MakeBroker, clock: FakeClock, logs: io.StringIO
) -> None:
    """A lease held without any credential shared for two lease_s: the waiter fetches."""
    holder, waiter = make_broker(gated=True, lease_s=0.5), make_broker(lease_s=0.5)
    holder.provider.outcomes.append(token(clock, "tok-1"))
    fetching = asyncio.ensure_future(holder.store.fetch("svc"))
    await fetch_started(holder)
    waiter.provider.outcomes.append(token(clock, "tok-2", life=120))
    await waiter.store.fetch("svc")
    assert waiter.provider.calls == 1 and logged(logs, "fleet.lease_wait_over")
    holder.provider.gate.set()
    await fetching
    shared = await waiter.fleet.read("svc")
    assert shared is not None and shared.token.value == "tok-2"  # the newer stays


async def test_a_lease_taken_just_after_another_shared_adopts_instead(
    make_broker: MakeBroker, clock: FakeClock
) -> None:
    """A broker that read the old entry and takes the lease just after another shared a
    new one and released it reads again under the lease, adopts, and does not fetch.
    `late` hears no notices: one would adopt the new entry on its own, at a moment of the
    event loop's choosing, and hide what this test looks at."""
    one, late = make_broker(), make_broker(notices=False)
    one.provider.outcomes.append(token(clock, "tok-1"))
    await one.store.fetch("svc")
    entry = await late.store.credential("svc")
    held = (entry.token, entry.obtained_at)
    clock.now += 50
    one.provider.outcomes.append(token(clock, "tok-2"))
    await one.store.fetch("svc")  # shared and released while `late` was between its steps
    entry.token, entry.obtained_at = held  # what `late` held when it last read
    got = await late.store._lease_or_adoption(entry, late.fleet)
    assert isinstance(got, Saved) and got.token.value == "tok-2"
    assert await one.fleet.lease("svc") is not None  # the lease was given back
    assert late.provider.calls == 0


async def _until_serving(broker: Broker, value: str) -> None:
    """Wait until the broker serves `value` (a notice's adoption runs on its own)."""
    for _ in range(200):
        token = broker.store.entry("svc").token
        if token is not None and token.value == value:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the broker never served {value}")


async def test_a_client_refresh_window_is_the_fleets(
    make_broker: MakeBroker, clock: FakeClock, logs: io.StringIO
) -> None:
    """A client's refresh on one broker refreshes for the fleet: within the window another
    broker's client refresh adopts or keeps that credential with no Azure call; past the
    window it refreshes."""
    fetcher, adopter, keeper = make_broker(), make_broker(notices=False), make_broker()
    fetcher.provider.outcomes.append(token(clock, "tok-1"))
    for broker in (fetcher, adopter, keeper):
        await broker.store.credential("svc")
    clock.now += 11  # past every broker's own window (10 s)
    fetcher.provider.outcomes.append(token(clock, "tok-2"))
    assert (await fetcher.store.refresh_now("svc")).token.value == "tok-2"  # type: ignore[union-attr]
    await _until_serving(keeper, "tok-2")  # by the notice
    clock.now += 2
    assert (await adopter.store.refresh_now("svc")).token.value == "tok-2"  # type: ignore[union-attr]
    assert (await keeper.store.refresh_now("svc")).token.value == "tok-2"  # type: ignore[union-attr]
    assert (fetcher.provider.calls, adopter.provider.calls, keeper.provider.calls) == (2, 0, 0)
    assert logged(logs, "token.refresh_within_window")
    clock.now += 10  # past the fleet's window
    keeper.provider.outcomes.append(token(clock, "tok-3"))
    assert (await keeper.store.refresh_now("svc")).token.value == "tok-3"  # type: ignore[union-attr]
    assert keeper.provider.calls == 1


class RecordingJobs:
    """The refresher's jobs, kept for the test to run when it chooses."""

    def __init__(self) -> None:
        self.jobs: dict[str, tuple[float, Callable[[], Awaitable[None]]]] = {}

    def start(self) -> None:
        """Nothing runs on its own."""

    def shutdown(self) -> None:
        self.jobs.clear()

    def at(self, key: str, when: float, job: Callable[[], Awaitable[None]]) -> None:
        self.jobs[key] = (when, job)

    def cancel(self, key: str) -> None:
        self.jobs.pop(key, None)


async def test_a_refresh_run_overtaken_by_an_adoption_makes_no_call(
    make_broker: MakeBroker, clock: FakeClock
) -> None:
    """A scheduled refresh that starts just after another broker's notice brought a newer
    credential (its job moved later meanwhile) makes no upstream call."""
    one, other = make_broker(), make_broker()
    jobs = RecordingJobs()
    Refresher(other.store, jobs)
    one.provider.outcomes.append(token(clock, "tok-1"))
    await one.store.fetch("svc")
    await other.store.credential("svc")  # adopted; its refresh scheduled for tok-1
    due_at, stale_run = jobs.jobs["svc"]
    clock.now = due_at - 0.5
    one.provider.outcomes.append(token(clock, "tok-2"))
    await one.store.fetch("svc")
    await _until_serving(other, "tok-2")  # by the notice; the job moved to tok-2's time
    clock.now = due_at
    await stale_run()  # already handed to the event loop when the job moved
    assert other.provider.calls == 0 and jobs.jobs["svc"][0] > due_at
