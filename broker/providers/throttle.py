"""Azure throttles per principal and per subscription; so do we, after its first 429.

When one service's call is answered 429, every service sharing that principal and
subscription is held back until `Retry-After` has passed, instead of each of them
spending a call to earn its own 429. Held-back fetches fail at once with a
`ThrottledError` carrying the remaining wait, which the refresher honours.

In fleet mode the hold-back is the fleet's (`SharedHoldBacks`, which `broker.fleet`
implements): a 429 is written beside the shared credentials, and every broker reads it
before calling Azure for that principal and subscription, so the brokers wait it out
together instead of each earning its own 429.
"""

from __future__ import annotations

from typing import Protocol

from broker.errors import ThrottledError
from broker.log import get_logger
from broker.models import Clock, system_clock

log = get_logger("broker.throttle")

ThrottleKey = tuple[str, str]  # (principal, subscription)

DEFAULT_HOLD_S = 10.0  # when a 429 names no Retry-After


class SharedHoldBacks(Protocol):
    """Where a fleet of brokers keeps its hold-backs. Both calls are bounded and never
    raise: a fleet that cannot be reached holds nobody back."""

    async def held_for(self, key: ThrottleKey) -> float | None:
        """Seconds the pair is still held back by some broker of the fleet, or None."""

    async def hold(self, key: ThrottleKey, seconds: float) -> None:
        """Hold the pair back for every broker for `seconds` (a longer hold stays)."""


class Throttles:
    """When each (principal, subscription) pair may call Azure again."""

    def __init__(self, clock: Clock = system_clock, shared: SharedHoldBacks | None = None) -> None:
        self.clock = clock  # the broker's clock, which Azure's times are compared with
        self.shared = shared
        self._until: dict[ThrottleKey, float] = {}

    def share(self, shared: SharedHoldBacks | None) -> None:
        """Hold back with the fleet from now on (None: alone again)."""
        self.shared = shared

    async def check(self, key: ThrottleKey, route: str) -> None:
        """Raise `ThrottledError` without calling Azure while the pair is held back, by
        this broker or (in fleet mode) by another."""
        self._check_here(key, route)
        if self.shared is None:
            return
        remaining = await self.shared.held_for(key)
        if remaining is None or remaining <= 0:
            return
        self._until[key] = max(self._until.get(key, 0.0), self.clock() + remaining)
        log.info(
            "upstream.held_back_by_fleet",
            principal=key[0],
            subscription=key[1],
            route=route,
            hold_s=round(remaining, 1),
        )
        raise ThrottledError(
            f"{route}: not called: Azure throttled principal {key[0]} on subscription "
            f"{key[1]} for another broker of the fleet; holding back for {remaining:.0f} s "
            "as its Retry-After asked",
            status=429,
            retry_after=remaining,
            route=route,
        )

    def _check_here(self, key: ThrottleKey, route: str) -> None:
        until = self._until.get(key)
        if until is None:
            return
        remaining = until - self.clock()
        if remaining <= 0:
            del self._until[key]
            return
        raise ThrottledError(
            f"{route}: not called: Azure throttled principal {key[0]} on subscription "
            f"{key[1]}; holding back for {remaining:.0f} s as its Retry-After asked",
            status=429,
            retry_after=remaining,
            route=route,
        )

    async def note(self, key: ThrottleKey, retry_after: float | None) -> None:
        """Record a 429 for the pair, and share it with the fleet."""
        hold = retry_after if retry_after is not None else DEFAULT_HOLD_S
        until = self.clock() + hold
        if until > self._until.get(key, 0.0):
            self._until[key] = until
            log.warning(
                "upstream.throttled", principal=key[0], subscription=key[1], hold_s=round(hold, 1)
            )
        if self.shared is not None and hold > 0:
            await self.shared.hold(key, hold)
