"""Each kind of injected fault as a client sees it on a real socket: resets, hangs, slow,
malformed, truncated and incomplete answers, HTTP-date Retry-After, region scopes."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import pytest

from broker.emulator import Emulator, EmulatorState, Fault, http_date
from tests.emulator.conftest import (
    ACI,
    AKS,
    CLIENT,
    MMS_PATH,
    REGION,
    SCORE_PATH,
    SECRET,
    TENANT,
    WS_PATH,
    FakeClock,
    arrival,
    bearer,
)

pytestmark = pytest.mark.timeout(15)

CLIENT_PATIENCE_S = 0.2  # how long a client waits on a hung request before giving up
TOKEN_PATH = f"{MMS_PATH}/services/{AKS}/token"


async def _post_token(http: aiohttp.ClientSession, arm_token: str, **kwargs: Any) -> int:
    async with http.post(TOKEN_PATH, headers=bearer(arm_token), **kwargs) as resp:
        await resp.read()
        return resp.status


def _noisy(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def test_reset_aborts_the_connection_quietly(
    http: aiohttp.ClientSession,
    arm_token: str,
    state: EmulatorState,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A reset fault gives the client ECONNRESET, logs nothing and the server serves on."""
    state.fail("mms.token", kind="reset", times=1)
    with pytest.raises(aiohttp.ClientOSError) as caught:
        await _post_token(http, arm_token)
    assert caught.value.errno == errno.ECONNRESET
    assert await _post_token(http, arm_token) == 200
    assert state.count("mms.token") == 2
    assert _noisy(caplog) == []


async def test_reset_get_is_retried_once_by_aiohttp(
    http: aiohttp.ClientSession, state: EmulatorState
) -> None:
    """aiohttp retries an idempotent request once after a reset, so times=1 goes unseen."""
    state.fail("discovery", kind="reset", times=1)
    async with http.get(f"/regions/{REGION}/discovery") as resp:
        assert resp.status == 200
    state.fail("discovery", kind="reset", times=2)
    with pytest.raises(aiohttp.ClientOSError):
        await http.get(f"/regions/{REGION}/discovery")
    assert state.count("discovery") == 4


async def test_hang_never_answers_until_the_client_gives_up(
    http: aiohttp.ClientSession,
    arm_token: str,
    state: EmulatorState,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A hung request times out on the client, whose leaving ends the server's handler."""
    given_up = asyncio.Event()
    state.listen(lambda what, route: given_up.set() if what == "abandoned" else None)
    state.fail("mms.token", kind="hang", times=1)
    with pytest.raises(TimeoutError):
        await _post_token(http, arm_token, timeout=aiohttp.ClientTimeout(total=CLIENT_PATIENCE_S))
    await given_up.wait()
    assert await _post_token(http, arm_token) == 200
    assert _noisy(caplog) == []


@pytest.mark.parametrize("fault", [{"kind": "hang"}, {"kind": "slow", "delay_s": 60.0}])
async def test_stop_is_prompt_with_a_waiting_request(
    http: aiohttp.ClientSession,
    emu: Emulator,
    state: EmulatorState,
    monkeypatch: pytest.MonkeyPatch,
    fault: dict[str, Any],
) -> None:
    """stop() does not wait for a hung or slowed request: it ends well within a second."""
    arrived = arrival(state, "score")
    state.fail("score", **fault)
    request = asyncio.create_task(http.post(SCORE_PATH))
    await arrived.wait()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await emu.stop()
    assert loop.time() - started < 0.5
    outcome = (await asyncio.gather(request, return_exceptions=True))[0]
    if fault["kind"] == "hang":
        assert isinstance(outcome, aiohttp.ClientOSError)  # a hung request is cut
    else:
        assert isinstance(outcome, aiohttp.ClientResponse)  # a slowed one answered at once
        outcome.close()


async def test_slow_answers_normally_after_the_delay(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState
) -> None:
    """kind="slow" waits delay_s, then answers what the route would have answered."""
    delay_s = 0.05
    state.fail("mms.token", kind="slow", delay_s=delay_s, times=1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await _post_token(http, arm_token) == 200
    assert loop.time() - started >= delay_s


async def test_malformed_is_html_labelled_json(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState
) -> None:
    """kind="malformed" answers 200 with a body that claims to be JSON and is not."""
    state.fail("mms.token", kind="malformed", times=1)
    async with http.post(TOKEN_PATH, headers=bearer(arm_token)) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        assert (await resp.text()).startswith("<html>")
        with pytest.raises(json.JSONDecodeError):
            await resp.json()


async def test_partial_cuts_the_real_answer_in_half(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState
) -> None:
    """kind="partial" sends half the real JSON, with a Content-Length that matches."""
    state.fail("mms.token", kind="partial", times=1)
    async with http.post(TOKEN_PATH, headers=bearer(arm_token)) as resp:
        body = await resp.read()
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(len(body))
    assert body.startswith(b'{"accessToken": "ey')
    with pytest.raises(json.JSONDecodeError):
        json.loads(body)
    async with http.post(TOKEN_PATH, headers=bearer(arm_token)) as resp:
        assert len(await resp.read()) in range(2 * len(body), 2 * len(body) + 2)


async def test_cut_breaks_the_real_answer_off_while_it_is_read(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState
) -> None:
    """kind="cut" declares the real answer's whole length, sends half of it and closes:
    the client's read fails."""
    state.fail("mms.token", kind="cut", times=1)
    async with http.post(TOKEN_PATH, headers=bearer(arm_token)) as resp:
        assert resp.status == 200
        declared = int(resp.headers["Content-Length"])
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    async with http.post(TOKEN_PATH, headers=bearer(arm_token)) as resp:
        assert len(await resp.read()) == declared


def _essential_requests(arm_token: str) -> dict[str, tuple[str, str, dict[str, Any]]]:
    auth = {"headers": bearer(arm_token)}
    form = {
        "grant_type": "client_credentials",
        "client_id": CLIENT,
        "client_secret": SECRET,
        "scope": "https://example/.default",
    }
    return {
        "mms.token": ("POST", TOKEN_PATH, auth),
        "mms.listkeys": ("POST", f"{MMS_PATH}/services/{ACI}/listkeys", auth),
        "mms.describe": ("GET", f"{MMS_PATH}/services/{AKS}", auth),
        "arm.workspace": ("GET", WS_PATH, {**auth, "params": {"api-version": "2024-04-01"}}),
        "discovery": ("GET", f"/regions/{REGION}/discovery", {}),
        "entra.token": ("POST", f"/{TENANT}/oauth2/v2.0/token", {"data": form}),
    }


@pytest.mark.parametrize(
    ("route", "missing", "kept"),
    [
        ("mms.token", ["accessToken", "expiryOn"], "tokenType"),
        ("mms.listkeys", ["primaryKey"], "secondaryKey"),
        ("mms.describe", ["computeType"], "scoringUri"),
        ("arm.workspace", ["properties.discoveryUrl"], "properties.workspaceId"),
        ("discovery", ["modelmanagement"], "api"),
        ("entra.token", ["access_token"], "token_type"),
    ],
)
async def test_missing_fields_drops_what_a_client_needs(
    http: aiohttp.ClientSession,
    arm_token: str,
    state: EmulatorState,
    route: str,
    missing: list[str],
    kept: str,
) -> None:
    """kind="missing_fields" answers 200 with the real answer minus its essential fields."""
    method, path, kwargs = _essential_requests(arm_token)[route]
    state.fail(route, kind="missing_fields", times=1)
    async with http.request(method, path, **kwargs) as resp:
        assert resp.status == 200
        body = await resp.json()
    for dotted in missing:
        *parents, leaf = dotted.split(".")
        assert leaf not in _walk(body, parents)
    *parents, leaf = kept.split(".")
    assert leaf in _walk(body, parents)


def _walk(body: dict[str, Any], names: list[str]) -> dict[str, Any]:
    for name in names:
        body = body[name]
    return body


async def test_mangling_kinds_keep_a_real_error(
    http: aiohttp.ClientSession, state: EmulatorState
) -> None:
    """partial and missing_fields mangle the real answer, so a refused request stays a 401."""
    state.fail("mms.token", kind="missing_fields", times=1)
    async with http.post(TOKEN_PATH) as resp:
        assert (resp.status, (await resp.json())["code"]) == (401, "Unauthorized")
    state.fail("mms.token", kind="partial", times=1)
    async with http.post(TOKEN_PATH) as resp:
        assert resp.status == 401
        assert (await resp.text()).startswith('{"code": "Unauth')


async def test_missing_fields_elsewhere_is_an_empty_object(
    http: aiohttp.ClientSession, state: EmulatorState
) -> None:
    """On a route with no essential fields, kind="missing_fields" answers 200 `{}`."""
    state.fail("score", kind="missing_fields", times=1)
    async with http.post(SCORE_PATH) as resp:
        assert (resp.status, await resp.json()) == (200, {})


async def test_retry_after_may_be_an_http_date(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState, clock: FakeClock
) -> None:
    """A Retry-After built with http_date() is sent as an HTTP-date of the emulator's time."""
    state.fail("mms.token", status=429, retry_after=http_date(clock.now + 30), times=1)
    async with http.post(TOKEN_PATH, headers=bearer(arm_token)) as resp:
        assert resp.status == 429
        retry_at = parsedate_to_datetime(resp.headers["Retry-After"])
    assert retry_at.timestamp() == clock.now + 30
    assert resp.headers["Retry-After"].endswith(" GMT")


async def test_region_scoped_fault_leaves_other_regions_alone(
    http: aiohttp.ClientSession, state: EmulatorState
) -> None:
    """A fault with a region fails only requests under /regions/{region}/, any case."""
    state.fail("discovery", status=503, region=REGION.upper())
    for region, expected in ((REGION, 503), ("northeurope", 200)):
        async with http.get(f"/regions/{region}/discovery") as resp:
            assert resp.status == expected


def test_fault_kinds_are_validated_and_normalised() -> None:
    """Unknown kinds are refused; status is kept for kind "status" only."""
    with pytest.raises(ValueError, match="unknown kind"):
        Fault("mms.token", kind="explode")
    assert Fault("mms.token", kind="reset").status is None
    assert Fault("mms.token", status=None).kind == "slow"
    assert Fault("mms.token", status=503).kind == "status"
