"""Emulated scoring of a deployed v1 web service and of a v2 online endpoint.

A web service accepts `Authorization: Bearer X` only when X is a currently valid MMS token
issued for this service (when token auth is on) or one of its current keys (when key auth
is on). An online endpoint accepts only the credential of its auth mode: a current key
(`Key`), an unexpired AMLToken issued for it (`AMLToken`), or an unexpired Entra token of
the emulator for `https://ml.azure.com` (`AADToken`).

Both routes count (and take faults) as `score`: the middleware maps `score.endpoint` to it.
"""

from __future__ import annotations

import hmac

from aiohttp import web

from broker.emulator.access import ML_AUDIENCE, TokenRejected, bearer_token, entra_caller
from broker.emulator.context import state_of
from broker.emulator.records import OnlineEndpoint, WebService
from broker.emulator.replies import score_error


def routes() -> list[web.RouteDef]:
    return [
        web.post("/regions/{region}/score/{ws}/{name}", score, name="score"),
        web.post("/regions/{region}/endpoints/{name}/score", score_endpoint, name="score.endpoint"),
    ]


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


async def score_endpoint(request: web.Request) -> web.Response:
    """Score on an online endpoint: 200 with how it was authenticated, or 401."""
    info = request.match_info
    endpoint = state_of(request).endpoint_at(info["region"], info["name"])
    if endpoint is None:
        raise score_error(404, "not_found")
    await request.read()
    presented = bearer_token(request)
    if presented is None or not _endpoint_accepts(request, endpoint, presented):
        raise score_error(401, "unauthorized")
    return web.json_response({"accepted": True, "auth": _ENDPOINT_AUTH[endpoint.auth_mode]})


_ENDPOINT_AUTH = {"Key": "key", "AMLToken": "token", "AADToken": "aad"}


def _endpoint_accepts(request: web.Request, endpoint: OnlineEndpoint, presented: str) -> bool:
    if endpoint.auth_mode == "Key":
        return _is_current_key(presented, endpoint)
    if endpoint.auth_mode == "AMLToken":
        return state_of(request).token_is_valid(presented, endpoint)
    try:
        entra_caller(request, presented, (ML_AUDIENCE,))
    except TokenRejected:
        return False
    return True


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


def _is_current_key(presented: str, service: WebService | OnlineEndpoint) -> bool:
    candidate = presented.encode()
    return any(
        hmac.compare_digest(candidate, key.encode())
        for key in (service.primary_key, service.secondary_key)
    )
