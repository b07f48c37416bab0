"""Azure throttles per principal and per subscription; so do we, after its first 429.

When one service's call is answered 429, every service sharing that principal and
subscription is held back until `Retry-After` has passed, instead of each of them
spending a call to earn its own 429. Held-back fetches fail at once with a
`ThrottledError` carrying the remaining wait, which the refresher honours.
"""

from __future__ import annotations

from broker.errors import ThrottledError
from broker.log import get_logger
from broker.models import Clock, system_clock

log = get_logger("broker.throttle")

ThrottleKey = tuple[str, str]  # (principal, subscription)

DEFAULT_HOLD_S = 10.0  # when a 429 names no Retry-After


class Throttles:
    """When each (principal, subscription) pair may call Azure again."""

    def __init__(self, clock: Clock = system_clock) -> None:
        self.clock = clock  # the broker's clock, which Azure's times are compared with
        self._until: dict[ThrottleKey, float] = {}

    def check(self, key: ThrottleKey, route: str) -> None:
        """Raise `ThrottledError` without calling Azure while the pair is held back."""
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

    def note(self, key: ThrottleKey, retry_after: float | None) -> None:
        """Record a 429 for the pair."""
        hold = retry_after if retry_after is not None else DEFAULT_HOLD_S
        until = self.clock() + hold
        if until > self._until.get(key, 0.0):
            self._until[key] = until
            log.warning(
                "upstream.throttled", principal=key[0], subscription=key[1], hold_s=round(hold, 1)
            )
