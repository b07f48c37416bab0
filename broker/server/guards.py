"""Request guards: the same defences the cloud metadata services put on theirs.

    duplicates     two `Metadata`, `X-Token-Broker-Key` or `X-IDENTITY-HEADER` headers → 400:
                   which one a check reads must not be a question
    forwarded      `Forwarded`, `Via`, `X-Forwarded-*`, `X-Real-IP`, `X-Client-IP`,
                   `True-Client-IP` (also spelt with `_`) present → 400: the broker never
                   sits behind a proxy, so such a request was relayed by something
    absolute form  `GET http://host/…` → 400, whatever its Host: a confused proxy
    browser        an `Origin` header or a CORS preflight → 403: web pages must not read tokens
    host           on TCP, a `Host` that is not a loopback name → 403: DNS rebinding
    metadata       `/v1/…` and `/metadata/…` without `Metadata: true` → 400: blocks server-side
                   request forgery through apps that fetch URLs for their users, which cannot
                   add headers (the App Service route requires its identity header instead)
    encoded body   a body with a `Content-Encoding` on any route but the proxy's → 400: the
                   broker decodes no body, and the proxy forwards them as they came

`/healthz`, `/readyz` and `/metrics` need no Metadata header; the other guards hold on
every route. The front door (front_door.py) and aiohttp's middleware (app.py) both call
`check` on a `RequestView` of the same bytes, so they refuse the same requests with the
same errors. Who may fetch which service is `access_rules.py`'s business.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from typing import Protocol

from broker.errors import BadRequestError, ForbiddenError
from broker.server.peers import Peer

METADATA_HEADER = "Metadata"
PROXY_PREFIX = "/v1/proxy/"
FORWARDING_HEADERS = (
    "Forwarded",
    "Via",
    "X-Forwarded-For",
    "X-Forwarded-Host",
    "X-Forwarded-Proto",
    "X-Forwarded-Port",
    "X-Real-IP",
    "X-Client-IP",
    "True-Client-IP",
)
# Headers a guard or an access check reads once: a second one is refused.
SINGLE_HEADERS = (METADATA_HEADER, "X-Token-Broker-Key", "X-IDENTITY-HEADER")
# The token routes, native and IMDS-compatible; /healthz, /readyz and /metrics are open,
# and the App Service route has its own secret header instead.
_METADATA_PATHS = ("/v1/", "/metadata/")
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost", "ip6-loopback"})

RawHeaders = Sequence[tuple[bytes, bytes]]


class RequestView(Protocol):
    """A request as the guards and the access rules read it, whichever parser read it:
    the front door's own record of it, or aiohttp's request behind an adapter
    (`request_view.py`). Both give the same bytes, so both get the same decisions."""

    @property
    def method(self) -> str: ...

    @property
    def raw_path(self) -> str:
        """The request target as sent (UTF-8, undecodable bytes as surrogates)."""

    @property
    def path(self) -> str:
        """The target's path, percent-decoded."""

    @property
    def raw_headers(self) -> RawHeaders:
        """Every header in order, as sent, each value without the whitespace after it."""

    @property
    def body_exists(self) -> bool: ...

    @property
    def unix(self) -> bool:
        """Whether the request came over the Unix socket."""

    @property
    def peer(self) -> Peer | None:
        """The peer's credentials on the Unix socket, read once per connection."""


def header(headers: RawHeaders, lower_name: bytes) -> bytes | None:
    """The first value of a header, as sent; None when it is absent."""
    for name, value in headers:
        if name.lower() == lower_name:
            return value
    return None


def check(request: RequestView) -> None:
    """Raise the refusal for a request that fails a guard."""
    suspect = encoded = False
    seen = 0
    host: bytes | None = None
    metadata = b""
    for name, value in request.raw_headers:
        lower = name.lower()
        kind = _WATCHED.get(lower)
        if kind is None:
            if not suspect and (b"_" in lower or lower.startswith(b"x-forwarded-")):
                suspect = _forwarded(lower)
        elif kind == _SUSPECT:
            suspect = True
        elif kind == _ENCODING:
            encoded = encoded or value.strip().lower() != b"identity"
        elif kind == _HOST_HEADER:
            if host is None:  # a second Host never gets this far: both parsers refuse it
                host = value
        elif seen & kind:
            raise _duplicate(name)
        else:
            seen |= kind
            if kind == _METADATA:
                metadata = value
    if suspect:
        _check_all(request)  # the rare request that may be refused for its headers
    elif not request.raw_path.startswith("/"):
        raise _absolute_form()
    _check_host_and_metadata(request, host or b"", metadata)
    if encoded and request.body_exists and not request.path.startswith(PROXY_PREFIX):
        raise BadRequestError(
            "the broker's own routes take no encoded body: send it without Content-Encoding "
            "(only /v1/proxy/ passes one on, as it came)",
            code="encoded_body",
        )


def _forwarded(lower: bytes) -> bool:
    """Whether a lowercased header name is a proxy's, also spelt with `_` for `-`."""
    name = lower.replace(b"_", b"-")
    return name in _FORWARDED or name.startswith(b"x-forwarded-")


# What a lowercased header name means to `check`: a header that can get a request refused
# by its mere presence, one that may come once (a bit each), Content-Encoding, or Host.
_SUSPECT, _ENCODING, _HOST_HEADER = 0, 1 << 8, 1 << 9
_METADATA = 1 << SINGLE_HEADERS.index(METADATA_HEADER)
_FORWARDED = frozenset(name.lower().encode() for name in FORWARDING_HEADERS)
_WATCHED: dict[bytes, int] = {
    **{name: _SUSPECT for name in _FORWARDED},
    b"origin": _SUSPECT,
    b"access-control-request-method": _SUSPECT,
    **{name.lower().encode(): 1 << i for i, name in enumerate(SINGLE_HEADERS)},
    b"content-encoding": _ENCODING,
    b"host": _HOST_HEADER,
}


def _duplicate(name: bytes) -> BadRequestError:
    return BadRequestError(
        f"the {name.decode('latin-1')} header may be sent once; this request has two",
        code="duplicate_header",
    )


def _absolute_form() -> BadRequestError:
    return BadRequestError(
        "a request line in absolute form (GET http://host/…) is refused; ask for the path",
        code="absolute_form",
    )


def _check_all(request: RequestView) -> None:
    headers = request.raw_headers
    for name, _ in headers:
        if _forwarded(name.lower()):
            raise BadRequestError(
                f"forwarded requests are refused ({name.decode('latin-1')[:60]} header "
                "present): the broker serves local clients directly and never sits behind a "
                "proxy",
                code="forwarded_request",
            )
    if not request.raw_path.startswith("/"):
        raise _absolute_form()
    names = {name.lower() for name, _ in headers}
    if b"origin" in names or (
        request.method == "OPTIONS" and b"access-control-request-method" in names
    ):
        raise ForbiddenError(
            "requests from web browsers are refused (Origin header or CORS preflight present)",
            code="browser_request",
        )


def _check_host_and_metadata(request: RequestView, host: bytes, metadata: bytes) -> None:
    if not request.unix:
        name = host.decode("utf-8", "surrogateescape")
        if not loopback_host(name):
            raise ForbiddenError(
                f"Host {name[:100]!r} is not a loopback name; the broker answers "
                "only to localhost, 127.0.0.1 or [::1]",
                code="host_not_allowed",
            )
    if (
        request.path.startswith(_METADATA_PATHS)
        and metadata.decode("utf-8", "surrogateescape").lower() != "true"
    ):
        raise BadRequestError(
            f"send the header '{METADATA_HEADER}: true' with every request to /v1/ routes",
            code="missing_metadata_header",
        )


def loopback_host(host: str) -> bool:
    """Whether a Host header names this machine's loopback interface (with any port)."""
    known = _loopback_hosts.get(host)
    if known is None:
        known = _parse_loopback_host(host)
        if known:  # only answers to remember: refused names cannot fill the cache
            if len(_loopback_hosts) >= _LOOPBACK_CACHE_SIZE:
                _loopback_hosts.clear()
            _loopback_hosts[host] = True
    return known


# Clients send the same Host on every request; parsing it with `ipaddress` each time was
# a tenth of the TCP request's cost.
_LOOPBACK_CACHE_SIZE = 256
_loopback_hosts: dict[str, bool] = {}


# `name`, `[v6 address]`, each with an optional `:port` of digits and nothing after.
_HOST = re.compile(r"(?:\[([^\[\]]*)\]|([^\[\]:]*))(?::[0-9]{0,5})?")


def _parse_loopback_host(host: str) -> bool:
    text = host.strip().lower()
    if text.count(":") > 1 and not text.startswith("["):
        name = text  # a bare IPv6 address, which cannot carry a port
    else:
        match = _HOST.fullmatch(text)
        if match is None:
            return False
        name = match[1] if match[1] is not None else match[2]
    if name in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
