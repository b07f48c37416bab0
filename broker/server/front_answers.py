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

Clients ask the same thing over and over, byte for byte, on one connection. With each
answer goes its `Reuse`: what it was decided from (the service's credential and its
generation, how long that credential may be served, the Date's second, the access rules'
version). While all of that holds, the front door may send the same bytes again for the
same request bytes (`Answers.reusable`), counting each answer as it did the first time.
Refusals are judged (and audited) every time, and `/readyz`, which depends on every
service, is always answered afresh.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from email.utils import formatdate
from enum import Enum
from http import HTTPStatus
from typing import TYPE_CHECKING, NamedTuple

import httptools
from aiohttp import web

from broker.errors import LocalRequestError
from broker.models import wall_clock
from broker.server import guards, routes
from broker.server.guards import RawHeaders
from broker.server.keys import ACCESS, STORE
from broker.server.metrics_route import METRICS
from broker.server.peers import Peer
from broker.server.refusals import error_json, retry_after

if TYPE_CHECKING:
    from prometheus_client import Counter

    from broker.cache.store import Entry

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


class Reuse(NamedTuple):
    """What one answer was decided from: while it all holds, the same request bytes get
    the same answer (see `Answers.reusable`)."""

    entry: Entry | None  # the credential's entry, for the token routes
    generation: int  # the entry's generation when it was answered
    until: float  # the last moment, on the store's clock, the answer holds (serve_until)
    second: int  # the Date header's second
    counter: Counter | None  # the request metric's child it was counted in


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
        self._metrics = app.get(METRICS)
        self._routes: dict[bytes, Route] = {}
        self._second = -1
        self._date = b""
        self._health = routes.health_body()
        # Bumped whenever the access rules change: answers given under older rules are
        # never sent again.
        self.rules_version = 0
        self._access.on_update(self._rules_changed)

    def _rules_changed(self) -> None:
        self.rules_version += 1

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
    ) -> tuple[bytes, Reuse | None] | None:
        """The whole response to `request` and what it was decided from (None for an
        answer never to be sent again); None when aiohttp must answer it."""
        kind = route.kind
        entry: Entry | None = None
        until = math.inf
        try:
            guards.check(request)
            if kind is Kind.HEALTH:
                status, content_type, body, extra = 200, _JSON_UTF8, self._health, b""
            elif kind is Kind.READY:
                status, body, wait = routes.readiness(self._store)
                content_type = _JSON_UTF8
                extra = b"" if wait is None else b"Retry-After: %s\r\n" % wait.encode()
            else:
                entry = self._store.find(route.service)
                found = self._token(kind, route.service, request, entry)
                if found is None:
                    return None
                content_type, body, until = found
                status, extra = 200, b""
        except LocalRequestError as exc:
            status, content_type, body = exc.status, _JSON, error_json(exc.code, exc.message)
            extra = b""
            if exc.retry_after is not None:
                extra = b"Retry-After: %s\r\n" % retry_after(exc.retry_after).encode()
        counter = None
        if self._metrics is not None:
            counter = self._metrics.request_count(route.template, status)
            counter.inc()
        head = request.method == "HEAD"
        framed = self._frame(version, status, content_type, extra, body, keep_alive, head)
        if kind is Kind.READY or status != 200:
            return framed, None  # a refusal is judged, and audited, every time
        generation = 0 if entry is None else entry.generation
        return framed, Reuse(entry, generation, until, self._second, counter)

    def reusable(self, reuses: Sequence[Reuse], rules_version: int) -> bool:
        """Whether answers decided from `reuses` under `rules_version` may be sent again
        now, byte for byte; when they may, each is counted as it was the first time."""
        if rules_version != self.rules_version:
            return False
        store = self._store
        now = store.clock()
        second = int(wall_clock())
        for reuse in reuses:
            entry = reuse.entry
            if reuse.second != second or now >= reuse.until:
                return False
            if entry is not None and (
                entry.generation != reuse.generation or store.find(entry.service) is not entry
            ):
                return False
        for reuse in reuses:
            if reuse.counter is not None:
                reuse.counter.inc()
        return True

    def _token(
        self, kind: Kind, service: str, request: DoorRequest, entry: Entry | None
    ) -> tuple[bytes, bytes, float] | None:
        """The content type and body of a servable credential, and until when it may be
        served; None when aiohttp must answer."""
        self._access.authorize(request, service)
        if entry is None:
            return None  # removed by a reload since the route was read: aiohttp's 404
        store = self._store
        until = store.serve_until(entry)
        if store.clock() >= until:  # not usable (Store.usable, from the same deadline)
            return None  # a wait for the fetch, or a 503: aiohttp's route does both
        rendered = routes.rendered(self._rendered, store, entry)
        if kind is Kind.HEADER:
            return _TEXT, rendered.header, until
        return _JSON, rendered.json, until

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
