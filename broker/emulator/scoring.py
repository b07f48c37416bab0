"""Emulated scoring of a deployed v1 web service and of a v2 online endpoint.

A web service accepts `Authorization: Bearer X` only when X is a currently valid MMS token
issued for this service (when token auth is on) or one of its current keys (when key auth
is on). An online endpoint accepts only the credential of its auth mode: a current key
(`Key`), an unexpired AMLToken issued for it (`AMLToken`), or an unexpired Entra token of
the emulator for `https://ml.azure.com` (`AADToken`).

Both routes count (and take faults) as `score`: the middleware maps `score.endpoint` to it.
Bodies are read as a stream, so tests can send many megabytes. Query flags, for tests of
what arrives (a proxy's, say):

    ?report=true   the answer adds `bytes` and `sha256` of the body received and `headers`,
                   the names (never the values) of the request headers received
    ?echo=true     the answer is the body received, streamed back as it arrives
    ?hop=true      the answer carries hop-by-hop headers (`Connection: X-Emulator-Hop`,
                   `X-Emulator-Hop`, `Keep-Alive`) and an end-to-end `X-Emulator-Kept`

An online endpoint's scoring URI has a directory of its own, as on Azure: any other path
under it (`…/endpoints/{name}/swagger.json`, any method) answers, with the endpoint's
credential, a small Swagger document for `swagger.json` and otherwise
`{"path", "method", "query", "auth"}`. Those paths are not counted.
"""

from __future__ import annotations

import hashlib
import hmac

from aiohttp import web

from broker.emulator.callers import ML_AUDIENCE, TokenRejected, bearer_token, entra_caller
from broker.emulator.context import state_of
from broker.emulator.records import OnlineEndpoint, WebService
from broker.emulator.replies import score_error

_CHUNK = 1 << 16
_ENDPOINT_PATH = "/regions/{region}/endpoints/{name}"
_SERVICE_PATH = "/regions/{region}/workspaces/{ws}/api/v1/service/{name}"


def routes() -> list[web.RouteDef]:
    return [
        web.post(_SERVICE_PATH + "/score", score, name="score"),
        web.post(_ENDPOINT_PATH + "/score", score_endpoint, name="score.endpoint"),
        web.route("*", _ENDPOINT_PATH + "/{path:.+}", endpoint_path, name="endpoint.path"),
    ]


async def score(request: web.Request) -> web.StreamResponse:
    """Score a request: 200 with how it was authenticated, or 401."""
    info = request.match_info
    service = state_of(request).scoring_target(info["region"], info["ws"], info["name"])
    if service is None:
        raise score_error(404, "not_found")
    auth = _authenticate(request, service)
    return await _answer(request, auth)


async def score_endpoint(request: web.Request) -> web.StreamResponse:
    """Score on an online endpoint: 200 with how it was authenticated, or 401."""
    endpoint = _endpoint(request)
    return await _answer(request, _endpoint_auth(request, endpoint))


async def endpoint_path(request: web.Request) -> web.Response:
    """Another path in an online endpoint's directory, e.g. its swagger.json."""
    endpoint = _endpoint(request)
    auth = _endpoint_auth(request, endpoint)
    await _drain(request)
    if auth is None:
        raise score_error(401, "unauthorized")
    path = request.match_info["path"]
    if path == "swagger.json":
        return web.json_response(_swagger(endpoint))
    query = dict(request.query)
    return web.json_response({"path": path, "method": request.method, "query": query, "auth": auth})


async def _answer(request: web.Request, auth: str | None) -> web.StreamResponse:
    """Read the body as a stream (echoing it when asked), then answer as the flags say."""
    if auth is None:
        await _drain(request)
        raise score_error(401, "unauthorized")
    if request.query.get("echo") == "true":
        return await _echo(request)
    size, digest = await _drain(request)
    body: dict[str, object] = {"accepted": True, "auth": auth}
    if request.query.get("report") == "true":
        body.update(bytes=size, sha256=digest, headers=sorted(k.lower() for k in request.headers))
    response = web.json_response(body)
    if request.query.get("hop") == "true":
        response.headers.update(
            {
                "Connection": "X-Emulator-Hop",
                "X-Emulator-Hop": "dropped by a proxy",
                "Keep-Alive": "timeout=5",
                "X-Emulator-Kept": "passed on by a proxy",
            }
        )
    return response


async def _echo(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": request.headers.get("Content-Type", "application/octet-stream")}
    )
    await response.prepare(request)
    while chunk := await request.content.read(_CHUNK):
        await response.write(chunk)
    await response.write_eof()
    return response


async def _drain(request: web.Request) -> tuple[int, str]:
    """Read the whole body as it arrives: its length and SHA-256."""
    digest = hashlib.sha256()
    size = 0
    while chunk := await request.content.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def _endpoint(request: web.Request) -> OnlineEndpoint:
    info = request.match_info
    endpoint = state_of(request).endpoint_at(info["region"], info["name"])
    if endpoint is None:
        raise score_error(404, "not_found")
    return endpoint


def _endpoint_auth(request: web.Request, endpoint: OnlineEndpoint) -> str | None:
    presented = bearer_token(request)
    if presented is None or not _endpoint_accepts(request, endpoint, presented):
        return None
    return _ENDPOINT_AUTH[endpoint.auth_mode]


def _swagger(endpoint: OnlineEndpoint) -> dict[str, object]:
    return {
        "swagger": "2.0",
        "info": {"title": endpoint.name, "version": "1.0"},
        "paths": {"/score": {"post": {"responses": {"200": {"description": "scored"}}}}},
    }


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
