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
every route. Who may fetch which service is `access.py`'s business.
"""

from __future__ import annotations

import ipaddress
import re
import socket

from aiohttp import web
from multidict import CIMultiDictProxy

from broker.errors import BadRequestError, ForbiddenError

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


def is_unix(request: web.Request) -> bool:
    """Whether the request came over the Unix socket.

    A Unix socket's address is its path (`str`, or `bytes` in the abstract namespace), a
    TCP socket's a tuple: asking the transport for it is a dictionary lookup, where the
    socket's `family` builds an enum on every request."""
    transport = request.transport
    if transport is None:
        return False
    address = transport.get_extra_info("sockname")
    if address is None:  # getsockname() failed when the connection was made
        sock = transport.get_extra_info("socket")
        return sock is not None and sock.family == socket.AF_UNIX
    return isinstance(address, str | bytes)


def check(request: web.Request) -> None:
    """Raise the refusal for a request that fails a guard."""
    suspect = encoded = False
    seen = 0
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
        elif seen & kind:
            raise _duplicate(name)
        else:
            seen |= kind
    if suspect:
        _check_all(request)  # the rare request that may be refused for its headers
    elif not request.raw_path.startswith("/"):
        raise _absolute_form()
    else:
        _check_host_and_metadata(request, request.headers)
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
# by its mere presence, one that may come once (a bit each), or Content-Encoding.
_SUSPECT, _ENCODING = 0, 1 << 8
_FORWARDED = frozenset(name.lower().encode() for name in FORWARDING_HEADERS)
_WATCHED: dict[bytes, int] = {
    **{name: _SUSPECT for name in _FORWARDED},
    b"origin": _SUSPECT,
    b"access-control-request-method": _SUSPECT,
    **{name.lower().encode(): 1 << i for i, name in enumerate(SINGLE_HEADERS)},
    b"content-encoding": _ENCODING,
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


def _check_all(request: web.Request) -> None:
    headers = request.headers
    for name, _ in request.raw_headers:
        if _forwarded(name.lower()):
            raise BadRequestError(
                f"forwarded requests are refused ({name.decode('latin-1')[:60]} header "
                "present): the broker serves local clients directly and never sits behind a "
                "proxy",
                code="forwarded_request",
            )
    if not request.raw_path.startswith("/"):
        raise _absolute_form()
    if "Origin" in headers or (
        request.method == "OPTIONS" and "Access-Control-Request-Method" in headers
    ):
        raise ForbiddenError(
            "requests from web browsers are refused (Origin header or CORS preflight present)",
            code="browser_request",
        )
    _check_host_and_metadata(request, headers)


def _check_host_and_metadata(request: web.Request, headers: CIMultiDictProxy[str]) -> None:
    if not is_unix(request) and not loopback_host(headers.get("Host", "")):
        raise ForbiddenError(
            f"Host {headers.get('Host', '')[:100]!r} is not a loopback name; the broker answers "
            "only to localhost, 127.0.0.1 or [::1]",
            code="host_not_allowed",
        )
    if (
        request.path.startswith(_METADATA_PATHS)
        and headers.get(METADATA_HEADER, "").lower() != "true"
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
