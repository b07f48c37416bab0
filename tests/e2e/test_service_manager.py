"""Under a service manager: sd_notify readiness, watchdog, reload and stop; socket activation."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import pytest

from broker.emulator import Emulator
from broker.emulator import seed as demo
from tests.conftest import config_text
from tests.e2e.test_process import Process, get

pytestmark = pytest.mark.timeout(60)


class NotifyListener:
    """The service manager's end of NOTIFY_SOCKET: a datagram socket collecting messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)

    async def next(self, within: float = 20.0) -> dict[str, str]:
        data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.sock, 4096), within)
        return dict(line.split("=", 1) for line in data.decode().splitlines())

    async def until(self, key: str, within: float = 20.0) -> dict[str, str]:
        async def wait() -> dict[str, str]:
            while True:
                message = await self.next(within)
                if key in message:
                    return message

        return await asyncio.wait_for(wait(), within)

    def close(self) -> None:
        self.sock.close()


async def start(
    short_dir: Path,
    emulator: Emulator,
    env: dict[str, str],
    argv: list[str] | None = None,
    stdin: int | None = None,
) -> Process:
    path = short_dir / "broker.toml"
    path.write_text(config_text(emulator, short_dir, services={"fraud": demo.TOKEN_SERVICE}))
    proc = await asyncio.create_subprocess_exec(
        *(argv or [sys.executable, "-m", "broker", "run", "-c", str(path)]),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        stdin=stdin,
    )
    return Process(proc)


async def test_notify_ready_watchdog_reload_stopping(emulator: Emulator, short_dir: Path) -> None:
    """READY=1 only once the socket accepts, WATCHDOG=1 on time, RELOADING/READY, STOPPING."""
    notify = NotifyListener(short_dir / "notify")
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"}
    process = await start(short_dir, emulator, env)
    try:
        ready = await notify.until("READY")
        assert ready["READY"] == "1" and "STATUS" in ready
        status, _ = await get(short_dir, "/healthz")  # accepting the moment READY=1 was sent
        assert status == 200
        for _ in range(3):
            assert (await notify.until("WATCHDOG", within=2.0))["WATCHDOG"] == "1"
        process.proc.send_signal(signal.SIGHUP)
        reloading = await notify.until("RELOADING")
        assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
        assert (await notify.until("READY"))["READY"] == "1"
        process.proc.send_signal(signal.SIGTERM)
        assert (await notify.until("STOPPING"))["STOPPING"] == "1"
        assert await process.exit_code() == 0
    finally:
        if process.proc.returncode is None:
            process.proc.kill()
        notify.close()


async def test_status_line_reports_service_states(emulator: Emulator, short_dir: Path) -> None:
    """STATUS= tells how many services are fresh, for `systemctl status`."""
    notify = NotifyListener(short_dir / "notify")
    process = await start(short_dir, emulator, {"NOTIFY_SOCKET": str(notify.path)})
    try:
        while "1 fresh" not in (await notify.until("STATUS")).get("STATUS", ""):
            pass
        process.proc.send_signal(signal.SIGTERM)
        assert await process.exit_code() == 0
    finally:
        if process.proc.returncode is None:
            process.proc.kill()
        notify.close()


async def test_socket_activation_serves_the_passed_socket(
    emulator: Emulator, short_dir: Path
) -> None:
    """With LISTEN_FDS the broker serves on the socket it was given and leaves the file be."""
    path = short_dir / "broker.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    config = short_dir / "broker.toml"
    # fd 0 becomes fd 3 and LISTEN_PID the pid that exec keeps, as systemd would arrange.
    script = 'exec 3<&0 0</dev/null; LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" -m broker run -c "$1"'
    process = await start(
        short_dir,
        emulator,
        {},
        argv=["/bin/sh", "-c", script, sys.executable, str(config)],
        stdin=listener.fileno(),
    )
    try:
        await process.event("listeners.started")
        listener.close()  # only the broker's copy remains
        status, body = await get(short_dir, "/v1/token/fraud")
        assert status == 200 and body["service"] == "fraud"
        process.proc.send_signal(signal.SIGTERM)
        assert await process.exit_code() == 0
        assert path.exists()  # the service manager's socket, not ours to remove
    finally:
        if process.proc.returncode is None:
            process.proc.kill()
