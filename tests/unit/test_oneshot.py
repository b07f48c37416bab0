"""The first fetches of `token-broker once` in simulated time: retried on the policy while a
retry can help and can start before the deadline, cut at the deadline."""

from __future__ import annotations

import asyncio

import pytest

from broker.cache import Policy, Store
from broker.config import RefreshConfig
from broker.errors import PermissionDeniedError, ThrottledError, UnavailableError
from broker.models import AccessToken, AuthKind
from broker.oneshot import FirstFetches
from tests.unit.fakes import FakeProvider, SimTime, settle

pytestmark = pytest.mark.timeout(5)

POLICY = RefreshConfig(retry_min_s=1.0, retry_max_s=8.0)


class TimedProvider(FakeProvider):
    """A fake provider that also notes when, in simulated time, each fetch was asked."""

    def __init__(self, time: SimTime, *, gated: bool = False) -> None:
        super().__init__(gated=gated)
        self.time = time
        self.asked_at: list[float] = []

    async def fetch(self) -> AccessToken:
        self.asked_at.append(self.time.now)
        return await super().fetch()


def store_of(time: SimTime, provider: FakeProvider) -> Store:
    return Store([provider], Policy(POLICY), time, sleep=time.sleep)


def token(time: SimTime) -> AccessToken:
    return AccessToken("tok-1", AuthKind.TOKEN, time.now + 600, time.now + 300)


async def test_failures_a_retry_heals_are_retried_on_the_policy_until_one_succeeds() -> None:
    """Two 503s then a token: three attempts, spaced by the policy's backoff, and a token."""
    time = SimTime()
    provider = TimedProvider(time)
    provider.outcomes += [UnavailableError("HTTP 503"), UnavailableError("HTTP 503"), token(time)]
    store = store_of(time, provider)
    fetches = FirstFetches(store, time.sleep)
    run = asyncio.ensure_future(fetches.run(["svc"], deadline=time.now + 60))
    await time.advance(30)
    assert run.done() and fetches.attempts == {"svc": 3}
    assert store.usable(store.entry("svc")) and not fetches.cut and not fetches.gave_up
    gaps = [b - a for a, b in zip(provider.asked_at, provider.asked_at[1:], strict=False)]
    assert all(gap >= POLICY.retry_min_s for gap in gaps), gaps


async def test_a_failure_only_an_operator_can_fix_is_not_retried() -> None:
    """A 403 ends the service's fetching at once, with one attempt and the reason why."""
    time = SimTime()
    provider = TimedProvider(time)
    provider.outcomes.append(PermissionDeniedError("HTTP 403", status=403))
    fetches = FirstFetches(store_of(time, provider), time.sleep)
    started = time.now
    await fetches.run(["svc"], deadline=time.now + 60)
    assert (fetches.attempts, provider.calls, time.now) == ({"svc": 1}, 1, started)
    assert "only an operator" in fetches.gave_up["svc"]


async def test_no_retry_is_waited_for_that_would_start_after_the_deadline() -> None:
    """A 429 asking for 100 s with 10 s left ends the run at once, not at the deadline."""
    time = SimTime()
    provider = TimedProvider(time)
    provider.outcomes.append(ThrottledError("HTTP 429", status=429, retry_after=100.0))
    fetches = FirstFetches(store_of(time, provider), time.sleep)
    started = time.now
    await fetches.run(["svc"], deadline=time.now + 10)
    assert time.now == started and provider.calls == 1
    assert "after the deadline" in fetches.gave_up["svc"]


async def test_a_fetch_still_under_way_at_the_deadline_is_cut_there() -> None:
    """A fetch that never answers is cut at the deadline exactly, and nothing is left in
    flight; a service that answered meanwhile keeps its credential."""
    time = SimTime()
    hung = TimedProvider(time, gated=True)
    quick = FakeProvider("quick")
    quick.outcomes.append(token(time))
    store = Store([hung, quick], Policy(POLICY), time, sleep=time.sleep)
    fetches = FirstFetches(store, time.sleep)
    run = asyncio.ensure_future(fetches.run(["svc", "quick"], deadline=time.now + 5))
    await time.advance(4.9)
    assert not run.done() and store.usable(store.entry("quick"))
    await time.advance(0.1)
    await settle()
    assert run.done() and fetches.cut == {"svc"}
    assert store.entry("svc").inflight is None and store.entry("svc").token is None
