"""How ARM, MMS and AADToken scoring decide who is calling: the Entra token in
`Authorization: Bearer …`.

The token must be signed by the emulator's Entra key, be unexpired by the emulator's
clock, and carry the expected audience: the resource manager (with or without trailing
slash) for ARM and MMS, exactly `ML_AUDIENCE` for an online endpoint in AADToken mode.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

import jwt
from aiohttp import web

from broker.emulator.context import site_of, state_of
from broker.emulator.records import KeyHolder
from broker.emulator.sabotage import shaped_times

ML_AUDIENCE = "https://ml.azure.com"  # the scope https://ml.azure.com/.default names it


@dataclass(frozen=True, slots=True)
class Caller:
    """The service principal an accepted Entra token speaks for."""

    app_id: str
    object_id: str
    tenant_id: str


class TokenRejected(Exception):
    """The bearer token is missing, forged, for another audience, or expired."""


def bearer_token(request: web.Request) -> str | None:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def arm_caller(request: web.Request) -> Caller:
    """The caller of an ARM or MMS request; raises `TokenRejected` saying why not."""
    token = bearer_token(request)
    if token is None:
        raise TokenRejected("The 'Authorization' header is missing or is not a Bearer token.")
    base = site_of(request).base_url
    return entra_caller(request, token, (base, base + "/"))


def entra_caller(request: web.Request, token: str, audiences: tuple[str, ...]) -> Caller:
    """Who `token` speaks for, if the emulator's Entra issued it for one of `audiences`
    and it is unexpired; raises `TokenRejected` saying why not."""
    try:
        claims = state_of(request).token_key.verify(token, audience=audiences)
    except jwt.InvalidAudienceError as exc:
        raise TokenRejected(
            f"The access token has an invalid audience; expected '{audiences[0]}'."
        ) from exc
    except jwt.InvalidTokenError as exc:
        raise TokenRejected("The access token is invalid: its signature does not verify.") from exc
    _check_expiry(float(claims["exp"]), state_of(request).clock())
    try:
        return Caller(str(claims["appid"]), str(claims["oid"]), str(claims["tid"]))
    except KeyError as exc:
        raise TokenRejected("The access token lacks the appid, oid or tid claim.") from exc


def _check_expiry(exp: float, now: float) -> None:
    if exp <= now:
        raise TokenRejected(
            f"The access token expiry UTC time '{_utc(exp)}' is earlier than "
            f"current UTC time '{_utc(now)}'."
        )


def _utc(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%m/%d/%Y %H:%M:%S")


def issue_token(
    request: web.Request, caller: Caller, holder: KeyHolder, issuer: str
) -> tuple[str, float, int]:
    """Sign a token of `holder` (a v1 service or a v2 endpoint) for `caller`, issued by
    `{region}/{issuer}`, and remember it so that scoring accepts it until it expires.
    Returns the token, when it was issued and when it expires (whole epoch seconds, as
    Azure sends them: the token dies at the second it names)."""
    state = state_of(request)
    issued_at = state.clock()
    iat, nbf, expires_at = shaped_times(request, issued_at, holder.token_lifetime_s)
    claims = {
        "iss": f"{site_of(request).region_base(holder.workspace.region)}/{issuer}",
        "aud": holder.service_id,
        "sub": caller.object_id,
        "appid": caller.app_id,
        "iat": iat,
        "nbf": nbf,
        "exp": expires_at,
        "jti": secrets.token_urlsafe(12),
    }
    token = state.token_key.sign(claims)
    state.remember_token(token, holder, expires_at)
    return token, issued_at, expires_at
