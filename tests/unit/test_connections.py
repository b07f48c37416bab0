"""The connection table: shares per uid and per listener, streams capped apart, the quietest
connection giving way, and a 503 only when every place is busy."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from broker import metrics
from broker.config import ListenConfig
from broker.server import connections, streams
from broker.server.connections import Connection, Connections

pytestmark = pytest.mark.timeout(10)


@dataclass(eq=False)
class FakeTransport(asyncio.BaseTransport):
    closed: bool = False

    def close(self) -> None:
        self.closed = True


@dataclass
class Seen:
    refused: list[tuple[str, str]] = field(default_factory=list)
    cut: list[tuple[str, str]] = field(default_factory=list)

    def connection_refused(self, listener: str, reason: str) -> None:
        self.refused.append((listener, reason))

    def connection_cut(self, listener: str, reason: str) -> None:
        self.cut.append((listener, reason))


def table(**limits: float) -> tuple[Connections, Seen]:
    seen = Seen()
    config = ListenConfig(**limits)  # type: ignore[arg-type]
    held = Connections(config, seen)
    held.served.update(("unix", "tcp"))
    return held, seen


def admitted(held: Connections, listener: str, uid: int | None, at: float = 0.0) -> Connection:
    found = held.admit(listener, FakeTransport(), uid, at)  # type: ignore[arg-type]
    assert isinstance(found, Connection), found
    return found


def test_shares_split_each_limit_between_listeners_and_uids() -> None:
    """TCP holds tcp_share of each limit, the socket the rest, one uid its uid_share."""
    held, _ = table(max_connections=40, max_streams=20, tcp_share=0.25, uid_share=0.1)
    assert held.cap(("listener", "tcp"), 40) == 10
    assert held.cap(("listener", "unix"), 40) == 30
    assert held.cap(("uid", 1000), 20) == 2
    held.served.discard("tcp")
    assert held.cap(("listener", "unix"), 40) == 40  # one listener open: all of it


def test_a_full_share_gives_the_quietest_place_to_the_newcomer() -> None:
    """The uid's connection that was quiet longest is cut for the new one; others stay."""
    held, seen = table(max_connections=40, uid_share=0.1)  # 4 per uid
    mine = [admitted(held, "unix", 1000, at) for at in (3.0, 1.0, 2.0, 4.0)]
    other = admitted(held, "unix", 2000, 0.0)
    admitted(held, "unix", 1000, 5.0)
    assert [c.transport.closed for c in mine] == [False, True, False, False]  # type: ignore[attr-defined]
    assert not other.transport.closed  # type: ignore[attr-defined]
    assert seen.cut == [("unix", "evicted")] and seen.refused == []


def test_busy_places_are_not_taken_and_the_newcomer_is_refused() -> None:
    """When every connection of the share is being answered or streaming, a 503 names it."""
    held, seen = table(max_connections=8, max_streams=4, tcp_share=0.5)  # TCP: 4 and 2
    busy = [admitted(held, "tcp", None) for _ in range(4)]
    for connection in busy[:2]:
        assert held.claim_stream(connection) is None
    assert held.claim_stream(busy[2]) == "listener_share"
    for connection in busy[2:]:
        connection.busy = 1
    assert held.admit("tcp", FakeTransport(), None, 9.0) == "listener_share"
    assert seen.refused == [("tcp", "listener_share"), ("tcp", "listener_share")]
    assert isinstance(held.admit("unix", FakeTransport(), 0, 9.0), Connection)


def test_a_body_awaited_is_quiet_and_a_stream_never_is() -> None:
    """A connection whose handler waits for the client's body may be cut; a stream may not."""
    held, _ = table()
    connection = admitted(held, "tcp", None)
    connection.busy = 1
    assert not connection.quiet
    connection.awaiting_body = True
    assert connection.quiet
    connection.streaming = True
    assert not connection.quiet


def test_a_lost_connection_frees_its_places_and_tells_its_stream() -> None:
    """Closing frees the connection's and its stream's places at once."""
    held, _ = table(max_connections=8, max_streams=4)
    connection = admitted(held, "unix", 1000)
    assert held.claim_stream(connection) is None
    told: list[bool] = []
    connection.on_lost = lambda: told.append(True)
    held.lost(connection.transport)
    assert (len(held), held.streams(), told) == (0, 0, [True])


def test_metrics_know_every_reason_the_server_gives() -> None:
    """The metrics' label values are the server's own names (metrics sits below it)."""
    assert metrics.CONNECTION_REFUSALS == connections.REFUSALS
    assert metrics.CONNECTION_CUTS == connections.CUTS
    assert metrics.STREAM_ENDINGS == streams.END_REASONS
    assert metrics.LISTENERS == connections.LISTENER_NAMES
