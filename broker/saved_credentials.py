"""A credential as it is kept outside the broker's memory, and its JSON record.

The persisted cache (a file on this host) and the fleet (Redis, shared by many hosts) keep
the same record of a service's credential: its value and kind, when it expires and asks to
be refreshed, when it was obtained, and where the service is called. Both encrypt the
record; this module only turns it into JSON and back, trusting all of it or none of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from broker.models import AccessToken, AuthKind

_TEXT_KEYS = ("fingerprint", "value", "auth", "token_type")
RECORD_KEYS_V1 = frozenset(
    {"fingerprint", "value", "auth", "expires_on", "refresh_after", "token_type", "obtained_at"}
)
RECORD_KEYS = RECORD_KEYS_V1 | {"scoring_uri"}  # version 2 keeps the scoring URI


@dataclass(frozen=True, slots=True)
class Saved:
    """A credential as the store holds it: the token, when it was obtained, and where the
    service is called (its scoring URI, when Azure described one)."""

    token: AccessToken
    obtained_at: float
    scoring_uri: str | None = None

    @property
    def stamp(self) -> int:
        """How new the credential is, comparable across hosts: its expiry (Azure's time, as
        the broker corrected it), or for keys, which do not expire, when it was obtained;
        in milliseconds."""
        moment = self.token.expires_on if self.token.expires_on is not None else self.obtained_at
        return max(int(moment * 1000), 0)


class UntrustedRecord(Exception):
    """A record cannot be trusted; `reason` says why, and never quotes its content."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def to_record(digest: str, saved: Saved) -> dict[str, Any]:
    """The JSON object of `saved`, marked with `digest`: what the credential is for."""
    token = saved.token
    return {
        "fingerprint": digest,
        "value": token.value,
        "auth": token.auth.value,
        "expires_on": token.expires_on,
        "refresh_after": token.refresh_after,
        "token_type": token.token_type,
        "obtained_at": saved.obtained_at,
        "scoring_uri": saved.scoring_uri,
    }


def from_record(
    where: str, record: object, keys: frozenset[str] = RECORD_KEYS
) -> tuple[str, Saved]:
    """The digest and credential of a record with exactly `keys`, or `UntrustedRecord`
    naming what is wrong with it (never its value); `where` names it in the reason."""
    if not isinstance(record, dict) or set(record) != keys:
        raise UntrustedRecord(f"{where} does not have the expected fields")
    scoring_uri = record.get("scoring_uri")
    if not all(isinstance(record[key], str) for key in _TEXT_KEYS) or not isinstance(
        scoring_uri, str | None
    ):
        raise UntrustedRecord(f"{where} has a field of the wrong type")
    try:
        token = AccessToken(
            record["value"],
            AuthKind(record["auth"]),
            _optional_number(record["expires_on"], where),
            _optional_number(record["refresh_after"], where),
            record["token_type"],
        )
    except ValueError:  # an unknown auth kind, or a value AccessToken refuses
        raise UntrustedRecord(f"{where} is not a valid credential") from None
    obtained_at = finite_number(record["obtained_at"], where)
    return record["fingerprint"], Saved(token, obtained_at, scoring_uri)


def _optional_number(value: object, where: str) -> float | None:
    return None if value is None else finite_number(value, where)


def finite_number(value: object, where: str) -> float:
    """`value` as a float, or `UntrustedRecord` when it is not a finite number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UntrustedRecord(f"{where} holds a time that is not a finite number")
    return float(value)
