"""Who holds the broker's connections, the shares they are held to, and which to let go.

    max_connections  every open connection, both listeners together
    tcp_share        of those, what the TCP listener's clients may hold together (on TCP a
                     client has no identity); the socket's clients hold the rest, so that
                     neither listener can starve the other
    uid_share        what one peer uid may hold on the socket
    max_streams      watch streams, a cap of their own below max_connections, shared out
                     between listeners and uids by the same shares

A new connection that finds its uid's share, its listener's share or the whole full takes
the place of the quietest connection there: one that waits for a request (idle between
requests, or trickling one in) or for the bytes of a body. Only when every connection
there is busy being answered is the new one refused, with a 503 naming the limit. A
stream is never quiet: it is capped instead, and plain requests keep what streams cannot
take. Each refusal and each connection let go is told to the observer (the metrics).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

from broker.config import ListenConfig
from broker.server.peers import Peer

ListenerName = Literal["unix", "tcp"]
LISTENER_NAMES: tuple[ListenerName, ...] = ("unix", "tcp")
# Why a connection or a stream was refused: the limit that was full.
REFUSALS = ("max_connections", "max_streams", "listener_share", "uid_share")
# Why the broker let a connection go: a body stalled, or a newer connection took its place.
CUTS = ("stalled_body", "evicted")

Holder = tuple[str, object]  # ("all", None), ("listener", "tcp"), ("uid", 1000)
_ALL: Holder = ("all", None)


class ConnectionObserver(Protocol):
    """Told of every refused connection or stream and every connection the broker cuts."""

    def connection_refused(self, listener: str, reason: str) -> None: ...

    def connection_cut(self, listener: str, reason: str) -> None: ...


@dataclass(eq=False, slots=True)
class Connection:
    """One open connection, as the listener admitted it."""

    listener: ListenerName
    uid: int | None  # the peer's, read once from the kernel on the socket; None on TCP
    transport: asyncio.BaseTransport
    last_active: float  # the loop's time of the client's last bytes
    busy: int = 0  # requests whose handler is running (the middleware counts them)
    awaiting_body: bool = False  # a request's headers came and its body has not
    streaming: bool = False
    on_lost: Callable[[], None] | None = None  # a stream's: told at once when the client leaves
    peer: Peer | None = None  # the socket peer's credentials, read from the kernel at admission
    front_door: bool = False  # answered by the front door, not (yet) handed to aiohttp

    @property
    def quiet(self) -> bool:
        """Waiting on the client: for a request, or for a body's bytes."""
        return not self.streaming and (self.busy == 0 or self.awaiting_body)

    @property
    def holders(self) -> tuple[Holder, ...]:
        if self.uid is None:
            return (_ALL, ("listener", self.listener))
        return (_ALL, ("listener", self.listener), ("uid", self.uid))


_REASON_OF = {"all": None, "listener": "listener_share", "uid": "uid_share"}


class Connections:
    """Every open connection of both listeners, and the limits they are held to."""

    def __init__(
        self, config: ListenConfig | None = None, observer: ConnectionObserver | None = None
    ) -> None:
        self.config = config or ListenConfig()
        self.observer = observer
        self.served: set[ListenerName] = set()  # the listeners that are open
        self._open: dict[asyncio.BaseTransport, Connection] = {}
        self._held: Counter[Holder] = Counter()
        self._streams: Counter[Holder] = Counter()

    def configure(self, config: ListenConfig) -> None:
        """Hold connections and streams to `config`'s limits from now on (a reload): what
        is open stays open, and new ones wait until the count is under the new limits."""
        self.config = config

    def __len__(self) -> int:
        return len(self._open)

    def __iter__(self) -> Iterator[Connection]:
        return iter(tuple(self._open.values()))

    def of(self, transport: asyncio.BaseTransport | None) -> Connection | None:
        return None if transport is None else self._open.get(transport)

    def cap(self, holder: Holder, of: int) -> int:
        """How many of `of` places `holder` may hold."""
        kind, name = holder
        config = self.config
        if kind == "all":
            return of
        if kind == "uid":
            return min(config.cap(config.uid_share, of), self.cap(("listener", "unix"), of))
        if len(self.served) < 2:
            return of
        tcp = config.cap(config.tcp_share, of)
        return tcp if name == "tcp" else max(1, of - tcp)

    def admit(
        self, listener: ListenerName, transport: asyncio.BaseTransport, uid: int | None, now: float
    ) -> Connection | str:
        """The new connection's record, or why it is refused."""
        connection = Connection(listener, uid, transport, now)
        for holder in reversed(connection.holders):  # the narrowest share first
            refusal = self._make_room(holder)
            if refusal is not None:
                if self.observer is not None:
                    self.observer.connection_refused(listener, refusal)
                return refusal
        self._open[transport] = connection
        self._held.update(connection.holders)
        return connection

    def _make_room(self, holder: Holder) -> str | None:
        cap = self.cap(holder, self.config.max_connections)
        while self._held[holder] >= cap:
            quiet = [c for c in self._open.values() if c.quiet and holder in c.holders]
            if not quiet:
                return _REASON_OF[holder[0]] or "max_connections"
            self.cut(min(quiet, key=_last_active), "evicted")
        return None

    def cut(self, connection: Connection, reason: str) -> None:
        """Let a connection go: its place is free at once, its transport closes."""
        self._forget(connection)
        if self.observer is not None:
            self.observer.connection_cut(connection.listener, reason)
        connection.transport.close()

    def lost(self, transport: asyncio.BaseTransport) -> None:
        """The connection has closed: its place, and its stream's, are free at once."""
        connection = self._open.get(transport)
        if connection is not None:
            told = connection.on_lost
            self._forget(connection)
            if told is not None:
                told()

    def _forget(self, connection: Connection) -> None:
        if self._open.pop(connection.transport, None) is None:
            return
        self._held.subtract(connection.holders)
        if connection.streaming:
            self.end_stream(connection)

    def claim_stream(self, connection: Connection) -> str | None:
        """Make the connection a stream's, or say which limit is full."""
        for holder in reversed(connection.holders):
            if self._streams[holder] >= self.cap(holder, self.config.max_streams):
                reason = _REASON_OF[holder[0]] or "max_streams"
                if self.observer is not None:
                    self.observer.connection_refused(connection.listener, reason)
                return reason
        connection.streaming = True
        self._streams.update(connection.holders)
        return None

    def end_stream(self, connection: Connection) -> None:
        if connection.streaming:
            connection.streaming = False
            connection.on_lost = None
            self._streams.subtract(connection.holders)

    def streams(self, holder: Holder = _ALL) -> int:
        return self._streams[holder]


def _last_active(connection: Connection) -> float:
    return connection.last_active
