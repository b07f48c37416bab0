"""When to refresh, when to stop serving, how long to back off: pure functions of time.

Every figure scales with the credential's own lifetime so that the same rules hold
for Azure's hour-long tokens and for the emulator's twenty-second ones: a margin
or skew is never more than a fixed share of the time it is taken from.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from broker.config import RefreshConfig
from broker.models import AccessToken

_MAX_MARGIN_SHARE = 0.2  # a refresh margin never eats more than this share of the lead time
_MAX_SKEW_SHARE = 0.1  # the skew allowance never eats more than this share of a lifetime
_NON_RETRYABLE_BACKOFF_FLOOR = 60.0  # faults only an operator can fix are not hammered


@dataclass(frozen=True, slots=True)
class Policy:
    """The refresh rules, parameterised by the configuration's `[refresh]` table."""

    config: RefreshConfig = field(default_factory=RefreshConfig)
    rand: random.Random = field(default_factory=random.Random, compare=False)

    def refresh_by(self, token: AccessToken, obtained_at: float) -> float:
        """When clients should come back: Azure's `refreshAfter` when it is usable."""
        if token.expires_on is None:
            return obtained_at + self.config.key_interval_s
        lifetime = max(token.expires_on - obtained_at, 0.0)
        hint = token.refresh_after
        if hint is None or hint <= obtained_at or hint >= token.expires_on:
            return obtained_at + lifetime * self.config.lifetime_fraction
        return hint

    def refresh_at(self, token: AccessToken, obtained_at: float) -> float:
        """When the broker refreshes: before `refresh_by`, by a margin and a random jitter."""
        target = self.refresh_by(token, obtained_at)
        lead = max(target - obtained_at, 0.0)
        margin = min(self.config.margin_s, lead * _MAX_MARGIN_SHARE)
        jitter = self.rand.uniform(0.0, min(self.config.jitter_s, lead * _MAX_MARGIN_SHARE))
        return max(obtained_at, target - margin - jitter)

    def serve_until(self, token: AccessToken, obtained_at: float) -> float | None:
        """The last moment a token may be handed out; None for keys, which do not expire."""
        if token.expires_on is None:
            return None
        lifetime = max(token.expires_on - obtained_at, 0.0)
        return token.expires_on - min(self.config.clock_skew_s, lifetime * _MAX_SKEW_SHARE)

    def servable(self, token: AccessToken, obtained_at: float, now: float) -> bool:
        until = self.serve_until(token, obtained_at)
        return until is None or now < until

    def retry_in(self, failures: int, retry_after: float | None, retryable: bool) -> float:
        """Exponential backoff with full jitter, capped; Azure's Retry-After is a floor."""
        cap = self.config.retry_max_s
        if not retryable:
            return max(cap, _NON_RETRYABLE_BACKOFF_FLOOR)
        ceiling = min(cap, self.config.retry_min_s * 2 ** max(failures - 1, 0))
        delay = self.rand.uniform(self.config.retry_min_s, max(ceiling, self.config.retry_min_s))
        return max(delay, retry_after or 0.0)
