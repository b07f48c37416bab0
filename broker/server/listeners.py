"""The Unix socket and the loopback TCP listener, bound by us, served by aiohttp.

We bind the Unix socket ourselves: aiohttp's UnixSite would create it with the
umask's mode and asyncio would silently replace a live broker's socket file. Here
the file gets its mode before `listen()`, a live broker on the path is refused,
a stale file is replaced, and the file is removed on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

import httptools
from aiohttp import web

from broker.config import ListenConfig
from broker.errors import BrokerError
from broker.log import get_logger
from broker.server.connections import Connection, Connections, ListenerName
from broker.server.keys import CONNECTIONS
from broker.server.peers import Peer, peer_of_socket
from broker.server.routes import STREAMS

log = get_logger("broker.listeners")

_BACKLOG = 512
# The [listen] keys a reload applies; the others (addresses, timeouts aiohttp holds, header
# and body bounds) need a restart.
_LIVE = ("max_connections", "max_streams", "stream_max_age_s", "tcp_share", "uid_share")


class AlreadyRunningError(BrokerError):
    """Raised when another broker already answers on the configured socket."""


class ListenError(BrokerError):
    """Raised when a listener cannot be bound (address in use, no permission)."""


def bind_unix(
    path: Path, mode: int, owner: int | None = None, group: int | None = None
) -> socket.socket:
    """A listening Unix socket at `path` with `mode`, owner and group, refusing to replace a
    live one; the file has its final mode and ownership before the socket accepts anything."""
    try:
        return _bind_unix(path, mode, owner, group)
    except OSError as exc:
        raise ListenError(
            f"cannot create the socket {path}: {exc.strerror or exc}; check that the directory "
            "exists and that the broker's user may write to it"
        ) from None


def _bind_unix(path: Path, mode: int, owner: int | None, group: int | None) -> socket.socket:
    if path.exists() or path.is_symlink():
        if not path.is_socket():
            raise ListenError(
                f"{path} exists and is not a socket; remove it or choose another path"
            )
        if _answers(path):
            raise AlreadyRunningError(f"another broker is already listening on {path}")
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777)  # no moment where the file is wider than `mode`
    try:
        sock.bind(str(path))
        if owner is not None or group is not None:
            _chown(path, owner, group)
        path.chmod(mode)
        sock.listen(_BACKLOG)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    sock.setblocking(False)
    return sock


def _chown(path: Path, owner: int | None, group: int | None) -> None:
    try:
        os.chown(path, -1 if owner is None else owner, -1 if group is None else group)
    except PermissionError:
        raise ListenError(
            f"cannot give {path} the configured owner/group: giving files away needs root "
            "(CAP_CHOWN); run the broker as a member of that group instead, or under systemd "
            "set SocketUser=/SocketGroup= in token-broker.socket and remove owner/group from "
            "[listen.unix]"
        ) from None


def _answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(_BACKLOG)
    sock.setblocking(False)
    return sock


def _json_refusal(status: str, code: str, message: str) -> bytes:
    body = json.dumps({"error": code, "message": message}).encode()
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
_TOO_MANY = {
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


class _RequestLines:
    """Follows a connection's requests with llhttp (httptools), as aiohttp's own parser
    reads them, to find a request line to refuse: CONNECT as a method, or no HTTP version.

    Only request lines count: a body's bytes are a body whatever they hold. When llhttp
    finds the bytes malformed it stops following, and the bytes go to aiohttp, whose
    parser (llhttp too, as strict) refuses the same bytes and closes the connection.
    """

    __slots__ = ("_parser", "_refusal", "awaiting_body")

    def __init__(self) -> None:
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self._refusal: bytes | None = None
        # Between a request's headers and the end of its message: its body is still to come.
        self.awaiting_body = False

    def on_headers_complete(self) -> None:
        self.awaiting_body = True

    def on_message_complete(self) -> None:
        self.awaiting_body = False
        assert self._parser is not None
        if self._parser.get_http_version() == "0.9":
            self._refusal = _NO_VERSION

    def refusal(self, data: bytes) -> bytes | None:
        """Read the connection's next bytes: the answer that refuses them, or None."""
        parser = self._parser
        if parser is None:
            return None
        while data:
            try:
                parser.feed_data(data)
            except httptools.HttpParserUpgrade as upgrade:
                # aiohttp declines every upgrade and reads what follows as requests again.
                offset = upgrade.args[0] if upgrade.args else 0
                if parser.get_method() != b"CONNECT" and 0 < offset < len(data):
                    data = data[offset:]
                    continue
            except httptools.HttpParserError:
                self._parser = None
                self.awaiting_body = False  # aiohttp refuses the same bytes and closes
            break
        # The method of the request being read (an earlier one's until a method is read,
        # and never CONNECT then: a CONNECT ends the connection).
        if parser.get_method() == b"CONNECT":
            return _BAD_METHOD
        return self._refusal


class _Guarded(asyncio.Protocol):
    """One connection, admitted or refused before aiohttp sees it; its request lines
    checked before aiohttp parses them; a body that stalls cut.

    Admission (connections.py): a connection beyond its uid's share, its listener's share
    or `max_connections` takes the place of the quietest one there, or is answered 503.

    aiohttp's server fails on a CONNECT request line with no target: the connection's
    task dies without answering or closing, and the connection holds one of the
    `max_connections` places until the client leaves — a way for any local process to
    shut everyone else out. The broker serves no CONNECT, so it is refused up front; and
    a request line with no version would be served as HTTP/0.9, which no client needs.

    aiohttp's keep-alive timer closes a connection that trickles its headers, but once the
    headers are in, a handler waits for the body as long as the client likes. Here a body
    whose bytes stop for `idle_timeout_s` while the broker is reading is cut: the handler
    sees the connection reset, the place is free.
    """

    def __init__(
        self,
        make_inner: Callable[[], asyncio.Protocol],
        connections: Connections,
        listener: ListenerName,
    ) -> None:
        self._make_inner = make_inner
        self._inner: asyncio.Protocol | None = None
        self._connections = connections
        self._listener: ListenerName = listener
        self._lines = _RequestLines()
        self._transport: asyncio.Transport | None = None
        self._connection: Connection | None = None
        self._loop = asyncio.get_running_loop()
        self._stall: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        peer: Peer | None = None
        if self._listener == "unix":
            peer = peer_of_socket(transport.get_extra_info("socket"))
        uid = None if peer is None else peer.uid
        admitted = self._connections.admit(self._listener, transport, uid, self._loop.time())
        if isinstance(admitted, str):
            self._transport.write(_TOO_MANY[admitted])
            self._transport.close()
            return
        admitted.peer = peer  # read once: the kernel's record of the peer never changes
        self._connection = admitted
        self._inner = inner = self._make_inner()
        inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        # No method swapped in at admission: uvloop binds data_received before connection_made.
        connection, inner = self._connection, self._inner
        if connection is None or inner is None or self._transport is None:
            return  # a refused connection's bytes: nothing reads them
        connection.last_active = self._loop.time()
        lines = self._lines
        refusal = lines.refusal(data)
        if refusal is not None:
            self._transport.write(refusal)
            self._transport.close()
            return
        inner.data_received(data)
        connection.awaiting_body = lines.awaiting_body
        if lines.awaiting_body and self._stall is None:
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

    def eof_received(self) -> bool | None:
        return None if self._inner is None else self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        if self._transport is not None:
            self._connections.lost(self._transport)
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


class _CappedSite(web.SockSite):
    """A site whose connections are admitted, checked and cut by `_Guarded`."""

    def __init__(
        self,
        runner: web.AppRunner,
        sock: socket.socket,
        connections: Connections,
        listener: ListenerName,
    ) -> None:
        super().__init__(runner, sock, backlog=_BACKLOG)
        self._connections = connections
        self._listener: ListenerName = listener

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        connections, listener = self._connections, self._listener

        def protocol() -> asyncio.Protocol:
            return _Guarded(server, connections, listener)

        factory: Callable[[], asyncio.Protocol] = protocol
        self._server = await asyncio.get_running_loop().create_server(
            factory, sock=self._sock, backlog=_BACKLOG
        )


class Listeners:
    """Both listeners of one application, started and stopped together."""

    def __init__(
        self,
        app: web.Application,
        config: ListenConfig,
        shutdown_grace_s: float = 5.0,
        inherited: Sequence[socket.socket] = (),
    ) -> None:
        # On stop, requests under way get `shutdown_grace_s` to finish; new ones are refused.
        # keepalive_timeout also closes a connection that trickles an incomplete request.
        self._runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=shutdown_grace_s,
            keepalive_timeout=config.idle_timeout_s,
            max_line_size=config.max_header_bytes,
            max_field_size=config.max_header_bytes,
            # Request bodies are never decoded: the proxy forwards them byte for byte, and
            # the broker's own routes refuse an encoded one (guards.py).
            auto_decompress=False,
        )
        self._config = config
        self._connections = app[CONNECTIONS]
        self._connections.configure(config)
        self._streams = app[STREAMS]
        self._inherited = list(inherited)
        self._owns_unix_path = False
        self.unix_path: Path | None = None
        self.tcp_address: tuple[str, int] | None = None

    async def start(self) -> None:
        await self._runner.setup()
        try:
            await self._start_sites()
        except BaseException:
            await self.stop()
            raise

    async def _start_sites(self) -> None:
        unix, tcp = self._config.unix, self._config.tcp
        passed_unix = _passed(self._inherited, socket.AF_UNIX)
        passed_tcp = _passed(self._inherited, socket.AF_INET) or _passed(
            self._inherited, socket.AF_INET6
        )
        if passed_unix is not None:
            self.unix_path = Path(passed_unix.getsockname())  # the service manager's to remove
            await self._serve(passed_unix, "unix")
        elif unix.enabled:
            sock = bind_unix(unix.path, unix.mode, unix.owner, unix.group)
            self.unix_path, self._owns_unix_path = unix.path, True
            await self._serve(sock, "unix")
        if passed_tcp is not None:
            _require_loopback(passed_tcp)
            self.tcp_address = passed_tcp.getsockname()[:2]
            await self._serve(passed_tcp, "tcp")
        elif tcp.enabled:
            sock = bind_tcp(tcp.host, tcp.port)
            self.tcp_address = sock.getsockname()[:2]
            await self._serve(sock, "tcp")
        log.info(
            "listeners.started",
            unix=str(self.unix_path) if self.unix_path else None,
            tcp=f"{self.tcp_address[0]}:{self.tcp_address[1]}" if self.tcp_address else None,
        )

    async def _serve(self, sock: socket.socket, listener: ListenerName) -> None:
        sock.setblocking(False)
        self._connections.served.add(listener)
        await _CappedSite(self._runner, sock, self._connections, listener).start()

    def reconfigure(self, config: ListenConfig) -> bool:
        """Apply a reloaded `[listen]`: its limits at once (open streams are judged again
        for their age); whether that was all of it, or the rest needs a restart."""
        kept = {name: getattr(self._config, name) for name in _LIVE}
        applied = dataclasses.replace(config, **kept) == self._config
        self._config = dataclasses.replace(self._config, **{n: getattr(config, n) for n in _LIVE})
        self._connections.configure(self._config)  # idle_timeout_s stays aiohttp's, as started
        self._streams.rejudge()
        return applied

    async def stop(self) -> None:
        await self._runner.cleanup()
        if self.unix_path is not None and self._owns_unix_path:
            with contextlib.suppress(FileNotFoundError):
                self.unix_path.unlink()
        self.unix_path = None


def _passed(sockets: Sequence[socket.socket], family: int) -> socket.socket | None:
    return next((s for s in sockets if s.family == family and s.type == socket.SOCK_STREAM), None)


def _require_loopback(sock: socket.socket) -> None:
    host = sock.getsockname()[0]
    if not ipaddress.ip_address(host).is_loopback:
        raise ListenError(
            f"the socket passed by the service manager listens on {host}, not on loopback; "
            "the broker serves live credentials and must never listen beyond loopback: "
            "use ListenStream=127.0.0.1:PORT"
        )
