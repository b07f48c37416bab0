"""`token-broker run` serves the same on uvloop (when installed) and on asyncio's own loop
(TOKEN_BROKER_UVLOOP=0): tokens on both listeners, the guards, peer credentials, a clean exit."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.emulator import Emulator
from broker.emulator import seed as demo
from tests.conftest import config_text

pytestmark = pytest.mark.timeout(60)

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None
_TOKEN_AND_CLOSE = (
    b"GET /v1/token/fraud HTTP/1.1\r\nHost: localhost\r\nMetadata: true\r\n"
    b"Connection: close\r\n\r\n"
)


@pytest.mark.parametrize("uvloop_setting", ["1", "0"])
async def test_the_daemon_serves_on_either_event_loop(
    emulator: Emulator, short_dir: Path, uvloop_setting: str
) -> None:
    """Tokens on the socket and on TCP (answered by the front door once the credential is
    in), a foreign Host refused, the peer's uid seen and a clean SIGTERM exit, on uvloop
    when it is installed and allowed, else on asyncio's loop."""
    path = short_dir / "broker.toml"
    path.write_text(config_text(emulator, short_dir, services={"fraud": demo.TOKEN_SERVICE}))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "broker", "run", "-c", str(path)),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "TOKEN_BROKER_UVLOOP": uvloop_setting},
    )
    try:
        started = await _event(proc, "listeners.started")
        on_uvloop = "uvloop" in Path(f"/proc/{proc.pid}/maps").read_text()
        assert on_uvloop == (HAVE_UVLOOP and uvloop_setting == "1")
        meta = {"Metadata": "true"}
        unix = aiohttp.UnixConnector(path=str(short_dir / "broker.sock"))
        async with aiohttp.ClientSession(connector=unix) as session:
            async with session.get("http://localhost/v1/token/fraud", headers=meta) as resp:
                assert resp.status == 200
                assert (await resp.json())["service"] == "fraud"
            rotate = "http://localhost/v1/services/fraud/keys/rotate"
            async with session.post(rotate, headers=meta) as resp:
                # The peer is this test's own user, so the socket lets it past the uid check.
                assert (await resp.json()).get("error") != "access_denied"
        base = f"http://{started['tcp']}"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/v1/token/fraud", headers=meta) as resp:
                assert resp.status == 200
            foreign = {**meta, "Host": "attacker.example"}
            async with session.get(f"{base}/v1/token/fraud", headers=foreign) as resp:
                assert resp.status == 403
                assert (await resp.json())["error"] == "host_not_allowed"
        host, port = started["tcp"].rsplit(":", 1)
        for opened in (
            asyncio.open_unix_connection(str(short_dir / "broker.sock")),
            asyncio.open_connection(host, int(port)),
        ):
            reader, writer = await opened
            writer.write(_TOKEN_AND_CLOSE)
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            # aiohttp names itself in a Server header; the front door does not.
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nServer: " not in answer
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _event(proc: asyncio.subprocess.Process, name: str) -> dict[str, Any]:
    assert proc.stderr is not None

    async def read() -> dict[str, Any]:
        assert proc.stderr is not None
        async for line in proc.stderr:
            event = json.loads(line) if line.startswith(b"{") else {}
            if event.get("event") == name:
                return event
        raise AssertionError(f"the broker exited before logging {name}")

    return await asyncio.wait_for(read(), 20)
