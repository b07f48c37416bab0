"""Region outages: everything under /regions/{region}/ fails while Entra ID and ARM,
which are global, stay up."""

from __future__ import annotations

import aiohttp
import pytest

from broker.emulator import EmulatorState
from tests.emulator.conftest import AKS, MMS_PATH, REGION, SCORE_PATH, WS_PATH, bearer

pytestmark = pytest.mark.timeout(15)

CLIENT_PATIENCE_S = 0.2
TOKEN_PATH = f"{MMS_PATH}/services/{AKS}/token"
API = {"api-version": "2024-04-01"}


async def _status(http: aiohttp.ClientSession, method: str, path: str, arm_token: str) -> int:
    async with http.request(method, path, headers=bearer(arm_token), params=API) as resp:
        await resp.read()
        return resp.status


async def test_dark_region_resets_discovery_mms_and_scoring(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState
) -> None:
    """By default a dark region resets every regional request, and still counts them."""
    state.region_down(REGION)
    requests = [
        ("POST", TOKEN_PATH),
        ("POST", SCORE_PATH),
        ("GET", f"{MMS_PATH}/services/{AKS}"),
        ("GET", f"/regions/{REGION}/discovery"),
    ]
    for method, path in requests:
        with pytest.raises(aiohttp.ClientOSError):
            await _status(http, method, path, arm_token)
    assert (state.count("mms.token"), state.count("score")) == (1, 1)
    assert (state.count("mms.describe"), state.count("discovery")) == (2, 2)  # GETs retried


async def test_entra_arm_and_other_regions_stay_up(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState
) -> None:
    """A regional outage leaves ARM, Entra ID (the token was just fetched) and other regions."""
    state.region_down(REGION)
    assert await _status(http, "GET", WS_PATH, arm_token) == 200
    assert await _status(http, "GET", "/regions/northeurope/discovery", arm_token) == 200


async def test_status_outage_answers_azure_shaped_errors(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState
) -> None:
    """kind="status" answers the outage's status in each route's error shape."""
    state.region_down(REGION.upper(), kind="status", status=503)
    async with http.get(f"/regions/{REGION}/discovery") as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "ServiceUnavailable"
    async with http.post(TOKEN_PATH, headers=bearer(arm_token)) as resp:
        assert (await resp.json())["statusCode"] == 503


async def test_hang_outage_never_answers(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState
) -> None:
    """kind="hang" keeps regional requests waiting until the client gives up."""
    state.region_down(REGION, kind="hang")
    with pytest.raises(TimeoutError):
        await http.post(
            TOKEN_PATH,
            headers=bearer(arm_token),
            timeout=aiohttp.ClientTimeout(total=CLIENT_PATIENCE_S),
        )


async def test_outage_beats_faults_without_spending_them(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState
) -> None:
    """While a region is dark its faults wait; region_up lets them act again."""
    state.fail("mms.token", status=429, times=1)
    state.region_down(REGION, kind="status", status=502)
    assert await _status(http, "POST", TOKEN_PATH, arm_token) == 502
    assert state.region_up(REGION) is True
    assert state.region_up(REGION) is False
    statuses = [await _status(http, "POST", TOKEN_PATH, arm_token) for _ in range(2)]
    assert statuses == [429, 200]


async def test_clear_faults_brings_regions_back(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState
) -> None:
    """clear_faults() ends every outage as well as every fault."""
    state.region_down(REGION, kind="status")
    state.region_down("northeurope", kind="status")
    state.clear_faults()
    assert state.faults.outages() == []
    assert await _status(http, "POST", TOKEN_PATH, arm_token) == 200


@pytest.mark.parametrize(
    ("region", "kind", "status"),
    [
        (REGION, "partial", 503),
        (REGION, "slow", 503),
        (REGION, "status", 42),
        ("a/b", "reset", 503),
    ],
)
def test_outages_are_validated(region: str, kind: str, status: int) -> None:
    """An outage must name a region, a failing kind and a real status."""
    with pytest.raises(ValueError, match=r"."):
        EmulatorState().region_down(region, kind=kind, status=status)
