"""Values that flow between the layers: credentials served, their states, the clock and
backoff on it."""

from __future__ import annotations

import asyncio
import enum
import hashlib
import json
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Protocol


class Clock(Protocol):
    """Wall-clock seconds since the epoch; tests inject a fake one."""

    def __call__(self) -> float: ...


def system_clock() -> float:
    return time.time()


def wall_clock() -> float:
    """The real wall clock, for times that others put on it (MSAL's `refresh_on`):
    never for the broker's own deadlines, which follow the injected `Clock`."""
    return time.time()


def doubling(step: int, low: float, high: float) -> float:
    """`low` doubled `step` times, kept between `low` and `high`: the ceiling of an
    exponential backoff after `step + 1` failures in a row."""
    return max(min(high, low * float(2 ** min(max(step, 0), 64))), low)


class Sleep(Protocol):
    """Waits `seconds` on the broker's clock; tests inject one that simulated time wakes."""

    def __call__(self, seconds: float, /) -> Awaitable[None]: ...


def system_sleep(seconds: float, /) -> Awaitable[None]:
    return asyncio.sleep(seconds)


MAX_SKEW_SHARE = 0.1  # the skew allowance never eats more than this share of a lifetime


class AuthKind(enum.StrEnum):
    """How the client presents the credential; all are sent as `Bearer`."""

    TOKEN = "token"  # noqa: S105 — an Azure ML web-service token, refreshed before refreshAfter
    KEY = "key"  # a static web-service key, re-listed to pick up rotations
    ENTRA = "entra"  # an Entra ID access token of the service principal


class State(enum.StrEnum):
    """Where a service's cached credential stands."""

    FRESH = "fresh"  # a valid credential, last refresh succeeded
    REFRESHING = "refreshing"  # a fetch is under way and the last one did not fail
    STALE = "stale"  # refresh is failing but the credential is still valid
    EXPIRED = "expired"  # the last credential expired and refresh is still failing
    FAILED = "failed"  # never obtained a credential; the last attempt failed


@dataclass(frozen=True, slots=True)
class AccessToken:
    """A credential for one service, as Azure issued it.

    `expires_on` is None for keys. `refresh_after` is Azure's own hint (epoch
    seconds) and may be absent, past or beyond expiry; the cache policy decides.
    `issued_at` and `not_before` come from a JWT's `iat` and `nbf` when the credential
    is one. Every time is on the broker's clock (providers move Azure's onto it).
    """

    value: str
    auth: AuthKind
    expires_on: float | None
    refresh_after: float | None = None
    token_type: str = "Bearer"  # noqa: S105 — a scheme name, not a secret
    issued_at: float | None = None
    not_before: float | None = None

    def __post_init__(self) -> None:
        if not self.value or any(c in self.value for c in "\r\n \t"):
            raise ValueError("a credential must be a non-empty string without whitespace")
        if self.expires_on is None and self.auth is not AuthKind.KEY:
            raise ValueError("only keys may lack an expiry")

    def __repr__(self) -> str:
        return (
            f"AccessToken(auth={self.auth.value}, expires_on={self.expires_on}, "
            f"refresh_after={self.refresh_after}, issued_at={self.issued_at}, "
            f"not_before={self.not_before}, value='********')"
        )

    __str__ = __repr__

    def skew_allowance(self, clock_skew_s: float, obtained_at: float) -> float:
        """How long before `expires_on` the credential stops being served: `clock_skew_s`,
        but never more than a tenth of its life (from its issue when its JWT says, else from
        when the broker got it), so that tokens of seconds stay servable. 0 for keys."""
        if self.expires_on is None:
            return 0.0
        start = obtained_at if self.issued_at is None else min(self.issued_at, obtained_at)
        return min(clock_skew_s, max(self.expires_on - start, 0.0) * MAX_SKEW_SHARE)

    def unusable_reason(self, now: float, clock_skew_s: float) -> str | None:
        """Why this credential, just fetched or restored at `now`, must not replace the one
        being served, or None when it may. Says what is wrong, never the value."""
        if not (self.value.isascii() and self.value.isprintable()):
            return "it holds characters that are not printable ASCII"
        if self.expires_on is None:
            return None
        left = self.expires_on - now
        allowance = self.skew_allowance(clock_skew_s, now)
        if left <= 0:
            return f"it expired {-left:.0f} s ago"
        if left <= allowance:
            return f"it expires in {left:.1f} s, within the {allowance:.1f} s clock-skew allowance"
        if self.not_before is not None and self.not_before - now > allowance:
            return f"it is not valid for another {self.not_before - now:.0f} s (its nbf)"
        return None


def fingerprint(*parts: str) -> str:
    """A SHA-256 hex digest of `parts` that tells ("ab", "c") from ("a", "bc")."""
    encoded = json.dumps(list(parts), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(encoded.encode("utf-8")).hexdigest()
