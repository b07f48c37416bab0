"""The proxy's client: one pooled HTTPS session to every scoring host, and the one place
the failures of a forwarded call are translated.

The server decides what is forwarded (routes, guards, headers, paths); this module sends
it and receives the answer. A scoring host is verified like Azure's own hosts (the cloud
profile's CA bundle), proxy variables are ignored, bodies pass through as sent (no
decompression) and cookies are never kept. Nothing above this module sees an aiohttp
exception: a call that gets no answer raises `UpstreamTimeoutError` or
`UpstreamUnreachableError`, an answer cut while it is read raises `AnswerCutError`, and a
refusal raised by the body being sent (its size limit) comes out as itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import aiohttp
from aiohttp import hdrs
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from broker.config import CloudProfile, ProxyConfig
from broker.errors import (
    BrokerError,
    LocalRequestError,
    UpstreamTimeoutError,
    UpstreamUnreachableError,
)
from broker.log import scrub
from broker.models import AccessToken
from broker.providers.upstream import ssl_context


class AnswerCutError(BrokerError):
    """Raised when a scoring host's answer stops before its end (reset, timeout)."""


class OutgoingBody(Protocol):
    """What is sent as a forwarded request's body."""

    @property
    def replayable(self) -> bool:
        """Whether the body is kept whole, so that it can be sent a second time."""

    @property
    def streamed_length(self) -> int | None:
        """The Content-Length to declare for a streamed body; None when the session
        knows the length itself (a kept body) or there is none to declare."""

    def data(self) -> bytes | AsyncIterator[bytes] | None: ...


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One forwarded request: where it goes, what goes with it, and the service it is for."""

    service: str
    method: str
    url: URL
    headers: CIMultiDict[str]
    body: OutgoingBody


class Answer:
    """A scoring host's answer while it is received; `release()` when done with it."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.reason = response.reason
        self.headers: CIMultiDictProxy[str] = response.headers

    async def read(self, most: int) -> bytes:
        """Up to `most` further bytes of the body; b"" at its end."""
        try:
            return await self._response.content.read(most)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise AnswerCutError(type(exc).__name__) from None

    def release(self) -> None:
        self._response.release()


class Forwarder:
    """The pooled session to scoring hosts, opened on start-up and closed on clean-up.

    The session and its TLS context (the system's CA store, about 1-2 MiB of resident
    memory) are made by the first forwarded call, so that a broker whose proxy is never
    called does not hold them."""

    def __init__(self, config: ProxyConfig, cloud: CloudProfile) -> None:
        self.config = config
        self._cloud = cloud
        self._opened = False
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        self._opened = True

    def _pool(self) -> aiohttp.ClientSession:
        assert self._opened, "the forwarder is opened at start-up"
        if self._session is not None:
            return self._session
        config = self.config
        connector = aiohttp.TCPConnector(ssl=ssl_context(self._cloud), limit=config.max_connections)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=config.timeout_s, sock_connect=config.connect_timeout_s
            ),
            trust_env=False,  # proxy variables must not redirect credential traffic
            auto_decompress=False,  # bodies pass through as sent, Content-Encoding and all
            cookie_jar=aiohttp.DummyCookieJar(),  # one client's cookies are not another's
            max_line_size=config.max_header_bytes,
            max_field_size=config.max_header_bytes,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )
        return self._session

    async def close(self) -> None:
        self._opened = False
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, outgoing: Outgoing, credential: AccessToken) -> Answer:
        """Send `outgoing` with `credential`; the answer once its headers have come."""
        session = self._pool()
        headers = outgoing.headers.copy()
        headers[hdrs.AUTHORIZATION] = f"{credential.token_type} {credential.value}"
        length = outgoing.body.streamed_length
        if length is not None:
            headers[hdrs.CONTENT_LENGTH] = str(length)
        try:
            response = await session.request(
                outgoing.method,
                outgoing.url,
                headers=headers,
                data=outgoing.body.data(),
                allow_redirects=False,
            )
        except TimeoutError:
            raise UpstreamTimeoutError(
                f"{_host(outgoing)} did not answer within {self.config.timeout_s:g} s "
                "([proxy] timeout_s); nothing was returned"
            ) from None
        except aiohttp.ClientResponseError as exc:
            raise UpstreamUnreachableError(
                f"the answer from {_host(outgoing)} is not valid HTTP or its headers are "
                f"longer than {self.config.max_header_bytes} bytes ([proxy] "
                f"max_header_bytes): {scrub(str(exc.message))[:120]}"
            ) from None
        except aiohttp.ClientError as exc:
            refusal = _refusal_of_the_body(exc)
            if refusal is not None:
                raise refusal from None
            raise UpstreamUnreachableError(
                f"cannot reach {_host(outgoing)}: {_reason(exc)}"
            ) from None
        return Answer(response)


def _host(outgoing: Outgoing) -> str:
    return str(outgoing.url.origin())


def _refusal_of_the_body(exc: BaseException) -> LocalRequestError | None:
    """The broker's own refusal raised while the body was sent (aiohttp wraps it)."""
    cause = exc.__cause__
    while cause is not None:
        if isinstance(cause, LocalRequestError):
            return cause
        cause = cause.__cause__
    return None


def _reason(exc: aiohttp.ClientError) -> str:
    """Why a connection failed, without the URL aiohttp puts in its messages."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return exc.strerror or "connection refused"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the connection was closed before an answer came"
    return type(exc).__name__
