"""The Unix socket is created safely, never steals a live broker's path, and is removed on exit."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import pytest

from broker.config import load_config
from broker.daemon import Daemon
from broker.emulator import Emulator
from broker.server import AlreadyRunningError, ListenError
from broker.server.listeners import bind_unix
from tests.conftest import config_text
from tests.e2e.conftest import StartBroker

pytestmark = pytest.mark.timeout(30)


async def test_socket_mode_and_removal(start_broker: StartBroker, short_dir: Path) -> None:
    """The socket file has mode 0660 while running and is gone after stop."""
    broker = await start_broker()
    path = broker.daemon.unix_path
    assert path is not None
    assert stat.S_IMODE(path.stat().st_mode) == 0o660
    await broker.daemon.stop()
    assert not path.exists()


async def test_second_broker_on_same_socket_is_refused(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path
) -> None:
    """A second broker refuses to start while another answers on the socket, and leaves it be."""
    broker = await start_broker()
    second = Daemon(load_config(short_dir / "broker.toml"))
    with pytest.raises(AlreadyRunningError, match="already listening"):
        await second.start()
    assert broker.daemon.unix_path is not None and broker.daemon.unix_path.exists()
    assert (await broker.client().get("/healthz")).status == 200


async def test_stale_socket_file_is_replaced(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path
) -> None:
    """A socket file left by a crashed broker (nobody listening) is replaced."""
    stale = short_dir / "broker.sock"
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(stale))
    leftover.close()
    broker = await start_broker()
    assert (await broker.client().get("/healthz")).status == 200


async def test_stricter_mode_and_tcp_off(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path
) -> None:
    """A configured mode of 0600 is applied, and a disabled TCP listener is not opened."""
    text = config_text(emulator, short_dir)
    text = text.replace("[listen.tcp]\n", "[listen.tcp]\nenabled = false\n").replace(
        "[listen.unix]\n", '[listen.unix]\nmode = "0600"\n'
    )
    broker = await start_broker(text)
    assert broker.daemon.tcp_address is None
    assert broker.daemon.unix_path is not None
    assert stat.S_IMODE(broker.daemon.unix_path.stat().st_mode) == 0o600
    assert (await broker.client().get("/healthz")).status == 200


async def test_non_socket_file_in_the_way_is_not_deleted(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path
) -> None:
    """A regular file at the socket path is an error, never silently deleted."""
    (short_dir / "broker.sock").write_text("precious")
    with pytest.raises(ListenError, match="not a socket"):
        await start_broker()
    assert (short_dir / "broker.sock").read_text() == "precious"


def test_unusable_socket_path_is_a_clear_error(short_dir: Path) -> None:
    """A socket path the broker cannot create is a ListenError naming the path, not a crash."""
    too_long = short_dir / ("x" * 120) / "broker.sock"
    with pytest.raises(ListenError, match="cannot create the socket"):
        bind_unix(too_long, 0o660)
    with pytest.raises(ListenError, match="cannot create the socket"):
        bind_unix(Path("/proc/no-such-dir/broker.sock"), 0o660)
