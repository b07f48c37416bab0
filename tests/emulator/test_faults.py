"""Injected faults and call counting, in process and through the control API."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from broker.emulator import ROUTES, Emulator, EmulatorState, Fault
from tests.emulator.conftest import ACI, AKS, MMS_PATH, TENANT, bearer

pytestmark = pytest.mark.timeout(15)


async def _token_status(http: aiohttp.ClientSession, arm_token: str, name: str = AKS) -> int:
    async with http.post(f"{MMS_PATH}/services/{name}/token", headers=bearer(arm_token)) as resp:
        return resp.status


async def test_fault_with_times_then_recovers(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState
) -> None:
    """A fault armed for two requests fails exactly two, then the route works again."""
    state.fail("mms.token", status=503, times=2)
    statuses = [await _token_status(http, arm_token) for _ in range(3)]
    assert statuses == [503, 503, 200]
    assert state.count("mms.token") == 3


async def test_fault_without_times_lasts_until_cleared(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState
) -> None:
    """A fault with times=None holds until clear_faults()."""
    state.fail("mms.token")
    assert [await _token_status(http, arm_token) for _ in range(3)] == [500] * 3
    state.clear_faults()
    assert await _token_status(http, arm_token) == 200


async def test_fault_scoped_to_one_service(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState
) -> None:
    """A per-service fault leaves the other services of the route alone."""
    state.fail("mms.describe", status=500, service=AKS)
    for name, expected in ((AKS, 500), (ACI, 200)):
        async with http.get(f"{MMS_PATH}/services/{name}", headers=bearer(arm_token)) as resp:
            assert resp.status == expected
    assert state.count("mms.describe", service=AKS) == 1
    assert state.count("mms.describe", service=ACI) == 1
    assert state.count("mms.describe") == 2


async def test_default_fault_bodies_follow_each_service_shape(
    http: aiohttp.ClientSession, emu: Emulator, arm_token: str, state: EmulatorState
) -> None:
    """Injected 429s look like MMS, ARM and Entra errors, with Retry-After."""
    state.fail("mms.token", status=429, retry_after=7, times=1)
    async with http.post(f"{MMS_PATH}/services/{AKS}/token", headers=bearer(arm_token)) as resp:
        assert resp.headers["Retry-After"] == "7"
        assert await resp.json() == {
            "code": "TooManyRequests",
            "statusCode": 429,
            "message": "Injected fault: mms.token answers 429 (TooManyRequests).",
        }
    state.fail("discovery", status=503, times=1)
    async with http.get("/regions/westeurope/discovery") as resp:
        assert (await resp.json())["error"]["code"] == "ServiceUnavailable"
    state.fail("entra.token", status=503, times=1)
    async with http.post(f"/{TENANT}/oauth2/v2.0/token", data={}) as resp:
        body = await resp.json()
    assert body["error"] == "temporarily_unavailable"
    assert body["error_description"].startswith("AADSTS90033: ")


async def test_fault_body_string_is_sent_verbatim(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState
) -> None:
    """A string body is sent as is, so malformed JSON can be injected."""
    state.fail("mms.token", status=200, body='{"accessToken": ', times=1)
    async with http.post(f"{MMS_PATH}/services/{AKS}/token", headers=bearer(arm_token)) as resp:
        assert resp.status == 200
        assert await resp.text() == '{"accessToken": '


async def test_delay_only_fault_still_answers(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState
) -> None:
    """status=None only delays: the request is answered normally afterwards."""
    state.fail("mms.token", status=None, delay_s=0.05, times=1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await _token_status(http, arm_token) == 200
    assert loop.time() - started >= 0.05


async def test_faults_apply_in_the_order_armed(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState
) -> None:
    """Faults queue: the first armed is spent before the next one answers."""
    state.fail("mms.token", status=500, times=1)
    state.fail("mms.token", status=429, times=1)
    assert [await _token_status(http, arm_token) for _ in range(3)] == [500, 429, 200]


def test_fault_validates_its_fields() -> None:
    """Unknown routes and impossible values are refused when the fault is built."""
    for kwargs in (
        {"route": "nope"},
        {"route": "score", "status": 42},
        {"route": "score", "times": 0},
    ):
        with pytest.raises(ValueError, match=r"."):
            Fault(**kwargs)
    assert "mms.regenerate" in ROUTES


async def test_every_route_is_counted(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState
) -> None:
    """Requests are counted per route, failed ones included."""
    state.fail("score", status=500, times=1)
    for _ in range(2):
        async with http.post(
            f"/regions/westeurope/workspaces/ws-test/api/v1/service/{AKS}/score"
        ) as resp:
            await resp.read()
    assert state.count("score") == 2
    assert state.count("score", service=AKS) == 2
    assert state.calls["entra.token"] == 1


async def test_control_api_arms_lists_counts_and_clears(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState
) -> None:
    """Tests in other languages drive faults and read counts over HTTP."""
    fault = {"route": "mms.token", "status": 502, "times": 1, "service": AKS, "retry_after": 1.5}
    async with http.post("/_emulator/faults", json=fault) as resp:
        assert resp.status == 201
    async with http.get("/_emulator/faults") as resp:
        assert [f["status"] for f in (await resp.json())["faults"]] == [502]
    async with http.post(f"{MMS_PATH}/services/{AKS}/token", headers=bearer(arm_token)) as resp:
        assert (resp.status, resp.headers["Retry-After"]) == (502, "1.5")
    async with http.get("/_emulator/calls") as resp:
        calls = await resp.json()
    assert calls["calls"]["mms.token"] == 1
    assert calls["by_service"]["mms.token"] == {AKS: 1}
    state.fail("score")
    async with http.delete("/_emulator/faults") as resp:
        assert await resp.json() == {"cleared": 1, "regions_restored": []}


@pytest.mark.parametrize(
    "body", [{"status": 500}, {"route": "nope"}, {"route": "score", "times": "2"}, [1], "x"]
)
async def test_control_api_refuses_bad_faults(http: aiohttp.ClientSession, body: object) -> None:
    """A malformed fault is a 400 that says what is wrong."""
    async with http.post("/_emulator/faults", data=json.dumps(body)) as resp:
        assert resp.status == 400
        assert (await resp.json())["message"]
