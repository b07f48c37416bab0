"""The store: one fetch in flight per service, states derived from facts, stale serving."""

from __future__ import annotations

import asyncio
import math

import pytest

from broker.cache import Policy, Store
from broker.errors import (
    NotReadyError,
    UnavailableError,
    UnknownServiceError,
    UnusableCredentialError,
)
from broker.models import AccessToken, AuthKind, State
from tests.unit.fakes import FakeClock, FakeProvider

pytestmark = pytest.mark.timeout(5)


def token(clock: FakeClock, value: str = "tok-1") -> AccessToken:
    return AccessToken(value, AuthKind.TOKEN, clock.now + 100, clock.now + 50)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def provider(clock: FakeClock) -> FakeProvider:
    return FakeProvider(gated=True)


@pytest.fixture
def store(provider: FakeProvider, clock: FakeClock) -> Store:
    return Store([provider], Policy(), clock)


async def test_concurrent_cold_requests_share_one_fetch(
    store: Store, provider: FakeProvider, clock: FakeClock
) -> None:
    """Many clients asking at once for an empty entry cause one upstream fetch."""
    provider.outcomes.append(token(clock))
    waiters = [asyncio.create_task(store.credential("svc")) for _ in range(50)]
    await asyncio.sleep(0)
    provider.gate.set()
    entries = await asyncio.gather(*waiters)
    assert provider.calls == 1
    assert {e.token.value for e in entries if e.token} == {"tok-1"}


async def test_failed_refresh_keeps_serving_the_valid_token(
    store: Store, provider: FakeProvider, clock: FakeClock
) -> None:
    """A failed refresh leaves the valid token served and the state stale, then expired."""
    provider.gate.set()
    provider.outcomes += [token(clock), UnavailableError("mms.token: HTTP 500", status=500)]
    await store.fetch("svc")
    with pytest.raises(UnavailableError):
        await store.fetch("svc")
    entry = await store.credential("svc")
    assert entry.token is not None and entry.token.value == "tok-1"
    assert store.state(entry) is State.STALE
    clock.now += 95
    with pytest.raises(NotReadyError, match="HTTP 500") as refused:
        await store.credential("svc")
    assert refused.value.retry_after is not None and refused.value.retry_after >= 1
    assert store.state(entry) is State.EXPIRED
    assert provider.calls == 2  # a client asking never triggers a retry storm


async def test_states_through_a_lifecycle(
    store: Store, provider: FakeProvider, clock: FakeClock
) -> None:
    """refreshing → failed → fresh, and a changed token bumps the generation."""
    entry = store.entry("svc")
    assert store.state(entry) is State.REFRESHING
    provider.gate.set()
    provider.outcomes += [UnavailableError("down"), token(clock), token(clock, "tok-2")]
    with pytest.raises(UnavailableError):
        await store.fetch("svc")
    assert store.state(entry) is State.FAILED
    await store.fetch("svc")
    assert store.state(entry) is State.FRESH and entry.failures == 0
    generation = entry.generation
    await store.fetch("svc")
    assert entry.generation == generation + 1


async def test_a_token_that_dies_before_the_one_served_is_refused(
    store: Store, provider: FakeProvider, clock: FakeClock
) -> None:
    """A usable token that would expire before the one being served does not replace it:
    the refresh failed (its reason says why, not the value), the served token stays, and
    one that lives as long or longer is taken."""
    provider.gate.set()
    first = token(clock)
    shorter = AccessToken("tok-short", AuthKind.TOKEN, clock.now + 40, clock.now + 20)
    provider.outcomes += [first, shorter, token(clock, "tok-2")]
    await store.fetch("svc")
    with pytest.raises(UnusableCredentialError, match=r"expires 60\.0 s before") as refused:
        await store.fetch("svc")
    assert "tok-short" not in str(refused.value)
    entry = await store.credential("svc")
    assert entry.token is first and store.state(entry) is State.STALE
    await store.fetch("svc")  # the same expiry: taken
    assert entry.token is not None and entry.token.value == "tok-2"


async def test_unknown_service(store: Store) -> None:
    """Asking for a service that is not configured is UnknownServiceError."""
    with pytest.raises(UnknownServiceError):
        await store.credential("other")


async def test_a_crashing_provider_costs_one_refresh(
    store: Store, provider: FakeProvider, clock: FakeClock
) -> None:
    """A bug in a provider is recorded as a failed refresh, never raised past the store."""
    provider.gate.set()
    provider.outcomes.append(ZeroDivisionError())
    with pytest.raises(Exception, match="internal error"):
        await store.fetch("svc")
    assert store.state(store.entry("svc")) is State.FAILED


async def test_a_credential_is_usable_exactly_until_its_serve_until(
    store: Store, provider: FakeProvider, clock: FakeClock
) -> None:
    """`serve_until` is the moment `usable` turns false (the front door judges by it):
    minus infinity before any credential, the policy's deadline for a token."""
    entry = store.entry(provider.service)
    assert store.serve_until(entry) == -math.inf and not store.usable(entry)
    provider.outcomes.append(token(clock))
    provider.gate.set()
    await store.credential(provider.service)
    until = store.serve_until(entry)
    assert entry.token is not None and entry.obtained_at is not None
    assert until == store.policy.serve_until(entry.token, entry.obtained_at)
    assert until < math.inf
    clock.now = until - 0.001
    assert store.usable(entry)
    clock.now = until
    assert not store.usable(entry)
