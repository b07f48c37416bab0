"""Values that flow between the layers: credentials served, their states, the clock."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Protocol


class Clock(Protocol):
    """Wall-clock seconds since the epoch; tests inject a fake one."""

    def __call__(self) -> float: ...


def system_clock() -> float:
    return time.time()


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
    """

    value: str
    auth: AuthKind
    expires_on: float | None
    refresh_after: float | None = None
    token_type: str = "Bearer"  # noqa: S105 — a scheme name, not a secret

    def __post_init__(self) -> None:
        if not self.value or any(c in self.value for c in "\r\n \t"):
            raise ValueError("a credential must be a non-empty string without whitespace")
        if self.expires_on is None and self.auth is not AuthKind.KEY:
            raise ValueError("only keys may lack an expiry")

    def __repr__(self) -> str:
        return (
            f"AccessToken(auth={self.auth.value}, expires_on={self.expires_on}, "
            f"refresh_after={self.refresh_after}, value='********')"
        )

    __str__ = __repr__
