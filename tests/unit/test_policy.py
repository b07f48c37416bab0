"""Refresh timing is pure maths of the token's own numbers."""

from __future__ import annotations

import random

import pytest

from broker.cache.policy import Policy
from broker.config import RefreshConfig
from broker.models import AccessToken, AuthKind

T0 = 1_000_000.0
pytestmark = pytest.mark.timeout(5)


def token(expires_in: float, refresh_after: float | None) -> AccessToken:
    hint = None if refresh_after is None else T0 + refresh_after
    return AccessToken("t", AuthKind.TOKEN, T0 + expires_in, hint)


def policy(**overrides: float) -> Policy:
    return Policy(RefreshConfig(**overrides), random.Random(7))  # type: ignore[arg-type]  # floats only: tests override seconds


def test_refresh_happens_before_refresh_after() -> None:
    """An hour token with refreshAfter at 30 min is refreshed a margin plus jitter before it."""
    at = policy().refresh_at(token(3600, 1800), T0)
    assert T0 + 1800 - 60 - 10 <= at <= T0 + 1800 - 60


@pytest.mark.parametrize(
    ("refresh_after", "why"),
    [(None, "absent"), (-5, "already past"), (4000, "after expiry"), (3600, "at expiry")],
)
def test_unusable_refresh_after_falls_back_to_lifetime_fraction(
    refresh_after: float | None, why: str
) -> None:
    """A refreshAfter that is absent, past or beyond expiry is replaced by half the lifetime."""
    p = policy()
    assert p.refresh_by(token(3600, refresh_after), T0) == T0 + 1800, why
    assert p.refresh_at(token(3600, refresh_after), T0) < T0 + 1800


def test_margins_scale_with_short_lifetimes() -> None:
    """A 4 s token is refreshed well inside its 2 s refreshAfter, not 60 s early."""
    at = policy().refresh_at(token(4, 2), T0)
    assert T0 + 1.2 <= at < T0 + 2


def test_never_served_at_or_past_expiry() -> None:
    """A token stops being served a skew allowance before expiry."""
    p = policy(clock_skew_s=30)
    t = token(3600, 1800)
    assert p.servable(t, T0, T0 + 3569)
    assert not p.servable(t, T0, T0 + 3570)
    assert not p.servable(t, T0, T0 + 3600)
    short = token(10, 5)
    assert p.servable(short, T0, T0 + 8.9) and not p.servable(short, T0, T0 + 9.0)


def test_keys_never_expire_and_are_relisted_on_interval() -> None:
    """A key is always servable and is re-listed after key_interval_s."""
    p = policy(key_interval_s=600)
    key = AccessToken("k", AuthKind.KEY, None)
    assert p.servable(key, T0, T0 + 10**9)
    assert p.refresh_by(key, T0) == T0 + 600


def test_backoff_grows_is_capped_and_honours_retry_after() -> None:
    """Retries back off exponentially with jitter, up to the cap, never sooner than Retry-After."""
    p = policy(retry_min_s=1, retry_max_s=30)
    assert all(1 <= p.retry_in(1, None, True) <= 1 for _ in range(20))
    assert all(1 <= p.retry_in(4, None, True) <= 8 for _ in range(50))
    assert all(p.retry_in(20, None, True) <= 30 for _ in range(50))
    assert p.retry_in(1, 120, True) == 120


def test_faults_only_an_operator_can_fix_back_off_long() -> None:
    """A non-retryable error (bad secret, missing role) waits at least a minute."""
    assert policy(retry_max_s=5).retry_in(1, None, False) == 60


def test_max_attempts_is_the_worst_case_of_the_policy() -> None:
    """The bound counts the densest sequence the policy allows: failing streaks whose
    spacing doubles, reset by successes at the shortest lead; never fewer than a failing
    streak alone makes."""
    p = policy(retry_min_s=1, retry_max_s=8)
    # A failing streak alone: attempts at 0, 1, 2, 4, 8, 12, 16, 20 (gaps 1, 1, 2, 4, 4, …).
    assert p.max_attempts(20, shortest_lead_s=1000) == 8
    # A success every 1.5 s resets the streak: 0, 1, 2 (fail, fail), 3.5 (success)… is denser.
    assert p.max_attempts(20, shortest_lead_s=1.5) > 8
    assert p.max_attempts(20, shortest_lead_s=1.5) <= 21
