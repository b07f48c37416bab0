"""Request guards: the same defences the cloud metadata services put on theirs.

    forwarded      `Forwarded`/`X-Forwarded-*`/`X-Real-IP` present → 400: the broker never
                   sits behind a proxy, so such a request was relayed by something
    absolute form  `GET http://host/…` → 400, whatever its Host: a confused proxy
    browser        an `Origin` header or a CORS preflight → 403: web pages must not read tokens
    host           on TCP, a `Host` that is not a loopback name → 403: DNS rebinding
    metadata       `/v1/…` and `/metadata/…` without `Metadata: true` → 400: blocks server-side
                   request forgery through apps that fetch URLs for their users, which cannot
                   add headers (the App Service route requires its identity header instead)

`/healthz`, `/readyz` and `/metrics` need no Metadata header; the other guards hold on
every route. Who may fetch which service is `access.py`'s business.
"""

from __future__ import annotations

import ipaddress
import socket

from aiohttp import web
from multidict import CIMultiDictProxy

from broker.errors import BadRequestError, ForbiddenError

METADATA_HEADER = "Metadata"
FORWARDING_HEADERS = (
    "Forwarded",
    "X-Forwarded-For",
    "X-Forwarded-Host",
    "X-Forwarded-Proto",
    "X-Real-IP",
)
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
    for name, _ in request.raw_headers:
        if name.lower() in _SUSPECT_NAMES:
            _check_all(request)  # the rare request that may be refused for its headers
            return
    # No forwarding, Origin or CORS header: the checks that remain, in the same order.
    if not request.raw_path.startswith("/"):
        raise _absolute_form()
    _check_host_and_metadata(request, request.headers)


# Lowercased names of the headers that can get a request refused by their mere presence.
_SUSPECT_NAMES = frozenset(
    name.lower().encode()
    for name in (*FORWARDING_HEADERS, "Origin", "Access-Control-Request-Method")
)


def _absolute_form() -> BadRequestError:
    return BadRequestError(
        "a request line in absolute form (GET http://host/…) is refused; ask for the path",
        code="absolute_form",
    )


def _check_all(request: web.Request) -> None:
    headers = request.headers
    for name in FORWARDING_HEADERS:
        if name in headers:
            raise BadRequestError(
                f"forwarded requests are refused ({name} header present): the broker serves "
                "local clients directly and never sits behind a proxy",
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


def _parse_loopback_host(host: str) -> bool:
    name = host.strip().lower()
    if name.startswith("["):
        name = name[1 : name.find("]")] if "]" in name else ""
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    if name in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
