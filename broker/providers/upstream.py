"""HTTPS calls to ARM and Azure ML, and the one place their failures are translated.

Every call is bounded by a total timeout. A non-2xx answer becomes the matching
`UpstreamError` with Azure's own code and message (scrubbed of secrets); an
unparseable body becomes `MalformedResponseError`. Nothing above this module sees
an aiohttp exception.
"""

from __future__ import annotations

import email.utils
import json
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import aiohttp
from yarl import URL

from broker.config import CloudProfile
from broker.errors import (
    MalformedResponseError,
    NotFoundError,
    PermissionDeniedError,
    ThrottledError,
    UnavailableError,
    UpstreamError,
)
from broker.log import get_logger, scrub
from broker.models import Clock, system_clock

log = get_logger("broker.upstream")

_MAX_BODY = 1 << 20  # Azure's answers are small; anything larger is not one of them

UpstreamObserver: TypeAlias = Callable[[str, str, int | None, float], None]
"""Told of every call once it ends: `(route, url, status, seconds)`; status None when no
answer came (timeout, refused, reset). Defined here so that this layer needs no metrics."""


@dataclass(frozen=True, slots=True)
class Reply:
    """A successful upstream answer: its status, JSON body and headers we use."""

    status: int
    body: Any
    headers: dict[str, str]


def ssl_context(cloud: CloudProfile) -> ssl.SSLContext:
    """Verify against the profile's CA bundle when it has one, else the system's."""
    if cloud.ca_bundle:
        return ssl.create_default_context(cafile=str(cloud.ca_bundle))
    return ssl.create_default_context()


class Upstream:
    """A shared aiohttp session for every service's Azure calls."""

    def __init__(
        self,
        cloud: CloudProfile,
        timeout_s: float = 30.0,
        *,
        observer: UpstreamObserver | None = None,
        clock: Clock = system_clock,
    ) -> None:
        self._cloud = cloud
        self._clock = clock
        self._timeout = _timeout(timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._observer = observer

    def set_timeout(self, timeout_s: float) -> None:
        """Bound the calls made from now on by `timeout_s` (a reloaded `[refresh]`)."""
        self._timeout = _timeout(timeout_s)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=ssl_context(self._cloud), limit=32)
            # trust_env stays False: proxy variables must not redirect credential traffic.
            self._session = aiohttp.ClientSession(connector=connector, trust_env=False)
        return self._session

    async def call(
        self,
        method: str,
        url: str,
        *,
        route: str,
        bearer: str | None = None,
        what: str = "",
        json_body: object = None,
    ) -> Reply:
        """Send one request; return the 2xx reply or raise the translated error."""
        headers = {"Accept": "application/json"}
        if bearer is not None:
            headers["Authorization"] = f"Bearer {bearer}"
        if method == "POST":
            headers["Content-Type"] = "application/json"
        started = time.perf_counter()
        try:
            data = None if json_body is None else json.dumps(json_body).encode()
            request = self._client().request(
                method, url, headers=headers, data=data, timeout=self._timeout
            )
            async with request as resp:
                raw = await resp.content.read(_MAX_BODY + 1)
                reply_headers = {k: v for k, v in resp.headers.items() if k in _KEPT_HEADERS}
                status = resp.status
        except TimeoutError:
            self._observe(route, url, None, started)
            raise UnavailableError(
                f"{route}: no answer from {_host(url)} within the timeout", route=route
            ) from None
        except aiohttp.ClientError as exc:
            self._observe(route, url, None, started)
            raise UnavailableError(
                f"{route}: cannot reach {_host(url)}: {scrub(str(exc)) or type(exc).__name__}",
                route=route,
            ) from None
        self._observe(route, url, status, started)
        if len(raw) > _MAX_BODY:
            raise MalformedResponseError(f"{route}: answer larger than 1 MiB", route=route)
        if status >= 300:
            raise translate(status, raw, reply_headers, route=route, what=what, now=self._clock())
        return Reply(status, _json(raw, route) if raw else None, reply_headers)

    def _observe(self, route: str, url: str, status: int | None, started: float) -> None:
        # A cancelled call is left out: it neither failed nor got an answer.
        if self._observer is not None:
            self._observer(route, url, status, time.perf_counter() - started)


def _timeout(timeout_s: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(timeout_s, 10.0))


_KEPT_HEADERS = frozenset(
    {"Retry-After", "Date", "Operation-Location", "Location", "Azure-AsyncOperation"}
)


def _host(url: str) -> str:
    return str(URL(url).origin())


def _json(raw: bytes, route: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise MalformedResponseError(f"{route}: the answer is not JSON", route=route) from None


def azure_message(raw: bytes) -> tuple[str | None, str]:
    """Azure's error code and message from either ARM's or MMS's error shape."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None, scrub(raw[:200].decode("utf-8", "replace")).strip()
    if not isinstance(body, dict):
        return None, ""
    inner = body.get("error", body)
    if isinstance(inner, str):
        return inner, scrub(str(body.get("error_description", body.get("message", ""))))
    if not isinstance(inner, dict):
        return None, ""
    code = inner.get("code")
    message = inner.get("message", "")
    return (str(code) if code else None), scrub(str(message))


def retry_after(headers: dict[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` of either form (seconds or HTTP date).

    A date is on Azure's clock, so it is measured from the same answer's `Date` when
    there is one, else from `now` (the broker's clock); with neither it counts as absent.
    """
    value = headers.get("Retry-After")
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    when = _http_date(value)
    sent = _http_date(headers.get("Date", "")) if headers.get("Date") else now
    if when is None or sent is None:
        return None
    return max(0.0, when - sent)


def _http_date(value: str) -> float | None:
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def translate(
    status: int,
    raw: bytes,
    headers: dict[str, str],
    *,
    route: str,
    what: str,
    now: float | None = None,
) -> UpstreamError:
    """The `UpstreamError` for a non-2xx answer, carrying Azure's code and message."""
    code, message = azure_message(raw)
    detail = (
        f"{route}: HTTP {status}"
        + (f" {code}" if code else "")
        + (f": {message}" if message else "")
    )
    hint = f" ({what})" if what else ""
    if status == 403:
        return PermissionDeniedError(detail + hint, status=status, route=route)
    if status == 404:
        return NotFoundError(detail + hint, status=status, route=route)
    if status == 429:
        return ThrottledError(
            detail, status=status, retry_after=retry_after(headers, now), route=route
        )
    if status >= 500 or status == 408:
        return UnavailableError(
            detail, status=status, retry_after=retry_after(headers, now), route=route
        )
    error = UpstreamError(detail + hint, status=status, route=route)
    error.retryable = status == 401  # a rejected ARM token heals with the next sign-in
    return error
