"""`ANY /v1/proxy/{service}/{path}`: a local request forwarded to the service's scoring
URI with the service's credential added, so that a client need not fetch it (sidecar mode).

Path mapping: `{path}` is taken relative to the scoring URI's directory, with the client's
query string passed on. For `https://h/api/v1/service/x/score`:

    /v1/proxy/x, /v1/proxy/x/, /v1/proxy/x/score  →  https://h/api/v1/service/x/score
    /v1/proxy/x/swagger.json?v=2                  →  https://h/api/v1/service/x/swagger.json?v=2

The scheme, host and port are always the scoring URI's. A path with a `.` or `..` segment
(however encoded, also as `..;`), an encoded `/`, `\\` or NUL, an empty segment, or bytes
no URI may hold is refused with 400 before anything is sent.

Headers: hop-by-hop headers (and those `Connection` names) are dropped both ways, and so
are the client's `Authorization`, the broker's own `Metadata` and `X-Token-Broker-Key`,
`Host` and `Expect`. The credential is sent as `Authorization: <token_type> <value>`, the
header line of `GET /v1/token/{service}?format=header`.

Bodies are streamed both ways. A request body over `max_body_bytes` is refused (413); one
up to `retry_buffer_bytes` is kept, so that a 401 from the service leads to one refresh
(`Store.refresh_now`, at most once per service per window) and one retry with the new
credential. A longer body is not kept, and its 401 goes to the client as it came.
Redirects are passed to the client, never followed; cookies are never kept.

Failures are JSON errors: 502 when the scoring host cannot be reached or its answer is not
HTTP, 504 when it does not answer within `timeout_s`. Once the answer has begun, a failure
can only cut the connection, so that the client sees a truncated answer, never a short
one that looks whole. Each call is logged at debug as `proxy.forwarded` with the service,
method, status and duration: never a URL, a query string or a header value.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeAlias
from urllib.parse import unquote

from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from broker.cache import Store
from broker.config import CloudProfile, ProxyConfig
from broker.errors import (
    BadRequestError,
    LocalRequestError,
    NoScoringUriError,
    PayloadTooLargeError,
)
from broker.log import get_logger
from broker.models import AccessToken
from broker.providers.forwarding import Answer, AnswerCutError, Forwarder, Outgoing
from broker.server.access_rules import API_KEY_HEADER
from broker.server.guards import METADATA_HEADER, PROXY_PREFIX
from broker.server.keys import ACCESS, STORE
from broker.server.request_view import AppRequest

log = get_logger("broker.proxy")

PREFIX = PROXY_PREFIX
ProxyObserver: TypeAlias = Callable[[str, int | None], None]
"""Told of every forwarded call: `(service, status)`, status None when no answer came."""

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Never forwarded: the client's credential, the broker's own headers, and what the
# session sets itself (Host, Content-Length) or handles hop by hop (Expect).
_NOT_FORWARDED = frozenset(
    {
        "authorization",
        METADATA_HEADER.lower(),
        API_KEY_HEADER.lower(),
        "host",
        "content-length",
        "expect",
    }
)
_SEGMENT = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-Fa-f]{2})+")
_QUERY_REFUSED = re.compile(r"[\x00-\x20\x7f#]")
_READ_CHUNK = 1 << 16


class Proxy:
    """The proxy's settings, its forwarder to every scoring host, and who is told of calls."""

    def __init__(
        self, config: ProxyConfig, cloud: CloudProfile, observer: ProxyObserver | None = None
    ) -> None:
        self.config = config
        self.forwarder = Forwarder(config, cloud)  # scoring hosts are verified like Azure's
        self._observer = observer

    async def open(self, app: web.Application | None = None) -> None:
        """Open the forwarder's session (on the application's start-up)."""
        await self.forwarder.open()

    async def close(self, app: web.Application | None = None) -> None:
        """Close it (on the application's clean-up, after requests have ended)."""
        await self.forwarder.close()

    def observe(
        self,
        service: str,
        method: str,
        status: int | None,
        started: float,
        *,
        retried: bool = False,
    ) -> None:
        log.debug(
            "proxy.forwarded",
            service=service,
            method=method,
            status=status,
            retried=retried,
            duration_s=round(time.perf_counter() - started, 4),
        )
        if self._observer is not None:
            self._observer(service, status)


PROXY = web.AppKey("proxy", Proxy)


def install(app: web.Application, proxy: Proxy) -> None:
    """Add the proxy's routes to `app`, and its session to the app's start and clean-up."""
    app[PROXY] = proxy
    app.on_startup.append(proxy.open)
    app.on_cleanup.append(proxy.close)
    app.router.add_route("*", PREFIX + "{service}", forward)
    app.router.add_route("*", PREFIX + "{service}/{path:.*}", forward)


async def forward(request: web.Request) -> web.StreamResponse:
    """Forward the request to the service's scoring URI with its credential."""
    proxy = request.app[PROXY]
    store = request.app[STORE]
    service = request.match_info["service"]
    request.app[ACCESS].authorize(AppRequest(request), service)
    if not store.entry(service).provider.has_scoring_host:
        raise NoScoringUriError(
            f'service {service!r} is an Entra scope (kind = "entra"): it has no scoring URI '
            f"to forward to; fetch its token from /v1/token/{service} and call the API yourself"
        )
    tail, query = split_target(request.raw_path)
    length = request.content_length
    if length is not None and length > proxy.config.max_body_bytes:
        raise _too_large(proxy.config)
    entry = await store.credential(service)  # 503 while there is none
    url = upstream_url(service, entry.provider.scoring_uri, tail, query)
    assert entry.token is not None  # a usable entry has one
    body = await _Body.read(request, proxy.config)
    outgoing = Outgoing(service, request.method, url, forwarded_headers(request.headers), body)
    return await _exchange(request, proxy, store, outgoing, entry.token)


async def _exchange(
    request: web.Request, proxy: Proxy, store: Store, outgoing: Outgoing, token: AccessToken
) -> web.StreamResponse:
    started = time.perf_counter()
    answer = await _attempt(proxy, outgoing, token, started)
    try:
        prefix, retried = b"", False
        if answer.status == 401 and outgoing.body.replayable:
            prefix, complete = await _hold(answer, proxy.config.retry_buffer_bytes)
            newer = await _newer_credential(store, outgoing.service, token) if complete else None
            if newer is not None:
                answer.release()
                answer = await _attempt(proxy, outgoing, newer, started)
                prefix, retried = b"", True
        proxy.observe(outgoing.service, outgoing.method, answer.status, started, retried=retried)
        return await _relay(request, answer, prefix, outgoing.service)
    finally:
        answer.release()


async def _attempt(proxy: Proxy, outgoing: Outgoing, token: AccessToken, started: float) -> Answer:
    """One call to the scoring host; a failure is counted, then raised as it came."""
    try:
        return await proxy.forwarder.send(outgoing, token)
    except LocalRequestError:
        proxy.observe(outgoing.service, outgoing.method, None, started)
        raise


async def _newer_credential(store: Store, service: str, sent: AccessToken) -> AccessToken | None:
    """A credential other than the refused one, after asking for a refresh; None if none."""
    try:
        entry = await store.refresh_now(service)
    except LocalRequestError:
        return None
    token = entry.token
    return token if token is not None and token.value != sent.value else None


async def _hold(answer: Answer, limit: int) -> tuple[bytes, bool]:
    """Up to `limit` bytes of the answer's body, and whether that is all of it."""
    held = bytearray()
    while len(held) <= limit:
        try:
            chunk = await answer.read(limit + 1 - len(held))
        except AnswerCutError:
            break  # relaying what came, the failure recurs and cuts the answer
        if not chunk:
            return bytes(held), True
        held += chunk
    return bytes(held), False


async def _relay(
    request: web.Request, answer: Answer, prefix: bytes, service: str
) -> web.StreamResponse:
    """The scoring host's answer to the client: read whole and sent in one write when it
    declares a length of at most 64 KiB (a scoring answer, mostly), streamed otherwise."""
    headers = returned_headers(answer.headers)
    declared = _declared_length(request, answer)
    if declared is not None:
        held, complete = await _hold(answer, _READ_CHUNK - len(prefix))
        prefix += held
        if complete and len(prefix) == declared:
            whole = web.Response(status=answer.status, reason=answer.reason, body=prefix)
            for name, value in headers:
                if name.lower() != "content-length":  # the body's own, the same number
                    whole.headers.add(name, value)
            return whole
        # Cut, or not the length it declared: relayed as it came, and cut as it was.
    response = web.StreamResponse(status=answer.status, reason=answer.reason)
    for name, value in headers:
        response.headers.add(name, value)
    await response.prepare(request)
    chunk = prefix
    while True:
        if chunk:
            try:
                await response.write(chunk)
            except ConnectionError:
                return response  # the client left; the upstream connection is dropped
        try:
            chunk = await answer.read(_READ_CHUNK)
        except AnswerCutError as exc:
            return _cut(request, response, service, str(exc))
        if not chunk:
            break
    await response.write_eof()
    return response


def _declared_length(request: web.Request, answer: Answer) -> int | None:
    """The answer's Content-Length when its body can be read whole first: at most 64 KiB,
    and a body there is (not an answer to HEAD, nor a 1xx, 204 or 304)."""
    if request.method == "HEAD" or answer.status < 200 or answer.status in (204, 304):
        return None
    values = answer.headers.getall(hdrs.CONTENT_LENGTH, ())
    if len(values) != 1 or not values[0].isdigit():
        return None
    length = int(values[0])
    return length if length <= _READ_CHUNK else None


def _cut(
    request: web.Request, response: web.StreamResponse, service: str, reason: str
) -> web.StreamResponse:
    """End a begun answer by closing the connection: what was sent must not look whole."""
    log.debug("proxy.cut", service=service, reason=reason)
    response.force_close()
    if request.transport is not None:
        request.transport.close()
    return response


@dataclass(slots=True)
class _Body:
    """A request body: kept whole when short enough to send twice, else streamed."""

    request: web.Request
    config: ProxyConfig
    kept: bytes
    replayable: bool
    length: int | None  # the client's Content-Length, if it sent one

    @classmethod
    async def read(cls, request: web.Request, config: ProxyConfig) -> _Body:
        length = request.content_length
        if not request.body_exists and length is None:
            return cls(request, config, b"", True, None)
        keep = config.retry_buffer_bytes
        if length is not None and length > keep:
            return cls(request, config, b"", False, length)
        kept = bytearray()
        while len(kept) <= keep:
            chunk = await request.content.read(keep + 1 - len(kept))
            if not chunk:
                return cls(request, config, bytes(kept), True, length)
            kept += chunk
        return cls(request, config, bytes(kept), False, length)

    @property
    def streamed_length(self) -> int | None:
        return None if self.replayable else self.length

    def data(self) -> bytes | AsyncIterator[bytes] | None:
        if not self.replayable:
            return self._stream()
        return self.kept if self.length is not None or self.request.body_exists else None

    async def _stream(self) -> AsyncIterator[bytes]:
        size = len(self.kept)
        if self.kept:
            yield self.kept
        while chunk := await self.request.content.read(_READ_CHUNK):
            size += len(chunk)
            if size > self.config.max_body_bytes:
                raise _too_large(self.config)  # the forwarder raises it as it is
            yield chunk


def _too_large(config: ProxyConfig) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"the request body is longer than {config.max_body_bytes} bytes, the limit of "
        "[proxy] max_body_bytes"
    )


def split_target(raw_path: str) -> tuple[str, str]:
    """The path after `/v1/proxy/{service}/` and the query string, both still encoded;
    raises `BadRequestError` for a path that could leave the scoring URI's directory."""
    path, _, query = raw_path.partition("?")
    _, _, tail = path[len(PREFIX) :].partition("/")
    segments = tail.split("/")
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if (segment or not last) and not _safe_segment(segment):
            raise BadRequestError(
                "the path after /v1/proxy/{service}/ must stay in the scoring URI's "
                "directory: no empty, '.' or '..' segments, and no encoded '/', '\\' or NUL",
                code="bad_proxy_path",
            )
    if _QUERY_REFUSED.search(query):
        raise BadRequestError("the query string holds characters a URI may not", code="bad_query")
    return tail, query


def _safe_segment(segment: str) -> bool:
    if not _SEGMENT.fullmatch(segment):
        return False
    decoded = segment
    for _ in range(3):  # a host that decodes twice must not find a '..' either
        decoded = unquote(decoded)
        if any(c in decoded for c in "/\\\x00") or decoded.split(";", 1)[0] in (".", ".."):
            return False
    return True


def upstream_url(service: str, scoring_uri: str | None, tail: str, query: str) -> URL:
    """Where the request goes: `tail` in the scoring URI's directory, on its host."""
    base = URL(scoring_uri) if scoring_uri else None
    if base is None or base.scheme not in ("http", "https") or not base.host:
        raise NoScoringUriError(
            f"Azure gave no usable scoring URI for service {service!r}, so requests cannot "
            "be forwarded to it; check the deployment in Azure ML studio"
        )
    directory, _, name = base.raw_path.rpartition("/")
    if tail in ("", name):
        path, queries = base.raw_path, [base.raw_query_string, query]
    else:
        path, queries = f"{directory}/{tail}", [query]
    url = URL.build(
        scheme=base.scheme,
        authority=base.raw_authority,
        path=path,
        query_string="&".join(q for q in queries if q),
        encoded=True,
    )
    assert url.origin() == base.origin()
    return url


def forwarded_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The client's headers to send on: no hop-by-hop ones, no credential, no broker's own."""
    dropped = _HOP_BY_HOP | _NOT_FORWARDED | _named_in_connection(headers)
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in dropped)


def returned_headers(headers: CIMultiDictProxy[str]) -> list[tuple[str, str]]:
    """The scoring host's headers to return: no hop-by-hop ones."""
    dropped = _HOP_BY_HOP | _named_in_connection(headers)
    return [(k, v) for k, v in headers.items() if k.lower() not in dropped]


def _named_in_connection(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    return frozenset(
        name.strip().lower()
        for value in headers.getall(hdrs.CONNECTION, ())
        for name in value.split(",")
        if name.strip()
    )
