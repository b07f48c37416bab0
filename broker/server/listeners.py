"""The Unix socket and the loopback TCP listener, bound by us, served by the front door
(front_door.py) and, behind it, by aiohttp.

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
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path

from aiohttp import web

from broker.config import ListenConfig
from broker.errors import BrokerError
from broker.log import get_logger
from broker.server.connections import Connections, ListenerName
from broker.server.front_answers import Answers
from broker.server.front_door import DoorLimits, FrontDoor
from broker.server.keys import CONNECTIONS
from broker.server.routes import STREAMS

log = get_logger("broker.listeners")

_BACKLOG = 512
# The [listen] keys a reload applies; the others (addresses, timeouts aiohttp holds, header
# and body bounds) need a restart.
_LIVE = (
    "max_connections",
    "max_streams",
    "stream_max_age_s",
    "watch_heartbeat_s",
    "tcp_share",
    "uid_share",
    "front_door",  # for connections opened from then on
)


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


class _CappedSite(web.SockSite):
    """A site whose connections are admitted, answered or handed to aiohttp, and cut by
    the front door."""

    def __init__(
        self,
        runner: web.AppRunner,
        sock: socket.socket,
        connections: Connections,
        listener: ListenerName,
        answers: Callable[[], Answers | None],
        limits: DoorLimits,
    ) -> None:
        super().__init__(runner, sock, backlog=_BACKLOG)
        self._connections = connections
        self._listener: ListenerName = listener
        self._answers = answers
        self._limits = limits

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        connections, listener, answers, limits = (
            self._connections,
            self._listener,
            self._answers,
            self._limits,
        )

        def protocol() -> asyncio.Protocol:
            return FrontDoor(server, connections, listener, answers(), limits)

        factory: Callable[[], asyncio.Protocol] = protocol
        self._server = await asyncio.get_running_loop().create_server(
            factory, sock=self._sock, backlog=_BACKLOG
        )

    async def stop(self) -> None:
        """Stop accepting, and close the connections the front door holds: it answers as
        bytes come, so none is in the middle of an answer (aiohttp's get its grace)."""
        await super().stop()
        for connection in self._connections:
            if connection.listener == self._listener and connection.front_door:
                connection.transport.close()


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
        self._door = Answers(app)
        self._limits = DoorLimits.of(config)  # aiohttp's limits, as it is started with
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
        site = _CappedSite(
            self._runner, sock, self._connections, listener, self._door_answers, self._limits
        )
        await site.start()

    @property
    def connections(self) -> Connections:
        """Every open connection of both listeners."""
        return self._connections

    def _door_answers(self) -> Answers | None:
        """What a new connection's front door answers, or None when it is turned off."""
        return self._door if self._config.front_door else None

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
