"""The emulated ARM workspace lookup and regional discovery."""

from __future__ import annotations

import aiohttp
import pytest

from broker.emulator import Emulator, EmulatorState
from tests.emulator.conftest import (
    CLIENT,
    REGION,
    RG,
    SUB,
    WS,
    FakeClock,
    bearer,
    entra_token,
)

pytestmark = pytest.mark.timeout(15)

WS_PATH = (
    f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/"
    f"Microsoft.MachineLearningServices/workspaces/{WS}"
)
API = {"api-version": "2024-04-01"}


async def test_workspace_names_its_region_and_discovery_url(
    http: aiohttp.ClientSession, emu: Emulator, arm_token: str
) -> None:
    """A Reader gets the workspace's location and a discoveryUrl on the emulator."""
    async with http.get(WS_PATH, params=API, headers=bearer(arm_token)) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["location"] == REGION
    assert body["name"] == WS
    assert body["id"] == WS_PATH
    assert body["type"] == "Microsoft.MachineLearningServices/workspaces"
    assert body["properties"]["discoveryUrl"] == f"{emu.base_url}/regions/{REGION}/discovery"
    assert body["properties"]["workspaceId"]


async def test_discovery_maps_modelmanagement_to_the_region(
    http: aiohttp.ClientSession, emu: Emulator
) -> None:
    """Discovery needs no token and names the regional base for MMS."""
    async with http.get(f"/regions/{REGION}/discovery") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["modelmanagement"] == emu.region_api.format(region=REGION)
    assert body["api"] == body["modelmanagement"]
    assert {"experimentation", "history", "catalog"} <= body.keys()


async def test_trailing_slash_audience_is_accepted(
    http: aiohttp.ClientSession, emu: Emulator
) -> None:
    """A token for `…/` (the resource manager with a trailing slash) is as good."""
    token = await entra_token(http, emu.resource_manager + "/")
    async with http.get(WS_PATH, params=API, headers=bearer(token)) as resp:
        assert resp.status == 200


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer not-a-jwt"}, {"Authorization": "Basic abc"}],
    ids=["missing", "garbage", "not-bearer"],
)
async def test_workspace_without_a_valid_token_is_401(
    http: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    """No token, or an unverifiable one, answers InvalidAuthenticationToken."""
    async with http.get(WS_PATH, params=API, headers=headers) as resp:
        assert resp.status == 401
        body = await resp.json()
    assert body["error"]["code"] == "InvalidAuthenticationToken"


async def test_token_for_another_audience_is_401(
    http: aiohttp.ClientSession, emu: Emulator
) -> None:
    """A token for another resource is refused by ARM."""
    token = await entra_token(http, "https://ml.azure.com")
    async with http.get(WS_PATH, params=API, headers=bearer(token)) as resp:
        assert resp.status == 401
        assert "audience" in (await resp.json())["error"]["message"]


async def test_expired_token_is_401(
    http: aiohttp.ClientSession, arm_token: str, clock: FakeClock
) -> None:
    """A token past its exp by the emulator's clock is refused."""
    clock.advance(3601)
    async with http.get(WS_PATH, params=API, headers=bearer(arm_token)) as resp:
        assert resp.status == 401
        assert "expiry" in (await resp.json())["error"]["message"]


async def test_workspace_without_a_role_is_403(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState
) -> None:
    """Without Reader, ARM answers AuthorizationFailed naming client, action and scope."""
    state.revoke_role(CLIENT, SUB, RG, WS)
    async with http.get(WS_PATH, params=API, headers=bearer(arm_token)) as resp:
        assert resp.status == 403
        error = (await resp.json())["error"]
    assert error["code"] == "AuthorizationFailed"
    assert error["message"].startswith(f"The client '{CLIENT}' with object id '")
    assert "'Microsoft.MachineLearningServices/workspaces/read'" in error["message"]
    assert f"over scope '{WS_PATH}' or the scope is invalid." in error["message"]


@pytest.mark.parametrize("role", ["Contributor", "Owner"])
async def test_stronger_roles_also_read(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState, role: str
) -> None:
    """Contributor and Owner include Reader's permission."""
    state.revoke_role(CLIENT, SUB, RG, WS)
    state.grant_role(CLIENT, SUB, RG, WS, role=role)
    async with http.get(WS_PATH, params=API, headers=bearer(arm_token)) as resp:
        assert resp.status == 200


async def test_unknown_workspace_is_404(http: aiohttp.ClientSession, arm_token: str) -> None:
    """A workspace that does not exist answers ResourceNotFound."""
    path = WS_PATH.replace(WS, "ws-missing")
    async with http.get(path, params=API, headers=bearer(arm_token)) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "ResourceNotFound"


async def test_missing_api_version_is_400(http: aiohttp.ClientSession, arm_token: str) -> None:
    """ARM requires the api-version query parameter."""
    async with http.get(WS_PATH, headers=bearer(arm_token)) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "MissingApiVersionParameter"
