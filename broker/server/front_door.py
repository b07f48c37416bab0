"""The front door: every connection's protocol, in front of aiohttp's.

A connection is admitted or refused before anything reads it (connections.py). Then
llhttp (httptools) parses its requests, and the front door answers, in order, those it
can answer completely from bytes already rendered (front_answers.py): token, health and
readiness requests. The first request it cannot answer — any other route, method or
target, a request aiohttp might refuse, malformed bytes, a credential not yet servable,
a client that does not read its answers — goes to aiohttp's protocol on the same
connection, with every byte read since the last answer, and aiohttp keeps the connection
from then on. With `[listen] front_door = false` that happens as the connection opens.

Whoever answers, the front door goes on following the requests' lines:

  * a `CONNECT` (pipelined too) is answered 405 and the connection closed before aiohttp
    reads it: aiohttp's connection task dies on a target-less CONNECT without answering
    or closing, and the connection would hold one of the `max_connections` places;
  * a request line with no version is refused 400, not served as HTTP/0.9;
  * a body whose bytes stop for `idle_timeout_s` while the broker reads is cut.

Only request lines count: a body's bytes are a body whatever they hold. Once llhttp finds
the bytes malformed it stops following, and aiohttp's parser (llhttp too, as strict)
refuses the same bytes. llhttp gives no offsets: where the bytes after an answered request
begin is found, when needed, by feeding a fresh parser the same bytes again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, TypeVar, cast

import httptools

from broker.config import ListenConfig
from broker.log import get_logger
from broker.server.connections import Connection, Connections, ListenerName
from broker.server.front_answers import Answers, DoorRequest, Reuse, Route
from broker.server.peers import Peer, peer_of_socket
from broker.server.refusals import error_json

log = get_logger("broker.listeners")
_T = TypeVar("_T")

# Request heads the front door reads, at most, before it leaves a request to aiohttp's
# limits (which refuse it or take it): bounds what a connection buffers here.
_HEAD_BOUND = 32768
_LONGEST_TARGET = 256  # the longest target it answers is under 100 bytes
_REPLAY_STEP = 512
_READS_KEPT = 16
_WRITE_BOUND = 262144  # answers to one read: past this, the rest of the read is aiohttp's
# A read and its answers kept to answer again: a few requests' worth, so that what every
# connection keeps stays small (a pipelined burst is answered, and not kept).
_MEMO_BOUND = 16384


def _json_refusal(status: str, code: str, message: str) -> bytes:
    body = error_json(code, message)
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nConnection: close\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


_FULL = {
    "max_connections": "the broker has too many open connections ([listen] max_connections)",
    "listener_share": "this listener's clients hold their share of the broker's connections "
    "([listen] tcp_share)",
    "uid_share": "this user holds its share of the broker's connections ([listen] uid_share)",
}
TOO_MANY = {
    reason: _json_refusal("503 Service Unavailable", "too_many_connections", message).replace(
        b"Connection: close\r\n", b"Connection: close\r\nRetry-After: 1\r\n"
    )
    for reason, message in _FULL.items()
}
_BAD_METHOD = _json_refusal(
    "405 Method Not Allowed", "method_not_allowed", "CONNECT is not served here"
)
_NO_VERSION = _json_refusal(
    "400 Bad Request",
    "bad_request_line",
    "a request line ends with its HTTP version (GET /path HTTP/1.1); HTTP/0.9 is not served",
)

# Headers that make a request aiohttp's: those its parser allows once (it refuses a
# second), and those that ask for what only aiohttp does (100-continue, chunked bodies).
_SINGLETONS = {
    name: 1 << i
    for i, name in enumerate(
        (
            *(b"host", b"content-length", b"content-location", b"content-range"),
            *(b"content-type", b"etag", b"max-forwards", b"server", b"transfer-encoding"),
            b"user-agent",
        )
    )
}
_HOST_BIT, _LENGTH_BIT = _SINGLETONS[b"host"], _SINGLETONS[b"content-length"]
_AIOHTTPS = frozenset({b"expect", b"transfer-encoding", b"sec-websocket-key1", b"upgrade"})
_VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}
_METHODS = {b"GET": "GET", b"HEAD": "HEAD"}


@dataclass(frozen=True, slots=True)
class DoorLimits:
    """What the front door holds a request to before it answers it itself: inside these,
    aiohttp's parser would take the request too."""

    max_field: int  # aiohttp's max_field_size: a header's name and value together
    max_headers: int
    max_body: int
    idle_timeout_s: float

    @classmethod
    def of(cls, config: ListenConfig) -> DoorLimits:
        # Margins below aiohttp's own limits: near them, aiohttp decides.
        return cls(
            config.max_header_bytes - 64, 128 - 8, config.max_body_bytes, config.idle_timeout_s
        )


def _feed(parser: httptools.HttpRequestParser, data: bytes) -> bool:
    """Feed `data` as aiohttp reads it: it declines every upgrade, so the bytes after one
    are requests again. False when llhttp finds the bytes malformed."""
    while data:
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            offset = upgrade.args[0] if upgrade.args else 0
            if parser.get_method() != b"CONNECT" and 0 < offset < len(data):
                data = data[offset:]
                continue
        except httptools.HttpParserError:
            return False
        break
    return True


class _Ends:
    """Counts the messages a replaying parser completes."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0

    def on_message_complete(self) -> None:
        self.count += 1


def _replayer(prefix: bytes) -> tuple[_Ends, httptools.HttpRequestParser]:
    ends = _Ends()
    parser = httptools.HttpRequestParser(ends)
    _feed(parser, prefix)
    ends.count = 0
    return ends, parser


def end_of(prefix: bytes, data: bytes, completions: int) -> int:
    """Where in `data` (read after `prefix`, the start of a request) the `completions`-th
    request completed in it ends: in blocks, then byte by byte in the block holding it."""
    ends, parser = _replayer(prefix)
    start = 0
    while start < len(data):
        _feed(parser, data[start : start + _REPLAY_STEP])
        if ends.count >= completions:
            break
        start += _REPLAY_STEP
    ends, parser = _replayer(prefix)
    _feed(parser, data[:start])
    for at in range(start, min(start + _REPLAY_STEP, len(data))):
        _feed(parser, data[at : at + 1])
        if ends.count >= completions:
            return at + 1
    return len(data)


class _Memo(NamedTuple):
    """A read answered whole by the front door, ending where a request ends, and the
    answers it was given: the same bytes read again get the same answers while
    `Answers.reusable` says what they were decided from still holds."""

    read: bytes
    replies: bytes
    reuses: tuple[Reuse, ...]
    rules_version: int


class FrontDoor(asyncio.Protocol):
    """One connection: admitted, its requests answered here until one is aiohttp's, then
    handed to aiohttp's protocol with the bytes read since; its request lines followed and
    its stalled bodies cut either way."""

    def __init__(
        self,
        make_inner: Callable[[], asyncio.Protocol],
        connections: Connections,
        listener: ListenerName,
        answers: Answers | None,
        limits: DoorLimits,
    ) -> None:
        self._make_inner = make_inner
        self._inner: asyncio.Protocol | None = None
        self._connections = connections
        self._listener: ListenerName = listener
        self._answers = answers
        self._limits = limits
        self._transport: asyncio.Transport | None = None
        self._connection: Connection | None = None
        self._loop = asyncio.get_running_loop()
        self._stall: asyncio.TimerHandle | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._idle_until = 0.0
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self._refusal: bytes | None = None
        self._following = answers is None  # aiohttp answers the requests parsed from now on
        self._closing = False
        self._write_paused = False
        self.awaiting_body = False  # between a request's headers and the end of its message
        # Answering: the bytes read since the last answered request, and this read's count.
        self._pending: list[bytes] = []  # the reads since, aiohttp's to read the same way
        self._pending_size = 0
        self._in_message = False
        self._answered = 0
        self._hand_off_after: int | None = None
        self._replies: list[bytes] = []  # this read's answers, written once it is judged
        self._replied = 0  # the bytes of this read's answers
        self._reuses: list[Reuse | None] = []  # what each of them was decided from
        self._memo: _Memo | None = None  # the last read answered whole, to answer again
        # The request being read.
        self._target = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._ours = False
        self._seen = 0
        self._length = 0
        self._route: Route | None = None
        self._version = b""
        self._method = ""

    # -- the connection ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        peer: Peer | None = None
        if self._listener == "unix":
            peer = peer_of_socket(transport.get_extra_info("socket"))
        uid = None if peer is None else peer.uid
        admitted = self._connections.admit(self._listener, transport, uid, self._loop.time())
        if isinstance(admitted, str):
            self._transport.write(TOO_MANY[admitted])
            self._transport.close()
            return
        admitted.peer = peer  # read once: the kernel's record of the peer never changes
        self._connection = admitted
        if self._following:
            self._start_inner()
        else:
            admitted.front_door = True
            self._arm_idle()

    def data_received(self, data: bytes) -> None:
        # No method swapped in at admission: uvloop binds data_received before connection_made.
        connection, transport = self._connection, self._transport
        if connection is None or transport is None or self._closing:
            return  # a refused or closing connection's bytes: nothing reads them
        connection.last_active = self._loop.time()
        inner = self._inner
        if inner is None:
            self._answer(data, connection, transport)
            return
        parser = self._parser
        if parser is not None:
            if not _feed(parser, data):
                self._parser = None
                self.awaiting_body = False  # aiohttp refuses the same bytes and closes
            if self._refuse(parser, transport):
                return
        inner.data_received(data)
        self._watch(connection)

    def _answer(self, data: bytes, connection: Connection, transport: asyncio.Transport) -> None:
        """Answer the requests `data` completes, in order; hand the rest to aiohttp from the
        first request that is not the front door's.

        A read is judged whole before anything is written: when it holds a CONNECT or a
        line with no version, only the refusal is sent; when llhttp finds any of it
        malformed, all of it goes to aiohttp, which refuses it whole. Either way the answer
        is the one aiohttp's path gives the same read."""
        memo, answers = self._memo, self._answers
        if (
            memo is not None
            and data == memo.read
            and not self._in_message
            and not self._write_paused
            and answers is not None
            and answers.reusable(memo.reuses, memo.rules_version)
        ):
            # The same bytes, between requests, as the read `memo` answered: llhttp would
            # read the same requests from them, and they get the same answers.
            transport.write(memo.replies)
            self._idle_until = self._loop.time() + self._limits.idle_timeout_s
            return
        self._memo = None
        parser = self._parser
        assert parser is not None and answers is not None
        rules_version = answers.rules_version
        self._answered, self._hand_off_after, self._replies, self._replied = 0, None, [], 0
        self._reuses = []
        parsed = _feed(parser, data)
        if not parsed:
            self._parser = None
            self.awaiting_body = False
        if self._refuse(parser, transport):
            return
        if not parsed:
            self._closing = False
            self._following = True
            self._hand_off(self._after_answers(data, 0))
            return
        if self._replies:
            replies = b"".join(self._replies)
            transport.write(replies)
            self._remember(data, replies, rules_version)
        if self._closing:
            transport.close()
            return
        after = self._hand_off_after
        if after is not None:
            self._hand_off(self._after_answers(data, after))
            return
        self._keep(self._after_answers(data, self._answered) if self._in_message else [])
        if self._in_message and not self.awaiting_body and self._pending_size > _HEAD_BOUND:
            self._following = True
            self._hand_off(self._pending)
            return
        self._watch(connection)

    def _remember(self, data: bytes, replies: bytes, rules_version: int) -> None:
        """Keep `data` and its answers to answer again, when every request in it was
        answered here, it ends where a request ends, and every answer may be reused."""
        if (
            self._closing
            or self._in_message
            or self._hand_off_after is not None
            or self._pending
            or len(data) + len(replies) > _MEMO_BOUND
            or None in self._reuses
        ):
            return
        reuses = cast(list[Reuse], self._reuses)
        if all(reuse.second == reuses[0].second for reuse in reuses):
            self._memo = _Memo(data, replies, tuple(reuses), rules_version)

    def _keep(self, reads: list[bytes]) -> None:
        """Keep the reads of the request in progress; a client that trickles it in tiny
        reads has them joined, so that keeping them costs neither memory nor time."""
        if len(reads) > _READS_KEPT:
            reads = [b"".join(reads)]
        self._pending = reads
        self._pending_size = sum(len(read) for read in reads)

    def _after_answers(self, data: bytes, answered: int) -> list[bytes]:
        """The reads after the `answered`-th request answered in `data`, the last one `data`
        or what is left of it."""
        if answered == 0:
            return [*self._pending, data]
        return [data[end_of(b"".join(self._pending), data, answered) :]]

    def _refuse(self, parser: httptools.HttpRequestParser, transport: asyncio.Transport) -> bool:
        """Answer and close a CONNECT or a request line with no version; whether it did."""
        # The method of the request being read (an earlier one's until a method is read,
        # and never CONNECT then: a CONNECT ends the connection).
        refusal = _BAD_METHOD if parser.get_method() == b"CONNECT" else self._refusal
        if refusal is None:
            return False
        transport.write(refusal)
        transport.close()
        self._closing = True
        return True

    def _hand_off(self, reads: list[bytes]) -> None:
        self._pending, self._pending_size = [], 0
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        inner = self._start_inner()
        for read in reads:
            if read:
                inner.data_received(read)
        if self._connection is not None:
            self._watch(self._connection)

    def _start_inner(self) -> asyncio.Protocol:
        assert self._transport is not None
        inner = self._inner = self._make_inner()
        if self._connection is not None:
            self._connection.front_door = False
        inner.connection_made(self._transport)
        if self._write_paused:
            inner.pause_writing()  # the transport tells only once: aiohttp must know now
        return inner

    # -- llhttp's callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_message = True
        if self._following:
            return
        self._target = b""
        self._headers = []
        self._ours = True
        self._seen = self._length = 0
        self._route = None

    def on_url(self, url: bytes) -> None:
        if self._following or not self._ours:
            return
        self._target += url
        if len(self._target) > _LONGEST_TARGET:
            self._ours = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._following or not self._ours:
            return
        headers, limits = self._headers, self._limits
        if len(headers) >= limits.max_headers or len(name) + len(value) > limits.max_field:
            self._ours = False
            return
        lower = name.lower()
        bit = _SINGLETONS.get(lower, 0)
        if self._seen & bit or lower in _AIOHTTPS:
            self._ours = False
            return
        self._seen |= bit
        value = value.rstrip(b" \t")  # as aiohttp keeps it: llhttp leaves what follows
        if b"\x00" in value:
            self._ours = False
            return
        if bit == _LENGTH_BIT:
            self._length = int(value)  # llhttp let only digits through
            if self._length > limits.max_body:
                self._ours = False
                return
        headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.awaiting_body = True
        if self._following:
            return
        parser, answers = self._parser, self._answers
        assert parser is not None and answers is not None
        version = _VERSIONS.get(parser.get_http_version())
        method = _METHODS.get(parser.get_method())
        if (
            not self._ours
            or version is None
            or method is None
            # A client that does not read its answers: aiohttp's writer waits for it.
            or self._write_paused
            or self._replied > _WRITE_BOUND
            or parser.should_upgrade()
            or (version == b"1.1" and not self._seen & _HOST_BIT)  # aiohttp refuses it
        ):
            self._decline()
            return
        self._route = self._safely(answers.route, self._target)
        if self._route is None:
            self._decline()
            return
        self._version, self._method = version, method

    def on_message_complete(self) -> None:
        self.awaiting_body = self._in_message = False
        parser = self._parser
        assert parser is not None
        if self._following or self._closing:
            if parser.get_http_version() == "0.9":
                self._refusal = _NO_VERSION
            return
        route, answers, transport = self._route, self._answers, self._transport
        assert route is not None and answers is not None and transport is not None
        keep_alive = parser.should_keep_alive()
        request = DoorRequest(
            self._method,
            self._target,
            route.path,
            self._headers,
            self._length > 0,
            self._listener == "unix",
            None if self._connection is None else self._connection.peer,
        )
        answered = self._safely(answers.answer, route, request, self._version, keep_alive)
        if answered is None:
            self._decline()
            return
        answer, reuse = answered
        self._replies.append(answer)
        self._reuses.append(reuse)
        self._replied += len(answer)
        self._answered += 1
        if keep_alive:
            self._idle_until = self._loop.time() + self._limits.idle_timeout_s
        else:
            self._closing = True

    def _safely(self, call: Callable[..., _T | None], *args: object) -> _T | None:
        """`call(*args)`, or None when it fails: a fault in the front door costs the request
        (and its connection) a trip to aiohttp, and a log line, never an answer."""
        try:
            return call(*args)
        except Exception as exc:  # aiohttp answers instead; the fault is logged
            log.exception("front_door.crashed", listener=self._listener, reason=type(exc).__name__)
            return None

    def _decline(self) -> None:
        """Leave this request, and every one after it, to aiohttp."""
        self._following = True
        self._hand_off_after = self._answered

    # -- timers ------------------------------------------------------------------------

    def _arm_idle(self) -> None:
        """Close a connection that completes no request within idle_timeout_s of its start
        or its last answer, as aiohttp's keep-alive timer does."""
        self._idle_until = self._loop.time() + self._limits.idle_timeout_s
        self._idle = self._loop.call_at(self._idle_until, self._idle_check)

    def _idle_check(self) -> None:
        self._idle = None
        connection, transport = self._connection, self._transport
        if self._inner is not None or connection is None or transport is None:
            return
        if self.awaiting_body:  # the body's watch holds it; the next answer arms this again
            self._idle = self._loop.call_at(
                self._loop.time() + self._limits.idle_timeout_s, self._idle_check
            )
            return
        if self._loop.time() < self._idle_until:
            self._idle = self._loop.call_at(self._idle_until, self._idle_check)
            return
        transport.close()

    def _watch(self, connection: Connection) -> None:
        connection.awaiting_body = self.awaiting_body
        if self.awaiting_body and self._stall is None:
            self._watch_body(connection.last_active)

    def _watch_body(self, since: float) -> None:
        deadline = since + self._connections.config.idle_timeout_s
        self._stall = self._loop.call_at(deadline, self._body_check)

    def _body_check(self) -> None:
        self._stall = None
        connection, transport = self._connection, self._transport
        if connection is None or transport is None or not connection.awaiting_body:
            return
        now = self._loop.time()
        if not transport.is_reading():
            # aiohttp paused reading (its buffer is full): the wait is ours, not the client's.
            connection.last_active = now
        if now < connection.last_active + self._connections.config.idle_timeout_s:
            self._watch_body(connection.last_active)
            return
        log.debug("listeners.body_stalled", listener=self._listener)
        self._connections.cut(connection, "stalled_body")

    # -- the rest of asyncio's protocol -------------------------------------------------

    def eof_received(self) -> bool | None:
        return None if self._inner is None else self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._stall, self._idle):
            if timer is not None:
                timer.cancel()
        self._stall = self._idle = None
        if self._transport is not None:
            self._connections.lost(self._transport)
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._inner is not None:
            self._inner.resume_writing()
