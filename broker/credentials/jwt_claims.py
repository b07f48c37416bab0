"""A JWT's times, read without verifying it: Azure's answers say when a credential lives,
and its own `exp`, `nbf` and `iat` must agree with them.

The payload is read with `base64` and `json` rather than PyJWT because PyJWT loads
`cryptography` (about 8 MiB of resident memory) on import, which an idle broker serving
only web-service tokens would otherwise never need; nothing here verifies a signature,
which is Azure's business and the scoring host's.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class JwtTimes:
    """The registered time claims of a JWT, in its issuer's epoch seconds."""

    expires: float | None = None
    not_before: float | None = None
    issued_at: float | None = None


def jwt_times(value: str) -> JwtTimes | None:
    """The time claims of `value` if it is a JWT (three dot-separated parts whose middle is
    a JSON object); None for anything else, such as a web-service key."""
    parts = value.split(".")
    if len(parts) != 3 or not parts[1]:
        return None
    payload = parts[1]
    try:
        raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        claims = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(claims, dict):
        return None
    return JwtTimes(_time(claims.get("exp")), _time(claims.get("nbf")), _time(claims.get("iat")))


def _time(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) and number > 0 else None
