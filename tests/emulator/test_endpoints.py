"""The emulated ARM routes of v2 managed online endpoints: describe, AMLToken, listKeys,
regenerateKeys and its ARM operation, with ARM's refusals."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import pytest

from broker.emulator import (
    ENDPOINT_LIST_KEYS_ACTION,
    ENDPOINT_READ_ACTION,
    ENDPOINT_REGENERATE_ACTION,
    ENDPOINT_TOKEN_ACTION,
    Emulator,
    EmulatorState,
)
from tests.emulator.conftest import (
    AAD_EP,
    CLIENT,
    ENDPOINTS_PATH,
    KEY_EP,
    REGION,
    RG,
    SUB,
    TOKEN_EP,
    WS,
    WS_PATH,
    FakeClock,
    bearer,
    entra_token,
)

pytestmark = pytest.mark.timeout(15)

API = {"api-version": "2024-04-01"}
ROTATE_PRIMARY = {"keyType": "Primary", "keyValue": None}
# (method, suffix after the endpoint's path, endpoint of the right auth mode, action needed)
ROUTES = [
    ("GET", "", KEY_EP, ENDPOINT_READ_ACTION),
    ("POST", "/token", TOKEN_EP, ENDPOINT_TOKEN_ACTION),
    ("POST", "/listKeys", KEY_EP, ENDPOINT_LIST_KEYS_ACTION),
    ("POST", "/regenerateKeys", KEY_EP, ENDPOINT_REGENERATE_ACTION),
]
ROUTE_IDS = ["describe", "token", "listKeys", "regenerateKeys"]
OPERATION_URL = re.compile(
    rf"https://127\.0\.0\.1:\d+/subscriptions/{SUB}/providers/"
    rf"Microsoft\.MachineLearningServices/locations/{REGION}/mfeOperationsStatus/"
    r"[0-9a-f]+\?api-version=2024-04-01"
)


async def _call(
    http: aiohttp.ClientSession,
    method: str,
    path: str,
    token: str | None,
    *,
    body: object = ROTATE_PRIMARY,
    params: dict[str, str] | None = None,
) -> tuple[int, Any]:
    headers = bearer(token) if token is not None else {}
    json_body = body if path.endswith("/regenerateKeys") else None
    query = API if params is None else params
    async with http.request(method, path, params=query, headers=headers, json=json_body) as resp:
        return resp.status, await resp.json(content_type=None)


def _grant_all(state: EmulatorState) -> None:
    for action in (ENDPOINT_TOKEN_ACTION, ENDPOINT_LIST_KEYS_ACTION, ENDPOINT_REGENERATE_ACTION):
        state.grant_action(CLIENT, SUB, RG, WS, action)


async def _rotate(http: aiohttp.ClientSession, arm_token: str, body: object) -> str:
    path = f"{ENDPOINTS_PATH}/{KEY_EP}/regenerateKeys"
    async with http.post(path, params=API, json=body, headers=bearer(arm_token)) as resp:
        assert resp.status == 202, await resp.text()
        assert resp.headers["Location"] == resp.headers["Azure-AsyncOperation"]
        return resp.headers["Azure-AsyncOperation"]


async def _poll(http: aiohttp.ClientSession, url: str, arm_token: str) -> tuple[int, Any]:
    async with http.get(url, headers=bearer(arm_token)) as resp:
        return resp.status, await resp.json()


@pytest.mark.parametrize(
    ("name", "mode"), [(TOKEN_EP, "AMLToken"), (KEY_EP, "Key"), (AAD_EP, "AADToken")]
)
async def test_describe_names_auth_mode_and_scoring_uri(
    http: aiohttp.ClientSession, emu: Emulator, arm_token: str, name: str, mode: str
) -> None:
    """A Reader gets the endpoint's ARM id, type, region, auth mode and scoring URI."""
    status, body = await _call(http, "GET", f"{ENDPOINTS_PATH}/{name}", arm_token)
    assert status == 200
    assert body == {
        "id": f"{WS_PATH}/onlineEndpoints/{name}",
        "name": name,
        "type": "Microsoft.MachineLearningServices/workspaces/onlineEndpoints",
        "location": REGION,
        "properties": {
            "authMode": mode,
            "scoringUri": f"{emu.base_url}/regions/{REGION}/endpoints/{name}/score",
            "provisioningState": "Succeeded",
        },
    }


async def test_token_carries_expiry_and_refresh_times(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState, clock: FakeClock
) -> None:
    """A granted caller gets a Bearer JWT expiring after the lifetime, refreshing at the offset."""
    state.grant_action(CLIENT, SUB, RG, WS, ENDPOINT_TOKEN_ACTION)
    status, body = await _call(http, "POST", f"{ENDPOINTS_PATH}/{TOKEN_EP}/token", arm_token)
    assert status == 200
    assert body["tokenType"] == "Bearer"
    assert body["accessToken"].count(".") == 2
    assert (body["expiryTimeUtc"], body["refreshAfterTimeUtc"]) == (clock.now + 60, clock.now + 30)


async def test_list_keys_answers_the_current_keys(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState
) -> None:
    """A granted caller gets exactly the endpoint's current primary and secondary keys."""
    state.grant_action(CLIENT, SUB, RG, WS, ENDPOINT_LIST_KEYS_ACTION)
    status, body = await _call(http, "POST", f"{ENDPOINTS_PATH}/{KEY_EP}/listKeys", arm_token)
    primary, secondary = state.current_endpoint_keys(SUB, RG, WS, KEY_EP)
    assert (status, body) == (200, {"primaryKey": primary, "secondaryKey": secondary})
    assert primary != secondary


@pytest.mark.parametrize(("method", "suffix", "name", "action"), ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize("role", ["Contributor", "Owner"])
async def test_contributor_and_owner_may_do_every_action(
    http: aiohttp.ClientSession,
    arm_token: str,
    state: EmulatorState,
    role: str,
    method: str,
    suffix: str,
    name: str,
    action: str,
) -> None:
    """Contributor and Owner imply every endpoint action without a separate grant."""
    state.revoke_role(CLIENT, SUB, RG, WS)
    state.grant_role(CLIENT, SUB, RG, WS, role=role)
    status, _ = await _call(http, method, f"{ENDPOINTS_PATH}/{name}{suffix}", arm_token)
    assert status == (202 if suffix == "/regenerateKeys" else 200)


@pytest.mark.parametrize(("method", "suffix", "name", "action"), ROUTES, ids=ROUTE_IDS)
async def test_missing_permission_is_403_naming_the_action(
    http: aiohttp.ClientSession,
    arm_token: str,
    state: EmulatorState,
    method: str,
    suffix: str,
    name: str,
    action: str,
) -> None:
    """Without the needed role or action, ARM answers AuthorizationFailed naming that action."""
    if action == ENDPOINT_READ_ACTION:
        state.revoke_role(CLIENT, SUB, RG, WS)
    status, body = await _call(http, method, f"{ENDPOINTS_PATH}/{name}{suffix}", arm_token)
    assert status == 403
    assert body["error"]["code"] == "AuthorizationFailed"
    assert f"perform action '{action}' over scope " in body["error"]["message"]
    assert f"'{WS_PATH}/onlineEndpoints/{name}'" in body["error"]["message"]


async def test_one_granted_action_grants_no_other(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState
) -> None:
    """A grant of the token action does not open listKeys, and a revoked grant closes token."""
    state.grant_action(CLIENT, SUB, RG, WS, ENDPOINT_TOKEN_ACTION)
    assert (await _call(http, "POST", f"{ENDPOINTS_PATH}/{KEY_EP}/listKeys", arm_token))[0] == 403
    state.revoke_action(CLIENT, SUB, RG, WS, ENDPOINT_TOKEN_ACTION)
    assert (await _call(http, "POST", f"{ENDPOINTS_PATH}/{TOKEN_EP}/token", arm_token))[0] == 403


@pytest.mark.parametrize(("method", "suffix", "name", "action"), ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize("credential", [None, "not-a-jwt", "ml-token"])
async def test_without_a_valid_arm_token_is_401(
    http: aiohttp.ClientSession,
    method: str,
    suffix: str,
    name: str,
    action: str,
    credential: str | None,
) -> None:
    """No token, garbage, or a token for another audience answers InvalidAuthenticationToken."""
    if credential == "ml-token":
        credential = await entra_token(http, "https://ml.azure.com")
    status, body = await _call(http, method, f"{ENDPOINTS_PATH}/{name}{suffix}", credential)
    assert status == 401
    assert body["error"]["code"] == "InvalidAuthenticationToken"


async def test_expired_arm_token_is_401(
    http: aiohttp.ClientSession, arm_token: str, clock: FakeClock
) -> None:
    """An ARM token past its exp by the emulator's clock is refused on endpoint routes too."""
    clock.advance(3601)
    status, body = await _call(http, "GET", f"{ENDPOINTS_PATH}/{KEY_EP}", arm_token)
    assert status == 401
    assert "expiry" in body["error"]["message"]


@pytest.mark.parametrize(("method", "suffix", "name", "action"), ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize("missing", ["endpoint", "workspace"])
async def test_unknown_endpoint_or_workspace_is_404(
    http: aiohttp.ClientSession,
    arm_token: str,
    state: EmulatorState,
    method: str,
    suffix: str,
    name: str,
    action: str,
    missing: str,
) -> None:
    """An endpoint or workspace that does not exist answers ResourceNotFound."""
    _grant_all(state)
    path = f"{ENDPOINTS_PATH}/{name}{suffix}"
    path = path.replace(name, "ep-missing") if missing == "endpoint" else path.replace(WS, "nope")
    status, body = await _call(http, method, path, arm_token)
    assert (status, body["error"]["code"]) == (404, "ResourceNotFound")


@pytest.mark.parametrize(("method", "suffix", "name", "action"), ROUTES, ids=ROUTE_IDS)
async def test_missing_api_version_is_400(
    http: aiohttp.ClientSession,
    arm_token: str,
    method: str,
    suffix: str,
    name: str,
    action: str,
) -> None:
    """Every endpoint route requires the api-version query parameter."""
    path = f"{ENDPOINTS_PATH}/{name}{suffix}"
    status, body = await _call(http, method, path, arm_token, params={})
    assert (status, body["error"]["code"]) == (400, "MissingApiVersionParameter")


@pytest.mark.parametrize(
    ("suffix", "name"),
    [
        ("/token", KEY_EP),
        ("/token", AAD_EP),
        ("/listKeys", TOKEN_EP),
        ("/listKeys", AAD_EP),
        ("/regenerateKeys", TOKEN_EP),
    ],
)
async def test_wrong_auth_mode_is_400(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState, suffix: str, name: str
) -> None:
    """A token from a non-AMLToken endpoint, or keys from a non-Key one, is a BadRequest."""
    _grant_all(state)
    status, body = await _call(http, "POST", f"{ENDPOINTS_PATH}/{name}{suffix}", arm_token)
    assert (status, body["error"]["code"]) == (400, "BadRequest")
    assert "authMode" in body["error"]["message"]


@pytest.mark.parametrize(
    "body", [{}, {"keyType": "Tertiary"}, {"keyType": "Primary", "keyValue": ""}, [1]]
)
async def test_malformed_rotation_body_is_400(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState, body: object
) -> None:
    """A regenerateKeys body without a valid keyType or keyValue is an ARM BadRequest."""
    _grant_all(state)
    path = f"{ENDPOINTS_PATH}/{KEY_EP}/regenerateKeys"
    status, answer = await _call(http, "POST", path, arm_token, body=body)
    assert (status, answer["error"]["code"]) == (400, "BadRequest")


async def test_rotation_replaces_the_key_only_when_the_operation_succeeds(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState
) -> None:
    """regenerateKeys answers 202 and an operation URL: InProgress first (old key still
    listed), Succeeded next (new key listed, secondary untouched)."""
    _grant_all(state)
    old_primary, secondary = state.current_endpoint_keys(SUB, RG, WS, KEY_EP)
    url = await _rotate(http, arm_token, ROTATE_PRIMARY)
    assert OPERATION_URL.fullmatch(url), url
    assert await _poll(http, url, arm_token) == (200, {"status": "InProgress"})
    assert state.current_endpoint_keys(SUB, RG, WS, KEY_EP) == (old_primary, secondary)
    assert await _poll(http, url, arm_token) == (200, {"status": "Succeeded"})
    new_primary, still_secondary = state.current_endpoint_keys(SUB, RG, WS, KEY_EP)
    assert new_primary != old_primary
    assert still_secondary == secondary
    assert await _poll(http, url, arm_token) == (200, {"status": "Succeeded"})
    status, listed = await _call(http, "POST", f"{ENDPOINTS_PATH}/{KEY_EP}/listKeys", arm_token)
    assert (status, listed["primaryKey"]) == (200, new_primary)


async def test_rotation_to_a_given_secondary_value(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState
) -> None:
    """A keyValue given for the secondary key becomes that key once the operation succeeds."""
    _grant_all(state)
    primary, _ = state.current_endpoint_keys(SUB, RG, WS, KEY_EP)
    url = await _rotate(http, arm_token, {"keyType": "secondary", "keyValue": "chosen-value"})
    for _ in range(2):
        await _poll(http, url, arm_token)
    assert state.current_endpoint_keys(SUB, RG, WS, KEY_EP) == (primary, "chosen-value")


async def test_operation_needs_a_valid_arm_token(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState
) -> None:
    """Polling without a token is a 401 and does not advance the operation."""
    _grant_all(state)
    url = await _rotate(http, arm_token, ROTATE_PRIMARY)
    async with http.get(url) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "InvalidAuthenticationToken"
    assert await _poll(http, url, arm_token) == (200, {"status": "InProgress"})


async def test_unknown_or_misplaced_operation_is_404(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState
) -> None:
    """An unknown operation id, or a real one under another region, answers NotFound."""
    _grant_all(state)
    url = await _rotate(http, arm_token, ROTATE_PRIMARY)
    unknown = re.sub(r"mfeOperationsStatus/[0-9a-f]+", "mfeOperationsStatus/feed", url)
    for wrong in (unknown, url.replace(f"/locations/{REGION}/", "/locations/northeurope/")):
        status, body = await _poll(http, wrong, arm_token)
        assert (status, body["error"]["code"]) == (404, "NotFound")


async def test_v1_operations_are_not_arm_operations(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState
) -> None:
    """An endpoint rotation is not visible through MMS's operation route."""
    _grant_all(state)
    url = await _rotate(http, arm_token, ROTATE_PRIMARY)
    operation_id = url.split("/mfeOperationsStatus/")[1].split("?")[0]
    mms = f"/regions/{REGION}/modelmanagement/v1.0{WS_PATH}/operations/{operation_id}"
    async with http.get(mms, headers=bearer(arm_token)) as resp:
        assert resp.status == 404
