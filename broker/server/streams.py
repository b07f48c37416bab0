"""The open watch streams (`GET /v1/token/{service}?watch=true`), and when each must end.

A stream is judged again whenever it has something to send and whenever the access rules
change (a reload): by who opened it — the peer's credentials as the kernel gave them at
open, or the digest of the API key it presented — against the rules of now. It ends, with
a last `event: end` naming why, when that caller may no longer fetch the service
(`access_revoked`), when the service is removed (`service_removed`), or at
`[listen] stream_max_age_s` (`max_age`), so that every client comes back through the
guards at least that often. A client that leaves frees its stream's place at once
(`client_gone`), not at the next heartbeat.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web

from broker.cache import Entry, Store
from broker.errors import LocalRequestError
from broker.log import get_logger
from broker.server.access_rules import AccessRules, presented_digest
from broker.server.connections import Connection, Connections, ListenerName
from broker.server.peers import Peer
from broker.server.request_view import AppRequest

log = get_logger("broker.watch")

END_REASONS = ("access_revoked", "max_age", "service_removed", "client_gone", "shutdown")
_ENDINGS = {
    "access_revoked": "this caller may no longer fetch the service; access was withdrawn",
    "max_age": "the stream reached [listen] stream_max_age_s; open a new one",
    "service_removed": "the service is no longer configured",
}
_FULL = {
    "max_streams": "the broker holds as many watch streams as [listen] max_streams allows",
    "listener_share": "this listener's clients hold their share of watch streams "
    "([listen] tcp_share)",
    "uid_share": "this user holds its share of watch streams ([listen] uid_share)",
}


class TooManyStreamsError(LocalRequestError):
    """Raised when a watch stream would pass `max_streams` or a share of it."""

    status = 503
    code = "too_many_streams"


class StreamObserver(Protocol):
    """Told of every stream that opens and every one that ends, with why."""

    def stream_opened(self, listener: str) -> None: ...

    def stream_closed(self, listener: str, reason: str) -> None: ...


@dataclass(eq=False, slots=True)
class Stream:
    """One open stream: what it watches and who opened it, as they were at open."""

    service: str
    listener: ListenerName
    peer: Peer | None
    key_digest: bytes | None  # the presented API key's SHA-256, never the key
    opened_at: float  # on the broker's clock
    connection: Connection | None
    task: asyncio.Task[object] | None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    gone: bool = False

    def left(self) -> None:
        self.gone = True
        self.wake.set()


class Streams:
    """Every open watch stream of the application."""

    def __init__(
        self,
        store: Store,
        access: AccessRules,
        connections: Connections,
        observer: StreamObserver | None = None,
    ) -> None:
        self._store = store
        self._access = access
        self._connections = connections
        self._open: set[Stream] = set()
        self.observer = observer
        store.on_result(self._fetched)
        access.on_update(self.rejudge)

    def __len__(self) -> int:
        return len(self._open)

    def open(self, request: web.Request, service: str) -> Stream:
        """Count a new stream of `service` for the request's caller; raise
        `TooManyStreamsError` when its listener, its uid or the broker has no place left."""
        connection = self._connections.of(request.transport)
        if connection is not None:
            full = self._connections.claim_stream(connection)
            if full is not None:
                raise TooManyStreamsError(
                    f"{_FULL[full]}; try again later, or fetch the token without watch=true",
                    retry_after=1,
                )
        caller = AppRequest(request)
        unix = caller.unix
        stream = Stream(
            service,
            "unix" if unix else "tcp",
            caller.peer if unix else None,
            None if unix else presented_digest(caller),
            self._store.clock(),
            connection,
            asyncio.current_task(),
        )
        if connection is not None:
            connection.on_lost = stream.left
        self._open.add(stream)
        if self.observer is not None:
            self.observer.stream_opened(stream.listener)
        return stream

    def close(self, stream: Stream, reason: str) -> None:
        if stream not in self._open:
            return
        self._open.discard(stream)
        if stream.connection is not None:
            self._connections.end_stream(stream.connection)
        if self.observer is not None:
            self.observer.stream_closed(stream.listener, reason)
        said = log.debug if reason in ("client_gone", "shutdown") else log.info
        said("watch.ended", service=stream.service, listener=stream.listener, reason=reason)

    def verdict(self, stream: Stream) -> str | None:
        """Why the stream must end now, or None while it may go on."""
        if stream.gone:
            return "client_gone"
        if not self._store.has(stream.service):
            return "service_removed"
        if not self._access.permits(
            stream.service, stream.peer, stream.listener == "unix", stream.key_digest
        ):
            return "access_revoked"
        if self.remaining(stream) <= 0:
            return "max_age"
        return None

    @staticmethod
    def ending(reason: str) -> str:
        return _ENDINGS.get(reason, reason)

    @property
    def heartbeat_s(self) -> float:
        """How long a stream may stay quiet before a heartbeat comment ([listen] now)."""
        return self._connections.config.watch_heartbeat_s

    def remaining(self, stream: Stream) -> float:
        """Seconds until the stream reaches its maximum age, by the broker's clock."""
        max_age = self._connections.config.stream_max_age_s
        return stream.opened_at + max_age - self._store.clock()

    def rejudge(self) -> None:
        """Have every stream judged again at once (the rules or the limits changed)."""
        for stream in self._open:
            stream.wake.set()

    def _fetched(self, entry: Entry) -> None:
        for stream in self._open:
            if stream.service == entry.service:
                stream.wake.set()

    def cancel_all(self) -> None:
        """On shutdown: end every stream, so that stopping does not wait out the grace."""
        for stream in tuple(self._open):
            if stream.task is not None:
                stream.task.cancel()
