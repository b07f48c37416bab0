"""Handlers of the local API; they raise `LocalRequestError`, the middleware answers.

A token's response body is rendered once per credential change and reused, so the
hot path is a dictionary lookup and a write.
"""

from __future__ import annotations

import asyncio
import json
import os
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from broker import __version__
from broker.cache import Entry, Rendered, Store
from broker.errors import BadRequestError, ForbiddenError
from broker.log import get_logger
from broker.server.keys import ACCESS, ROTATIONS, STORE
from broker.server.request_view import AppRequest, peer_of
from broker.server.streams import Stream, Streams

log = get_logger("broker.server")

_JSON = "application/json"
CLIENT_LEFT = 499  # the status counted for a stream whose client left (nginx's convention)


class ClientLeft(Exception):
    """Raised by a stream whose client has left: the middleware counts a disconnect and
    gives aiohttp the begun response, with no error logged."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("the client left")
        self.response = response


STREAMS: web.AppKey[Streams] = web.AppKey("streams", Streams)


async def end_streams(app: web.Application) -> None:
    """On shutdown, end every watch stream so stopping does not wait out the grace period."""
    app[STREAMS].cancel_all()


RENDERED = web.AppKey("rendered", dict[str, Rendered])


def _render(request: web.Request, store: Store, entry: Entry) -> Rendered:
    return rendered(request.app[RENDERED], store, entry)


def rendered(cache: dict[str, Rendered], store: Store, entry: Entry) -> Rendered:
    """The entry's rendered credential, rendered again only when it has changed (the front
    door and the token route share the cache, so they hand out the same bytes)."""
    cached = cache.get(entry.service)
    if cached is None or cached.generation != entry.generation:
        cached = cache[entry.service] = Rendered(store, entry)
    return cached


async def token(request: web.Request) -> web.StreamResponse:
    app = request.app
    store = app[STORE]
    service = request.match_info["service"]
    if request.rel_url.raw_query_string:
        return await _token_with_options(request, store, service)
    # The hot path, with no query string: what the general one does without parsing one,
    # and without a coroutine when the credential is servable.
    app[ACCESS].authorize(AppRequest(request), service)
    entry = store.entry(service)
    if not store.usable(entry):
        entry = await store.credential(service)
    return web.Response(body=rendered(app[RENDERED], store, entry).json, content_type=_JSON)


async def _token_with_options(
    request: web.Request, store: Store, service: str
) -> web.StreamResponse:
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "header"):
        raise BadRequestError(f"format must be json or header, not {fmt[:40]!r}")
    request.app[ACCESS].authorize(AppRequest(request), service)
    if request.query.get("watch") == "true":
        return await _watch(request, store, service)
    entry = await store.credential(service)
    rendered = _render(request, store, entry)
    if fmt == "header":
        return web.Response(body=rendered.header, content_type="text/plain")
    return web.Response(body=rendered.json, content_type=_JSON)


async def _watch(request: web.Request, store: Store, service: str) -> web.StreamResponse:
    """Server-Sent Events: the current credential at once, each new one as it comes, and
    heartbeats between; until the client leaves, or an `end` event says why it ended."""
    store.entry(service)  # 404 before the stream starts
    streams = request.app[STREAMS]
    stream = streams.open(request, service)  # 503 when no place is left for it
    reason = "client_gone"
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
    )
    try:
        await response.prepare(request)
        reason = await _stream(request, response, store, streams, stream)
        if reason == "client_gone":
            raise ConnectionResetError
    except asyncio.CancelledError:
        reason = "shutdown"
    except ConnectionError:
        # How most streams end: the watcher left (the listener says so at once).
        reason = "client_gone"
        log.debug("watch.client_left", service=service)
        raise ClientLeft(response) from None
    finally:
        streams.close(stream, reason)
    return response


async def _stream(
    request: web.Request,
    response: web.StreamResponse,
    store: Store,
    streams: Streams,
    stream: Stream,
) -> str:
    """Send until the stream must end; the reason it ended."""
    sent = None
    while True:
        stream.wake.clear()
        # Judged before every event: an event is only ever sent to who may fetch it now.
        reason = streams.verdict(stream)
        if reason is not None:
            break
        entry = store.entry(stream.service)
        if store.usable(entry) and entry.generation != sent:
            sent = entry.generation
            data = _render(request, store, entry).json
            await response.write(b"event: token\ndata: " + data + b"\n\n")
        wait = max(0.0, min(streams.heartbeat_s, streams.remaining(stream)))
        try:
            await asyncio.wait_for(stream.wake.wait(), wait)
        except TimeoutError:
            if streams.remaining(stream) > 0:
                await response.write(b": heartbeat\n\n")
    if reason != "client_gone":
        end = json.dumps({"reason": reason, "message": streams.ending(reason)}).encode()
        await response.write(b"event: end\ndata: " + end + b"\n\n")
        await response.write_eof()
    return reason


async def refresh(request: web.Request) -> web.Response:
    """Refresh now (at most once per service per window), then answer like `token`."""
    store = request.app[STORE]
    service = request.match_info["service"]
    request.app[ACCESS].authorize(AppRequest(request), service)
    entry = await store.refresh_now(service)
    return web.Response(body=_render(request, store, entry).json, content_type=_JSON)


async def rotate_key(request: web.Request) -> web.Response:
    """Rotate a key service's key with no gap; for the broker's own user or root, on the socket."""
    service = request.match_info["service"]
    peer = peer_of(request)
    if peer is None or peer.uid not in (0, os.geteuid()):
        raise ForbiddenError(
            "key rotation is allowed only on the Unix socket, to root or the broker's own user",
            code="access_denied",
        )
    which = request.query.get("key", "primary")
    if which not in ("primary", "secondary"):
        raise BadRequestError(f"key must be primary or secondary, not {which[:40]!r}")
    store = request.app[STORE]
    store.entry(service)  # 404 before anything else for an unknown service
    entry = await request.app[ROTATIONS].rotate(
        service, "primary" if which == "primary" else "secondary"
    )
    return web.json_response({"rotated": which, **service_status(store, entry)})


async def services(request: web.Request) -> web.Response:
    store = request.app[STORE]
    return web.json_response(
        {"services": [service_status(store, e) for e in store.entries], "fleet": _fleet(store)}
    )


async def service(request: web.Request) -> web.Response:
    store = request.app[STORE]
    return web.json_response(service_status(store, store.entry(request.match_info["service"])))


def health_body() -> bytes:
    """`/healthz`'s answer, the same whoever gives it."""
    return json.dumps({"status": "ok", "version": __version__}).encode()


def readiness(store: Store) -> tuple[int, bytes, str | None]:
    """`/readyz`'s status, body and Retry-After: 200 only when every service has a usable
    credential (the front door answers from this too)."""
    waiting = [e.service for e in store.entries if not store.usable(e)]
    if waiting:
        return 503, json.dumps({"status": "not_ready", "waiting_for": waiting}).encode(), "1"
    return 200, _READY, None


_READY = json.dumps({"status": "ready"}).encode()


async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=health_body(), content_type=_JSON, charset="utf-8")


async def readyz(request: web.Request) -> web.Response:
    status, body, wait = readiness(request.app[STORE])
    response = web.Response(status=status, body=body, content_type=_JSON, charset="utf-8")
    if wait is not None:
        response.headers["Retry-After"] = wait
    return response


def service_status(store: Store, entry: Entry) -> dict[str, Any]:
    """A service's state for `/v1/services`: times and errors, never a secret."""
    token = entry.token
    error = entry.last_error
    return {
        "service": entry.service,
        "state": store.state(entry).value,
        "auth": token.auth.value if token else None,
        "usable": store.usable(entry),
        "scoring_uri": entry.provider.scoring_uri,
        "expires_on": _iso(token.expires_on if token else None),
        "refresh_by": _iso(store.refresh_by(entry)),
        "last_refresh": _iso(entry.last_success_at),
        "next_attempt": _iso(entry.next_attempt_at),
        "failures": entry.failures,
        "clock_skew_s": _round(entry.provider.clock_skew_s),
        "source": entry.origin,
        "fleet": _fleet(store),
        "last_error": None
        if error is None
        else {
            "message": error.message,
            "status": error.status,
            "aad_code": error.aad_code,
            "retryable": error.retryable,
            "at": _iso(entry.last_error_at),
        },
    }


def _fleet(store: Store) -> str:
    """The fleet's health: `off` without fleet mode, else `up`, `down` or `unknown`."""
    return "off" if store.shared is None else store.shared.health


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")
