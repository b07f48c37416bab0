"""What the front door answers itself, and the bytes it answers with.

    GET|HEAD /v1/token/{service}                 the credential's JSON, rendered once per
    GET|HEAD /v1/token/{service}?format=json     credential change (the same bytes aiohttp's
    GET|HEAD /v1/token/{service}?format=header   route and the file sinks hand out)
    GET|HEAD /healthz, /readyz

Only for a configured service whose credential is servable now, and for targets spelt
exactly so: anything else — another query, a percent-encoded name, an unknown service, a
credential still being fetched (whose answer means waiting) — is aiohttp's, and the front
door hands the connection over. Before answering, the request passes `guards.check` and
`AccessRules.authorize`, the functions aiohttp's middleware and routes call, and a refusal
is answered with the same JSON body. Each answer is counted in the same request metric.
"""

from __future__ import annotations

from collections.abc import Callable
from email.utils import formatdate
from enum import Enum
from http import HTTPStatus
from typing import NamedTuple

import httptools
from aiohttp import web

from broker.errors import LocalRequestError
from broker.metrics import Metrics
from broker.models import wall_clock
from broker.server import guards, routes
from broker.server.guards import RawHeaders
from broker.server.keys import ACCESS, STORE
from broker.server.metrics_route import METRICS
from broker.server.peers import Peer
from broker.server.refusals import error_json, retry_after

_TOKEN_ROUTE = "/v1/token/{service}"  # noqa: S105 — a route template, as the metric labels it
_TOKEN_PREFIX = b"/v1/token/"
_JSON = b"application/json"
_JSON_UTF8 = b"application/json; charset=utf-8"  # what aiohttp's json_response sends
_TEXT = b"text/plain"
_ROUTE_CACHE_SIZE = 4096


class Kind(Enum):
    """What a request the front door answers asks for."""

    JSON = "json"
    HEADER = "header"
    HEALTH = "health"
    READY = "ready"


class Route(NamedTuple):
    """What a request asks of the front door."""

    kind: Kind
    service: str  # "" for health and readiness
    path: str
    template: str  # the route's template, as the request metric labels it


_FIXED = {
    b"/healthz": Route(Kind.HEALTH, "", "/healthz", "/healthz"),
    b"/readyz": Route(Kind.READY, "", "/readyz", "/readyz"),
}
_FORMATS = {None: Kind.JSON, b"format=json": Kind.JSON, b"format=header": Kind.HEADER}


class DoorRequest:
    """One request as the front door read it: the `RequestView` the guards judge."""

    __slots__ = ("body_exists", "method", "path", "peer", "raw_headers", "raw_path", "unix")

    def __init__(
        self,
        method: str,
        target: bytes,
        path: str,
        headers: RawHeaders,
        body_exists: bool,
        unix: bool,
        peer: Peer | None,
    ) -> None:
        self.method = method
        self.raw_path = target.decode("utf-8", "surrogateescape")
        self.path = path
        self.raw_headers = headers
        self.body_exists = body_exists
        self.unix = unix
        self.peer = peer


class Answers:
    """The front door's answers, from what the application holds: the store, the access
    rules, the rendered credentials, and the metrics."""

    def __init__(self, app: web.Application) -> None:
        self._store = app[STORE]
        self._access = app[ACCESS]
        self._rendered = app[routes.RENDERED]
        metrics = app.get(METRICS)
        self._count: Callable[[Route, int], None] | None = (
            None if metrics is None else _counter(metrics)
        )
        self._routes: dict[bytes, Route] = {}
        self._second = -1
        self._date = b""
        self._health = routes.health_body()

    def route(self, target: bytes) -> Route | None:
        """What a request target asks of the front door; None when it is not its to answer."""
        known = self._routes.get(target)
        if known is not None:
            return known
        found = self._parse(target)
        if found is not None:  # only answers to remember: other targets cannot fill it
            if len(self._routes) >= _ROUTE_CACHE_SIZE:
                self._routes.clear()
            self._routes[target] = found
        return found

    def _parse(self, target: bytes) -> Route | None:
        try:
            url = httptools.parse_url(target)
        except httptools.HttpParserInvalidURLError:
            return None
        if url.schema or url.host or url.port or url.userinfo or url.fragment is not None:
            return None
        path = url.path
        if path in _FIXED:
            return _FIXED[path] if url.query is None else None
        kind = _FORMATS.get(url.query)
        if kind is None or not path.startswith(_TOKEN_PREFIX):
            return None
        # Configured names are [A-Za-z0-9._-] and never all dots: spelt as they are, they
        # need no decoding, and aiohttp's router reads them the same.
        name = path[len(_TOKEN_PREFIX) :].decode("latin-1")
        if not self._store.has(name):
            return None
        return Route(kind, name, path.decode("latin-1"), _TOKEN_ROUTE)

    def answer(
        self, route: Route, request: DoorRequest, version: bytes, keep_alive: bool
    ) -> bytes | None:
        """The whole response to `request`, or None when aiohttp must answer it."""
        kind = route.kind
        try:
            guards.check(request)
            if kind is Kind.HEALTH:
                status, content_type, body, extra = 200, _JSON_UTF8, self._health, b""
            elif kind is Kind.READY:
                status, body, wait = routes.readiness(self._store)
                content_type = _JSON_UTF8
                extra = b"" if wait is None else b"Retry-After: %s\r\n" % wait.encode()
            else:
                found = self._token(kind, route.service, request)
                if found is None:
                    return None
                status, content_type, body, extra = 200, *found, b""
        except LocalRequestError as exc:
            status, content_type, body = exc.status, _JSON, error_json(exc.code, exc.message)
            extra = b""
            if exc.retry_after is not None:
                extra = b"Retry-After: %s\r\n" % retry_after(exc.retry_after).encode()
        if self._count is not None:
            self._count(route, status)
        head = request.method == "HEAD"
        return self._frame(version, status, content_type, extra, body, keep_alive, head)

    def _token(self, kind: Kind, service: str, request: DoorRequest) -> tuple[bytes, bytes] | None:
        self._access.authorize(request, service)
        store = self._store
        if not store.has(service):
            return None  # removed by a reload since the route was read: aiohttp's 404
        entry = store.entry(service)
        if not store.usable(entry):
            return None  # a wait for the fetch, or a 503: aiohttp's route does both
        rendered = routes.rendered(self._rendered, store, entry)
        if kind is Kind.HEADER:
            return _TEXT, rendered.header
        return _JSON, rendered.json

    def _frame(
        self,
        version: bytes,
        status: int,
        content_type: bytes,
        extra: bytes,
        body: bytes,
        keep_alive: bool,
        head: bool,
    ) -> bytes:
        """A response laid out as aiohttp lays out its own, with the request's version."""
        if version == b"1.1":
            connection = b"" if keep_alive else b"Connection: close\r\n"
        else:
            connection = b"Connection: keep-alive\r\n" if keep_alive else b""
        return b"".join(
            (
                b"HTTP/",
                version,
                _STATUS_LINES[status],
                b"Content-Type: ",
                content_type,
                b"\r\n",
                extra,
                b"Content-Length: %d\r\nDate: " % len(body),
                self._now(),
                b"\r\n",
                connection,
                b"\r\n",
                b"" if head else body,
            )
        )

    def _now(self) -> bytes:
        """The Date header's value, formatted once a second: the host's own time, as
        aiohttp's answers give it (HTTP dates are never on the broker's corrected clock)."""
        now = wall_clock()
        second = int(now)
        if second != self._second:
            self._second = second
            self._date = formatdate(second, usegmt=True).encode()
        return self._date


_STATUS_LINES = {s.value: b" %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}


def _counter(metrics: Metrics) -> Callable[[Route, int], None]:
    def count(route: Route, status: int) -> None:
        metrics.request_count(route.template, status).inc()

    return count
