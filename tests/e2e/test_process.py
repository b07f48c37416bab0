"""The real `token-broker run` process: SIGHUP reloads, SIGTERM drains and exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.emulator import Emulator
from broker.emulator import seed as demo
from tests.conftest import config_text

pytestmark = pytest.mark.timeout(60)


class Process:
    """A running broker process whose JSON log events are collected as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "unparsed", "line": line.decode(errors="replace")}
            async with self._changed:
                self.events.append(event)
                self._changed.notify_all()

    async def event(self, name: str, within: float = 20.0) -> dict[str, Any]:
        """Wait for the first log event called `name` not yet returned."""

        async def wait() -> dict[str, Any]:
            async with self._changed:
                while True:
                    for event in self.events:
                        if event.get("event") == name and not event.get("_seen"):
                            event["_seen"] = True
                            return event
                    await self._changed.wait()

        return await asyncio.wait_for(wait(), within)

    async def exit_code(self, within: float = 20.0) -> int:
        code = await asyncio.wait_for(self.proc.wait(), within)
        await self._reader
        return code


@pytest.fixture
async def run_broker(emulator: Emulator, short_dir: Path) -> AsyncIterator[Process]:
    path = short_dir / "broker.toml"
    text = config_text(
        emulator,
        short_dir,
        services={"fraud": demo.TOKEN_SERVICE},
        refresh="client_refresh_window_s = 0",
    )
    path.write_text(text)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker",
        "run",
        "-c",
        str(path),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    process = Process(proc)
    await process.event("listeners.started")
    yield process
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def get(short_dir: Path, path: str) -> tuple[int, dict[str, Any]]:
    connector = aiohttp.UnixConnector(path=str(short_dir / "broker.sock"))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(f"http://localhost{path}", headers={"Metadata": "true"}) as resp,
    ):
        return resp.status, await resp.json()


async def test_sighup_adds_a_service_and_keeps_the_old_token(
    run_broker: Process, emulator: Emulator, short_dir: Path
) -> None:
    """SIGHUP re-reads the file: a new service is served, the existing token is kept."""
    status, first = await get(short_dir, "/v1/token/fraud")
    assert status == 200
    path = short_dir / "broker.toml"
    services = {"fraud": demo.TOKEN_SERVICE, "churn": demo.KEY_SERVICE}
    text = config_text(
        emulator, short_dir, services=services, refresh="client_refresh_window_s = 0"
    )
    path.write_text(text)
    run_broker.proc.send_signal(signal.SIGHUP)
    reloaded = await run_broker.event("config.reloaded")
    assert reloaded["added"] == ["churn"] and reloaded["kept"] == ["fraud"]
    assert (await get(short_dir, "/v1/token/churn"))[0] == 200
    assert (await get(short_dir, "/v1/token/fraud"))[1]["access_token"] == first["access_token"]


async def test_core_dumps_are_disabled(run_broker: Process) -> None:
    """The daemon runs with a core-file size limit of zero."""
    limits = Path(f"/proc/{run_broker.proc.pid}/limits").read_text()
    line = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert line.split()[4:6] == ["0", "0"]


async def test_sighup_with_a_broken_file_keeps_running(
    run_broker: Process, short_dir: Path
) -> None:
    """A broken file on SIGHUP is rejected with its problem; the broker keeps serving."""
    (short_dir / "broker.toml").write_text("[listen.tcp]\nport = 'x'\n")
    run_broker.proc.send_signal(signal.SIGHUP)
    rejected = await run_broker.event("config.reload_rejected")
    assert any("listen.tcp.port" in p for p in rejected["problems"])
    assert (await get(short_dir, "/v1/token/fraud"))[0] == 200


async def test_sigterm_finishes_a_request_under_way_and_exits_0(
    run_broker: Process, emulator: Emulator, short_dir: Path
) -> None:
    """A request waiting on a slow fetch still gets its token after SIGTERM; exit code 0."""
    await run_broker.event("token.refreshed")
    emulator.state.fail("mms.token", status=None, delay_s=1.0)
    waiting = asyncio.create_task(_refresh_then_get(short_dir))
    await run_broker.event("token.refresh_requested")
    run_broker.proc.send_signal(signal.SIGTERM)
    status, body = await waiting
    assert status == 200 and body["service"] == "fraud"
    assert await run_broker.exit_code() == 0
    assert not (short_dir / "broker.sock").exists()
    names = [e.get("event") for e in run_broker.events]
    assert names.index("broker.stopping") < names.index("broker.stopped")


async def _refresh_then_get(short_dir: Path) -> tuple[int, dict[str, Any]]:
    connector = aiohttp.UnixConnector(path=str(short_dir / "broker.sock"))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post(
            "http://localhost/v1/token/fraud/refresh", headers={"Metadata": "true"}
        ) as resp,
    ):
        return resp.status, await resp.json()
