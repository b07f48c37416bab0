"""The control API's fault kinds, region outages and token lifetimes, for tests written in
other languages, and its 400s on bad input."""

from __future__ import annotations

import json

import aiohttp
import pytest

from broker.emulator import EmulatorState
from tests.emulator.conftest import AKS, MMS_PATH, REGION, FakeClock, bearer

pytestmark = pytest.mark.timeout(15)

TOKEN_PATH = f"{MMS_PATH}/services/{AKS}/token"


async def test_faults_take_a_kind_and_a_region(
    http: aiohttp.ClientSession, state: EmulatorState
) -> None:
    """POST /_emulator/faults arms kinds and region scopes; GET lists them."""
    fault = {"route": "discovery", "kind": "malformed", "region": REGION, "times": 1}
    async with http.post("/_emulator/faults", json=fault) as resp:
        assert resp.status == 201
        armed = await resp.json()
    assert (armed["kind"], armed["region"], armed["status"]) == ("malformed", REGION, None)
    async with http.get("/_emulator/faults") as resp:
        listed = await resp.json()
    assert listed == {"faults": [armed], "regions_down": []}
    async with http.get(f"/regions/{REGION}/discovery") as resp:
        assert (await resp.text()).startswith("<html>")


async def test_regions_go_down_and_up(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState
) -> None:
    """POST …/regions/{r}/down and …/up switch an outage; GET /_emulator/faults shows it."""
    down = {"kind": "status", "status": 502}
    async with http.post(f"/_emulator/regions/{REGION}/down", json=down) as resp:
        assert await resp.json() == {"region": REGION, **down}
    async with http.get("/_emulator/faults") as resp:
        assert (await resp.json())["regions_down"] == [{"region": REGION, **down}]
    async with http.post(TOKEN_PATH, headers=bearer(arm_token)) as resp:
        assert resp.status == 502
    async with http.post(f"/_emulator/regions/{REGION}/up") as resp:
        assert await resp.json() == {"region": REGION, "was_down": True}
    async with http.post(TOKEN_PATH, headers=bearer(arm_token)) as resp:
        assert resp.status == 200


async def test_region_down_without_a_body_resets(
    http: aiohttp.ClientSession, state: EmulatorState
) -> None:
    """An empty body takes the region down with the defaults: reset, 503."""
    async with http.post("/_emulator/regions/eastus/down") as resp:
        assert await resp.json() == {"region": "eastus", "kind": "reset", "status": 503}
    assert [outage.kind for outage in state.faults.outages()] == ["reset"]


async def test_delete_faults_restores_regions(
    http: aiohttp.ClientSession, state: EmulatorState
) -> None:
    """DELETE /_emulator/faults drops faults and names the regions it brought back."""
    state.fail("score", kind="hang")
    state.region_down("eastus")
    async with http.delete("/_emulator/faults") as resp:
        assert await resp.json() == {"cleared": 1, "regions_restored": ["eastus"]}
    assert state.faults.outages() == [] == state.faults.active()


async def test_token_lifetime_sets_lifetime_and_placement(
    http: aiohttp.ClientSession, arm_token: str, clock: FakeClock
) -> None:
    """POST /_emulator/token-lifetime changes later tokens' expiry and refreshAfter."""
    body = {"lifetime_s": 90, "service": AKS, "placement": "after_expiry"}
    async with http.post("/_emulator/token-lifetime", json=body) as resp:
        assert await resp.json() == {**body, "services_changed": 1}
    async with http.post(TOKEN_PATH, headers=bearer(arm_token)) as resp:
        token = await resp.json()
    assert (token["expiryOn"], token["refreshAfter"]) == (clock.now + 90, clock.now + 150)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/_emulator/faults", {"route": "score", "kind": "explode"}),
        ("/_emulator/faults", {"route": "score", "region": 3}),
        ("/_emulator/regions/eastus/down", {"kind": "partial"}),
        ("/_emulator/regions/eastus/down", {"status": "503"}),
        ("/_emulator/regions/eastus/down", {"colour": "red"}),
        ("/_emulator/regions/eastus/down", [1]),
        ("/_emulator/token-lifetime", {}),
        ("/_emulator/token-lifetime", {"lifetime_s": True}),
        ("/_emulator/token-lifetime", {"lifetime_s": -1}),
        ("/_emulator/token-lifetime", {"lifetime_s": 10, "placement": "later"}),
        ("/_emulator/token-lifetime", {"lifetime_s": 10, "service": "no-such"}),
    ],
)
async def test_bad_control_bodies_are_400(
    http: aiohttp.ClientSession, path: str, body: object
) -> None:
    """Bad input is a 400 {"error", "message"} that says what is wrong."""
    async with http.post(path, data=json.dumps(body)) as resp:
        assert resp.status == 400
        answer = await resp.json()
    assert answer["error"] == "bad_request"
    assert answer["message"]


async def test_non_json_control_body_is_400(http: aiohttp.ClientSession) -> None:
    """A body that is not JSON at all is a 400 too."""
    async with http.post("/_emulator/token-lifetime", data="lifetime=10") as resp:
        assert resp.status == 400
        assert "JSON" in (await resp.json())["message"]
