"""Azure answering a credential that cannot be used: the real `token-broker run` process
keeps serving the previous one, stays within the retry policy, and logs once per streak.

For each token route (v1 web service, v2 endpoint, Entra) and each way a well-formed token
can be dead on arrival (already expired, expiring within the skew allowance, not yet
valid), the emulator answers only such tokens for a while. Clients keep getting the
previous token with 200; the upstream calls made meanwhile are printed and stay within
`Policy.max_attempts`; `token.refresh_failed` is written once for the streak; good answers
bring a new token.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.cache import Policy
from broker.config import RefreshConfig
from broker.emulator import Emulator
from broker.emulator import seed as demo
from broker.emulator.faults import VALIDITY_KINDS
from tests.conftest import config_text
from tests.e2e.test_process import Process

pytestmark = pytest.mark.timeout(60)

LIFETIME_S = 60.0  # the test emulator's, for web services and endpoints alike
STREAK_S = 2.5
REFRESH = RefreshConfig(clock_skew_s=4.0, retry_min_s=0.25, retry_max_s=1.0)
ROUTES = {  # token route -> the service the test watches, and the extra config it needs
    "mms.token": ("fraud", ""),
    "arm.endpoint_token": (
        "endpoint",
        '\n[[service]]\nname = "endpoint"\nkind = "azureml-online-endpoint"\n'
        f'subscription_id = "{demo.SUBSCRIPTION_ID}"\nresource_group = "{demo.RESOURCE_GROUP}"\n'
        f'workspace = "{demo.WORKSPACE}"\nendpoint = "{demo.ENDPOINT_TOKEN}"\n',
    ),
    "entra.token": (
        "storage",
        '\n[[service]]\nname = "storage"\nkind = "entra"\n'
        'scope = "https://storage.azure.com/.default"\n',
    ),
}


@pytest.fixture
async def broker_process(emulator: Emulator, short_dir: Path) -> AsyncIterator[Process]:
    emulator.state.entra_token_lifetime_s = LIFETIME_S
    refresh = (
        f"clock_skew_s = {REFRESH.clock_skew_s}\nretry_min_s = {REFRESH.retry_min_s}\n"
        f"retry_max_s = {REFRESH.retry_max_s}\nclient_refresh_window_s = 0"
    )
    text = config_text(emulator, short_dir, services={"fraud": demo.TOKEN_SERVICE}, refresh=refresh)
    text += "".join(extra for _, extra in ROUTES.values())
    path = short_dir / "broker.toml"
    path.write_text(text)
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "broker", "run", "-c", str(path)),
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


async def call(short_dir: Path, method: str, path: str) -> tuple[int, dict[str, Any]]:
    connector = aiohttp.UnixConnector(path=str(short_dir / "broker.sock"))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.request(method, f"http://localhost{path}", headers={"Metadata": "true"}) as resp,
    ):
        return resp.status, json.loads(await resp.read() or b"{}")


async def first_token(short_dir: Path, service: str) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while True:
        status, body = await call(short_dir, "GET", f"/v1/token/{service}")
        if status == 200:
            return body
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.05)


def told(process: Process) -> list[dict[str, Any]]:
    """What the broker logged, for a failure's message (its log holds no credential)."""
    return [{k: v for k, v in e.items() if k != "timestamp"} for e in process.events]


@pytest.mark.parametrize("kind", VALIDITY_KINDS)
@pytest.mark.parametrize("route", ROUTES)
async def test_an_unusable_answer_never_replaces_the_served_token(
    broker_process: Process,
    emulator: Emulator,
    short_dir: Path,
    route: str,
    kind: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Clients keep the previous token with 200 while Azure answers dead ones; calls stay
    within the retry policy's bound, one log line tells of the streak, and good answers
    bring a new token."""
    service = ROUTES[route][0]
    before = await first_token(short_dir, service)
    state = emulator.state
    state.fail(route, kind=kind, expires_in_s=1.0)
    calls_before = state.count(route)
    started = time.monotonic()
    status, _ = await call(short_dir, "POST", f"/v1/token/{service}/refresh")
    served: set[str] = set()
    while time.monotonic() - started < STREAK_S:
        status, body = await call(short_dir, "GET", f"/v1/token/{service}")
        assert status == 200, (body, told(broker_process))
        served.add(body["access_token"])
        await asyncio.sleep(0.02)
    streak_s = time.monotonic() - started
    calls = state.count(route) - calls_before
    state.clear_faults()
    assert served == {before["access_token"]}, told(broker_process)

    failed = await broker_process.event("token.refresh_failed")
    assert failed["service"] == service and failed["reason"] == "UnusableCredentialError"
    assert "cannot be used" in failed["error"] and before["access_token"] not in failed["error"]
    policy = Policy(REFRESH)
    callers = 2 if route == "entra.token" else 1  # the v1 service signs in through Entra too
    bound = policy.max_attempts(streak_s, policy.shortest_lead(LIFETIME_S / 2)) * callers
    with capsys.disabled():
        print(f"\n{route} {kind}: {calls} upstream calls in {streak_s:.1f} s (bound {bound})")
    assert 1 <= calls <= bound

    deadline = time.monotonic() + 10
    while (body := await first_token(short_dir, service))["access_token"] == before["access_token"]:
        assert time.monotonic() < deadline, "no new token after good answers returned"
        await asyncio.sleep(0.05)
    streak = [
        e
        for e in broker_process.events
        if e.get("event") == "token.refresh_failed" and e.get("service") == service
    ]
    assert len(streak) == 1, streak
