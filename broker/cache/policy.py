"""When to refresh, when to stop serving, how long to back off: pure functions of time.

Every figure scales with the credential's own lifetime so that the same rules hold
for Azure's hour-long tokens and for the emulator's twenty-second ones: a margin
or skew is never more than a fixed share of the time it is taken from.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from broker.config import RefreshConfig
from broker.models import AccessToken, doubling

_MAX_MARGIN_SHARE = 0.2  # a refresh margin never eats more than this share of the lead time
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
        return token.expires_on - token.skew_allowance(self.config.clock_skew_s, obtained_at)

    def servable(self, token: AccessToken, obtained_at: float, now: float) -> bool:
        until = self.serve_until(token, obtained_at)
        return until is None or now < until

    def unusable_reason(self, token: AccessToken, now: float) -> str | None:
        """Why a credential arriving at `now` must not be served (see `AccessToken`)."""
        return token.unusable_reason(now, self.config.clock_skew_s)

    def retry_in(self, failures: int, retry_after: float | None, retryable: bool) -> float:
        """Exponential backoff with equal jitter, capped; Azure's Retry-After is a floor.

        The delay after the n-th failure in a row is drawn between half its ceiling and
        the ceiling (`retry_min_s` doubling up to `retry_max_s`), never below `retry_min_s`:
        unlike full jitter, the spacing of a failing streak then grows for certain, which
        is what lets `max_attempts` bound what Azure can see.
        """
        if not retryable:
            return max(self.config.retry_max_s, _NON_RETRYABLE_BACKOFF_FLOOR)
        ceiling = self._ceiling(failures)
        delay = self.rand.uniform(self.shortest_retry_in(failures), ceiling)
        return max(delay, retry_after or 0.0)

    def shortest_retry_in(self, failures: int) -> float:
        """The least `retry_in` can answer after `failures` failures in a row."""
        return max(self.config.retry_min_s, self._ceiling(failures) / 2)

    def _ceiling(self, failures: int) -> float:
        return doubling(failures - 1, self.config.retry_min_s, self.config.retry_max_s)

    def max_attempts(self, window_s: float, shortest_lead_s: float) -> int:
        """The most upstream attempts this policy lets one service make in `window_s`.

        Each attempt is followed either by a success, whose next refresh is at least
        `shortest_lead_s` away (the shortest time from a fetch to its scheduled refresh,
        for the lifetimes in play), or by its streak's `shortest_retry_in`; the worst
        sequence of outcomes is found by dynamic programming over time in small steps,
        every gap rounded down, so the answer is an upper bound that is nearly tight.
        """
        step = min(self.config.retry_min_s / 4, max(window_s / 20_000, 1e-3))
        units = int(window_s / step)
        lead = max(1, int(max(shortest_lead_s, self.config.retry_min_s) / step))
        gaps = [max(1, int(self.shortest_retry_in(1) / step))]
        while len(gaps) < 64 and self._ceiling(len(gaps)) < self.config.retry_max_s:
            gaps.append(max(1, int(self.shortest_retry_in(len(gaps) + 1) / step)))
        streaks = len(gaps)  # past the last, the gap stays as it is
        # most[t][n]: attempts from an attempt at t units before the end, after n failures.
        most = [[1] * (streaks + 1) for _ in range(units + 1)]
        for t in range(units + 1):
            row = most[t]
            for n in range(streaks + 1):
                best = 1
                if t >= lead:
                    best = 1 + most[t - lead][0]
                gap = gaps[min(n, streaks - 1)]
                if t >= gap:
                    best = max(best, 1 + most[t - gap][min(n + 1, streaks)])
                row[n] = best
        return most[units][0]

    def shortest_lead(self, refresh_by_s: float) -> float:
        """The least time from a fetch to its scheduled refresh, for credentials whose
        `refresh_by` is `refresh_by_s` after they arrive (keys: `key_interval_s`)."""
        margin = min(self.config.margin_s, refresh_by_s * _MAX_MARGIN_SHARE)
        jitter = min(self.config.jitter_s, refresh_by_s * _MAX_MARGIN_SHARE)
        return max(refresh_by_s - margin - jitter, self.config.retry_min_s)
