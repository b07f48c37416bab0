"""Raw bytes to a running broker and back, for the tests of the front door: connections on
either listener, reads to the broker's close, answers compared with Date and Server set
aside, and a wait until the broker has read what was sent (so that splits stay splits)."""

from __future__ import annotations

import asyncio
import re

from broker.daemon import Daemon
from broker.server.connections import Connection

READ_TIMEOUT_S = 5.0
# A last request that ends every exchange: the broker answers it and closes.
CLOSE = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"

_DATE = re.compile(rb"\r\nDate: [^\r\n]*")
_SERVER = re.compile(rb"\r\nServer: [^\r\n]*")
_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


async def connect(
    daemon: Daemon, listener: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if listener == "unix":
        return await asyncio.open_unix_connection(str(daemon.unix_path))
    assert daemon.tcp_address is not None
    return await asyncio.open_connection(*daemon.tcp_address)


async def read_to_close(reader: asyncio.StreamReader) -> bytes:
    """Everything the broker sends until it closes the connection (a hang fails)."""
    chunks = []
    while chunk := await asyncio.wait_for(reader.read(65536), READ_TIMEOUT_S):
        chunks.append(chunk)
    return b"".join(chunks)


class _Collector(asyncio.Protocol):
    """A client keeping every byte the broker sends, those before a reset too (a stream
    reader raises the reset and drops what it holds)."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.received += data

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def exchange(daemon: Daemon, listener: str, parts: list[bytes]) -> bytes:
    """Send `parts`, each read by the broker before the next is sent, until the broker
    closes the connection; what came back by then."""
    loop = asyncio.get_running_loop()
    before = set(daemon.listeners.connections)
    if listener == "unix":
        transport, client = await loop.create_unix_connection(_Collector, str(daemon.unix_path))
    else:
        assert daemon.tcp_address is not None
        transport, client = await loop.create_connection(_Collector, *daemon.tcp_address)
    try:
        connection = await admitted(daemon, before)
        for part in parts:
            if client.closed.done() or connection.transport.is_closing():
                break  # more bytes now would only reset the connection
            seen = connection.last_active
            transport.write(part)
            await _read_by_broker(daemon, connection, seen)
        await asyncio.wait_for(client.closed, READ_TIMEOUT_S)
        return bytes(client.received)
    finally:
        transport.close()


async def admitted(daemon: Daemon, before: set[Connection]) -> Connection:
    """The connection the broker admitted since `before` was taken of its table."""

    async def new() -> Connection:
        while True:
            new = set(daemon.listeners.connections) - before
            if new:
                return new.pop()
            await asyncio.sleep(0)

    return await asyncio.wait_for(new(), READ_TIMEOUT_S)


async def _read_by_broker(daemon: Daemon, connection: Connection, seen: float) -> None:
    """Return once the broker has read bytes after `seen`, or has let the connection go."""

    async def read() -> None:
        # The broker runs on this loop: each yield lets it read, and no event says it has.
        while connection.last_active == seen and _open(daemon, connection):  # noqa: ASYNC110
            await asyncio.sleep(0)

    await asyncio.wait_for(read(), READ_TIMEOUT_S)


def _open(daemon: Daemon, connection: Connection) -> bool:
    return daemon.listeners.connections.of(connection.transport) is connection


def normalized(answers: bytes) -> bytes:
    """Answers with every Date's value blanked and every Server line dropped: what must be
    the same whoever answered."""
    return _SERVER.sub(b"", _DATE.sub(b"\r\nDate: *", answers))


def statuses(answers: bytes) -> list[int]:
    return [int(status) for status in _STATUS.findall(answers)]


def without_server(answers: bytes) -> int:
    """How many answers carry no Server header: aiohttp names itself in every one, the
    front door in none."""
    return len(_STATUS.findall(answers)) - answers.count(b"\r\nServer: ")
