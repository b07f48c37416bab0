"""With the persisted cache on, a restart during an outage keeps serving valid tokens."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import stat
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.config import load_config
from broker.daemon import Daemon
from broker.emulator import Emulator
from broker.emulator import seed as demo
from tests.conftest import config_text
from tests.e2e.test_process import Process, get

pytestmark = pytest.mark.timeout(30)

SERVICES = {"fraud": demo.TOKEN_SERVICE, "churn": demo.KEY_SERVICE}


def cached_config(emulator: Emulator, short_dir: Path) -> Path:
    key = short_dir / "cache.key"
    key.write_bytes(bytes(range(48)))
    key.chmod(0o600)
    text = config_text(emulator, short_dir, services=SERVICES)
    text += f'\n[cache]\nenabled = true\npath = "{short_dir / "cache.bin"}"\nkey_file = "{key}"\n'
    path = short_dir / "broker.toml"
    path.write_text(text)
    return path


async def run_once(path: Path) -> dict[str, dict[str, Any]]:
    """Start a broker, read both services' states and tokens, stop it."""
    async with Daemon(load_config(path)) as daemon:
        store = daemon.store
        seen = {}
        for service in SERVICES:
            entry = await store.credential(service)
            assert entry.token is not None
            seen[service] = {"value": entry.token.value, "state": store.state(entry).value}
        return seen


async def test_restart_during_outage_serves_restored_tokens(
    emulator: Emulator, short_dir: Path
) -> None:
    """Tokens saved before a restart are served after it while Azure refuses every call."""
    path = cached_config(emulator, short_dir)
    first = await run_once(path)
    cache = short_dir / "cache.bin"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    assert first["fraud"]["value"].encode() not in cache.read_bytes()

    emulator.state.fail("entra.token", status=503)
    emulator.state.fail("mms.token", status=503)
    emulator.state.fail("mms.listkeys", status=503)
    calls = emulator.state.count("mms.token")
    second = await run_once(path)
    assert second["fraud"]["value"] == first["fraud"]["value"]
    assert second["churn"]["value"] == first["churn"]["value"]
    assert emulator.state.count("mms.token") == calls  # restored tokens are not fetched at start


async def test_corrupt_cache_is_ignored_with_a_warning(
    emulator: Emulator, short_dir: Path, logs: io.StringIO
) -> None:
    """A damaged cache file is never trusted: the broker starts empty and fetches."""
    path = cached_config(emulator, short_dir)
    await run_once(path)
    cache = short_dir / "cache.bin"
    data = bytearray(cache.read_bytes())
    data[-1] ^= 0xFF
    cache.write_bytes(bytes(data))
    calls = emulator.state.count("mms.token")
    await run_once(path)
    assert "cache.ignored" in logs.getvalue()
    assert emulator.state.count("mms.token") == calls + 1


ENDPOINT = (
    f'\n[[service]]\nname = "v2-token"\nkind = "azureml-online-endpoint"\n'
    f'subscription_id = "{demo.SUBSCRIPTION_ID}"\nresource_group = "{demo.RESOURCE_GROUP}"\n'
    f'workspace = "{demo.WORKSPACE}"\nendpoint = "{demo.ENDPOINT_TOKEN}"\n'
)
UPSTREAM = (
    "entra.token",
    "arm.workspace",
    "arm.endpoint",
    "arm.endpoint_token",
    "arm.endpoint_keys",
    "discovery",
    "mms.describe",
    "mms.token",
    "mms.listkeys",
)

StartProcess = Callable[[Path], Awaitable[Process]]


@pytest.fixture
async def start_process() -> AsyncIterator[StartProcess]:
    """Starts `token-broker run -c PATH` processes, ready once their listeners are; kills
    whichever still run at the end."""
    started: list[Process] = []

    async def start(path: Path) -> Process:
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
        started.append(process := Process(proc))
        await process.event("listeners.started")
        return process

    yield start
    for process in started:
        if process.proc.returncode is None:
            process.proc.kill()
            await process.proc.wait()


async def run_until_saved(start_process: StartProcess, path: Path, services: int) -> None:
    """Run a broker process until every service has its credential, then stop it (SIGTERM)."""
    process = await start_process(path)
    for _ in range(services):
        await process.event("token.refreshed")
    process.proc.send_signal(signal.SIGTERM)
    assert await process.exit_code() == 0


def azure_down(emulator: Emulator) -> None:
    """Every call that signs in, describes or fetches a credential answers 503."""
    for route in UPSTREAM:
        emulator.state.fail(route, status=503)


async def proxy_post(short_dir: Path, service: str) -> tuple[int, str]:
    connector = aiohttp.UnixConnector(path=str(short_dir / "broker.sock"))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post(
            f"http://localhost/v1/proxy/{service}", data=b"{}", headers={"Metadata": "true"}
        ) as resp,
    ):
        return resp.status, await resp.text()


@pytest.mark.timeout(60)
async def test_a_restarted_process_proxies_at_once_with_the_saved_scoring_uri(
    emulator: Emulator, short_dir: Path, start_process: StartProcess
) -> None:
    """After a restart, proxy mode forwards with the restored credential and scoring URI,
    without describing the service again (v1 token, v1 key and v2 endpoint alike)."""
    path = cached_config(emulator, short_dir)
    path.write_text(path.read_text() + ENDPOINT)
    await run_until_saved(start_process, path, services=3)

    azure_down(emulator)
    described = emulator.state.count("mms.describe") + emulator.state.count("arm.endpoint")
    process = await start_process(path)
    assert (await process.event("cache.restored"))["restored"] == 3
    for service in ("fraud", "churn", "v2-token"):
        status, body = await proxy_post(short_dir, service)
        assert status == 200, (service, body)
    assert emulator.state.count("mms.describe") + emulator.state.count("arm.endpoint") == described


@pytest.mark.timeout(60)
async def test_a_process_does_not_follow_a_link_at_the_cache_path(
    emulator: Emulator, short_dir: Path, start_process: StartProcess
) -> None:
    """A symbolic link at the cache path, even to a valid cache file, restores nothing."""
    path = cached_config(emulator, short_dir)
    await run_until_saved(start_process, path, services=2)
    cache, elsewhere = short_dir / "cache.bin", short_dir / "elsewhere.bin"
    cache.rename(elsewhere)
    cache.symlink_to(elsewhere)
    saved = elsewhere.read_bytes()

    azure_down(emulator)
    process = await start_process(path)
    ignored = await process.event("cache.ignored")
    assert ignored["reason"] == (
        "a symbolic link; the broker reads only the regular file it writes there"
    )
    assert not any(event.get("event") == "cache.restored" for event in process.events)
    status, body = await get(short_dir, "/v1/token/fraud")
    assert status == 503 and "access_token" not in body
    assert elsewhere.read_bytes() == saved
