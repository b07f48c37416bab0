"""Emulated scoring endpoint of a deployed web service.

It accepts `Authorization: Bearer X` only when X is a currently valid MMS token issued for
this service (when token auth is on) or one of its current keys (when key auth is on).
"""

from __future__ import annotations

import hmac

from aiohttp import web

from broker.emulator.access import bearer_token
from broker.emulator.context import state_of
from broker.emulator.records import WebService
from broker.emulator.replies import score_error


def routes() -> list[web.RouteDef]:
    return [web.post("/regions/{region}/score/{ws}/{name}", score, name="score")]


async def score(request: web.Request) -> web.Response:
    """Score a request: 200 with how it was authenticated, or 401."""
    info = request.match_info
    service = state_of(request).scoring_target(info["region"], info["ws"], info["name"])
    if service is None:
        raise score_error(404, "not_found")
    await request.read()
    auth = _authenticate(request, service)
    if auth is None:
        raise score_error(401, "unauthorized")
    return web.json_response({"accepted": True, "auth": auth})


def _authenticate(request: web.Request, service: WebService) -> str | None:
    if not (service.auth_enabled or service.aad_auth_enabled):
        return "none"
    presented = bearer_token(request)
    if presented is None:
        return None
    if service.aad_auth_enabled and state_of(request).token_is_valid(presented, service):
        return "token"
    if service.auth_enabled and _is_current_key(presented, service):
        return "key"
    return None


def _is_current_key(presented: str, service: WebService) -> bool:
    candidate = presented.encode()
    return any(
        hmac.compare_digest(candidate, key.encode())
        for key in (service.primary_key, service.secondary_key)
    )
