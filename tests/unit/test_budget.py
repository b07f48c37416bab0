"""The call budget: a hard cap on upstream fetches that holds even when the policy is
bypassed, in simulated time."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools

import pytest

from broker.cache import Allowance, CallBudget, Policy, Store
from broker.config import RefreshConfig
from broker.errors import UpstreamError
from broker.models import AccessToken
from tests.unit.fakes import SimTime

pytestmark = pytest.mark.timeout(30)


class InstantFailure:
    """A provider that fails at once with an error wrongly marked as one a retry heals."""

    has_scoring_host = True
    scoring_uri = None
    clock_skew_s = None

    def __init__(self, service: str, time: SimTime) -> None:
        self.service = service
        self.time = time
        self.calls: list[float] = []

    async def fetch(self) -> AccessToken:
        self.calls.append(self.time())
        error = UpstreamError("mms.token: HTTP 400 (misclassified)", status=400)
        error.retryable = True
        raise error


async def test_the_budget_holds_when_the_policy_is_bypassed() -> None:
    """A loop calling `fetch` back to back, with pacing made negligible, gets no more
    upstream calls than the bucket allows: its burst, then its rate."""
    time = SimTime()
    budget = CallBudget(Allowance(5, 6.0), Allowance(100, 600.0), clock=time, sleep=time.sleep)
    policy = Policy(RefreshConfig(retry_min_s=1e-9))
    provider = InstantFailure("svc", time)
    store = Store([provider], policy, time, sleep=time.sleep, budget=budget)

    async def hammer() -> None:
        while True:
            with contextlib.suppress(UpstreamError):
                await store.fetch("svc")

    task = asyncio.create_task(hammer())
    await time.advance(600.0)
    task.cancel()
    # Five at once, then one every ten seconds: 5 + 60 in ten minutes.
    assert len(provider.calls) == 5 + 60
    assert provider.calls[4] - provider.calls[0] == pytest.approx(0.0, abs=1e-6)
    gaps = [b - a for a, b in itertools.pairwise(provider.calls[4:])]
    assert min(gaps) == pytest.approx(10.0)
    assert store.entry("svc").budget_waits == 60


async def test_the_principal_bucket_caps_services_together() -> None:
    """Many services of one principal share its bucket: together they never exceed it."""
    time = SimTime()
    budget = CallBudget(Allowance(5, 60.0), Allowance(8, 12.0), clock=time, sleep=time.sleep)
    providers = [InstantFailure(f"s{i}", time) for i in range(4)]
    store = Store(providers, Policy(RefreshConfig(retry_min_s=1e-9)), time, sleep=time.sleep)
    store.budget = budget
    for provider in providers:
        store.entry(provider.service).principal = ("client", "sub")

    async def hammer(service: str) -> None:
        while True:
            with contextlib.suppress(UpstreamError):
                await store.fetch(service)

    tasks = [asyncio.create_task(hammer(p.service)) for p in providers]
    await time.advance(60.0)
    for task in tasks:
        task.cancel()
    assert sum(len(p.calls) for p in providers) == 8 + 12


async def test_exhaustion_is_logged_once_per_episode(logs: io.StringIO) -> None:
    """`upstream.budget_exhausted` is written when a service first waits, not per wait."""
    time = SimTime()
    budget = CallBudget(Allowance(1, 60.0), Allowance(100, 600.0), clock=time, sleep=time.sleep)

    async def spend_many() -> None:
        for _ in range(5):
            await budget.spend("svc", ("c", "s"))

    task = asyncio.create_task(spend_many())
    await time.advance(10.0)
    await task
    assert logs.getvalue().count("upstream.budget_exhausted") == 1


async def test_waiters_sleep_once_and_leave_in_order_one_refill_apart() -> None:
    """A hundred fetches waiting on one principal's bucket each sleep once (not once per
    refill, which woke every waiter at every token) and leave in the order they came, a
    refill apart; one cancelled while it waits gives its call back."""
    time = SimTime()
    sleeps = 0

    async def counted(seconds: float) -> None:
        nonlocal sleeps
        sleeps += 1
        await time.sleep(seconds)

    budget = CallBudget(Allowance(100, 6000.0), Allowance(1, 60.0), clock=time, sleep=counted)
    left: list[tuple[int, float]] = []

    async def fetch(i: int) -> None:
        await budget.spend(f"s{i}", ("client", "sub"))
        left.append((i, time()))

    start = time()
    tasks = [asyncio.create_task(fetch(i)) for i in range(100)]
    await time.advance(0.0)
    tasks[50].cancel()
    await time.advance(200.0)
    assert sleeps == 99  # the first had the bucket's one call
    assert [i for i, _ in left] == [i for i in range(100) if i != 50]
    times = [at - start for _, at in left]
    assert times[0] == 0.0 and times[-1] == pytest.approx(99.0)
    assert min(b - a for a, b in itertools.pairwise(times)) >= 1.0 - 1e-6


async def test_a_cancelled_waiter_gives_its_call_back() -> None:
    """A fetch cancelled while it waits for the budget does not leave its call reserved:
    the next one waits for one refill, not two."""
    time = SimTime()
    budget = CallBudget(Allowance(1, 60.0), Allowance(100, 6000.0), clock=time, sleep=time.sleep)
    await budget.spend("svc", ("c", "s"))  # the bucket's one call
    waiting = asyncio.create_task(budget.spend("svc", ("c", "s")))
    await time.advance(0.0)
    waiting.cancel()
    await time.advance(0.0)
    start = time()
    done_at: list[float] = []

    async def later() -> None:
        await budget.spend("svc", ("c", "s"))
        done_at.append(time() - start)

    task = asyncio.create_task(later())
    await time.advance(5.0)
    await task
    assert done_at == [pytest.approx(1.0)]  # 2.0 had the cancelled call kept its place
