"""Scoring on v2 online endpoints by each auth mode, faults and outages on the endpoint
routes, and the endpoints of the demo cloud."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from broker.emulator import (
    ENDPOINT_LIST_KEYS_ACTION,
    ENDPOINT_REGENERATE_ACTION,
    ENDPOINT_TOKEN_ACTION,
    EmulatorState,
    Fault,
    demo_state,
    seed,
)
from broker.emulator.fault_specs import parse_fault
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
    FakeClock,
    bearer,
    entra_token,
)

pytestmark = pytest.mark.timeout(15)

API = {"api-version": "2024-04-01"}
ML = "https://ml.azure.com"
OTHER_KEY_EP = "ep-key-2"


def _score_path(name: str, region: str = REGION) -> str:
    return f"/regions/{region}/endpoints/{name}/score"


async def _score(
    http: aiohttp.ClientSession, name: str, credential: str | None
) -> tuple[int, object]:
    headers = bearer(credential) if credential is not None else {}
    async with http.post(_score_path(name), json={"data": [1]}, headers=headers) as resp:
        return resp.status, await resp.json()


async def _aml_token(http: aiohttp.ClientSession, arm_token: str, name: str = TOKEN_EP) -> str:
    path = f"{ENDPOINTS_PATH}/{name}/token"
    async with http.post(path, params=API, headers=bearer(arm_token)) as resp:
        assert resp.status == 200, await resp.text()
        return str((await resp.json())["accessToken"])


async def _status(
    http: aiohttp.ClientSession, method: str, path: str, arm_token: str
) -> tuple[int, Any]:
    body = {"keyType": "Primary", "keyValue": None} if path.endswith("/regenerateKeys") else None
    async with http.request(method, path, params=API, headers=bearer(arm_token), json=body) as resp:
        return resp.status, await resp.json(content_type=None)


@pytest.fixture
def granted(state: EmulatorState) -> EmulatorState:
    """The test state with every endpoint action granted to the test client."""
    for action in (ENDPOINT_TOKEN_ACTION, ENDPOINT_LIST_KEYS_ACTION, ENDPOINT_REGENERATE_ACTION):
        state.grant_action(CLIENT, SUB, RG, WS, action)
    return state


async def test_aml_token_scores_until_it_expires(
    http: aiohttp.ClientSession, arm_token: str, granted: EmulatorState, clock: FakeClock
) -> None:
    """An AMLToken scores its endpoint until the emulator's clock reaches its expiry."""
    token = await _aml_token(http, arm_token)
    assert await _score(http, TOKEN_EP, token) == (200, {"accepted": True, "auth": "token"})
    clock.advance(59)
    assert (await _score(http, TOKEN_EP, token))[0] == 200
    clock.advance(1)
    assert await _score(http, TOKEN_EP, token) == (401, {"error": "unauthorized"})


async def test_aml_token_of_another_endpoint_is_rejected(
    http: aiohttp.ClientSession, arm_token: str, granted: EmulatorState
) -> None:
    """An AMLToken is good only for the endpoint it was issued for."""
    granted.add_online_endpoint(SUB, RG, WS, "ep-token-2", auth_mode="AMLToken")
    token = await _aml_token(http, arm_token, "ep-token-2")
    assert (await _score(http, TOKEN_EP, token))[0] == 401


async def test_aml_token_endpoint_refuses_keys_entra_tokens_and_nothing(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState
) -> None:
    """An AMLToken endpoint has keys, but neither they, an Entra token nor no header score."""
    primary, _ = state.current_endpoint_keys(SUB, RG, WS, TOKEN_EP)
    ml_token = await entra_token(http, ML)
    for credential in (primary, ml_token, arm_token, None):
        assert (await _score(http, TOKEN_EP, credential))[0] == 401


async def test_both_current_keys_score_a_key_endpoint(
    http: aiohttp.ClientSession, state: EmulatorState
) -> None:
    """Primary and secondary keys both score a Key endpoint, and garbage does not."""
    for key in state.current_endpoint_keys(SUB, RG, WS, KEY_EP):
        assert await _score(http, KEY_EP, key) == (200, {"accepted": True, "auth": "key"})
    assert (await _score(http, KEY_EP, "garbage"))[0] == 401


async def test_key_endpoint_refuses_tokens(
    http: aiohttp.ClientSession, arm_token: str, granted: EmulatorState
) -> None:
    """A Key endpoint takes no AMLToken (even a valid one) and no Entra token."""
    aml = await _aml_token(http, arm_token)
    ml_token = await entra_token(http, ML)
    for credential in (aml, ml_token, None):
        assert (await _score(http, KEY_EP, credential))[0] == 401


async def test_old_key_scores_until_the_rotation_succeeds(
    http: aiohttp.ClientSession, arm_token: str, granted: EmulatorState
) -> None:
    """During a rotation the old key scores; after success only the new one does."""
    old_primary, _ = granted.current_endpoint_keys(SUB, RG, WS, KEY_EP)
    path = f"{ENDPOINTS_PATH}/{KEY_EP}/regenerateKeys"
    body = {"keyType": "Primary", "keyValue": None}
    async with http.post(path, params=API, json=body, headers=bearer(arm_token)) as resp:
        assert resp.status == 202
        url = resp.headers["Azure-AsyncOperation"]
    async with http.get(url, headers=bearer(arm_token)) as resp:
        assert await resp.json() == {"status": "InProgress"}
    assert (await _score(http, KEY_EP, old_primary))[0] == 200
    async with http.get(url, headers=bearer(arm_token)) as resp:
        assert await resp.json() == {"status": "Succeeded"}
    assert (await _score(http, KEY_EP, old_primary))[0] == 401
    new_primary, _ = granted.current_endpoint_keys(SUB, RG, WS, KEY_EP)
    assert (await _score(http, KEY_EP, new_primary))[0] == 200


async def test_aad_endpoint_takes_an_entra_token_for_ml(
    http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """An Entra token for https://ml.azure.com scores an AADToken endpoint until it expires."""
    token = await entra_token(http, ML)
    assert await _score(http, AAD_EP, token) == (200, {"accepted": True, "auth": "aad"})
    clock.advance(3600)
    assert (await _score(http, AAD_EP, token))[0] == 401


async def test_aad_endpoint_refuses_other_audiences_keys_and_aml_tokens(
    http: aiohttp.ClientSession, arm_token: str, granted: EmulatorState
) -> None:
    """Only the ml.azure.com audience opens an AADToken endpoint: not ARM's, not the trailing
    slash spelling, not a key, not an AMLToken, not a forged token."""
    slashed = await entra_token(http, ML + "/")
    primary, _ = granted.current_endpoint_keys(SUB, RG, WS, AAD_EP)
    aml = await _aml_token(http, arm_token)
    for credential in (arm_token, slashed, primary, aml, "a.b.c", None):
        assert (await _score(http, AAD_EP, credential))[0] == 401


async def test_unknown_endpoint_or_region_is_404(http: aiohttp.ClientSession) -> None:
    """A scoring URI naming no endpoint in that region answers 404."""
    assert await _score(http, "ep-missing", "x") == (404, {"error": "not_found"})
    async with http.post(_score_path(KEY_EP, "northeurope")) as resp:
        assert resp.status == 404


async def test_endpoint_scoring_counts_as_score(
    http: aiohttp.ClientSession, state: EmulatorState
) -> None:
    """Endpoint scoring is counted, and takes faults, as route `score` per endpoint."""
    state.fail("score", status=503, times=1, service=KEY_EP)
    key, _ = state.current_endpoint_keys(SUB, RG, WS, KEY_EP)
    assert [(await _score(http, KEY_EP, key))[0] for _ in range(2)] == [503, 200]
    assert (state.count("score"), state.count("score", service=KEY_EP)) == (2, 2)


async def test_region_outage_takes_endpoint_scoring_but_not_arm(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState
) -> None:
    """A dark region fails endpoint scoring, while the endpoint's ARM routes stay up."""
    key, _ = state.current_endpoint_keys(SUB, RG, WS, KEY_EP)
    state.region_down(REGION, kind="status", status=503)
    assert await _score(http, KEY_EP, key) == (503, {"error": "service_unavailable"})
    assert (await _status(http, "GET", f"{ENDPOINTS_PATH}/{KEY_EP}", arm_token))[0] == 200
    state.region_down(REGION)
    with pytest.raises(aiohttp.ClientOSError):
        await _score(http, KEY_EP, key)
    assert state.region_up(REGION)
    assert (await _score(http, KEY_EP, key))[0] == 200


@pytest.mark.parametrize(
    ("route", "method", "suffix", "healthy"),
    [
        ("arm.endpoint", "GET", "", 200),
        ("arm.endpoint_token", "POST", "/token", 400),
        ("arm.endpoint_keys", "POST", "/listKeys", 200),
        ("arm.endpoint_regenerate", "POST", "/regenerateKeys", 202),
    ],
)
async def test_faults_on_endpoint_routes_are_scoped_by_endpoint(
    http: aiohttp.ClientSession,
    arm_token: str,
    granted: EmulatorState,
    route: str,
    method: str,
    suffix: str,
    healthy: int,
) -> None:
    """A fault scoped to one endpoint fails that endpoint's calls only, in ARM's error shape."""
    granted.add_online_endpoint(SUB, RG, WS, OTHER_KEY_EP, auth_mode="Key")
    granted.fail(route, status=429, retry_after=3, service=KEY_EP.upper())
    status, body = await _status(http, method, f"{ENDPOINTS_PATH}/{KEY_EP}{suffix}", arm_token)
    assert (status, body["error"]["code"]) == (429, "TooManyRequests")
    other = await _status(http, method, f"{ENDPOINTS_PATH}/{OTHER_KEY_EP}{suffix}", arm_token)
    assert other[0] == healthy
    assert granted.count(route, service=KEY_EP) == 1
    assert granted.count(route, service=OTHER_KEY_EP) == 1


async def test_operation_faults_are_scoped_by_the_rotated_endpoint(
    http: aiohttp.ClientSession, arm_token: str, granted: EmulatorState
) -> None:
    """`arm.operation` faults match the endpoint whose key the operation rotates."""
    granted.add_online_endpoint(SUB, RG, WS, OTHER_KEY_EP, auth_mode="Key")
    urls = {}
    for name in (KEY_EP, OTHER_KEY_EP):
        path = f"{ENDPOINTS_PATH}/{name}/regenerateKeys"
        body = {"keyType": "Primary", "keyValue": None}
        async with http.post(path, params=API, json=body, headers=bearer(arm_token)) as resp:
            urls[name] = resp.headers["Location"]
    granted.fail("arm.operation", status=500, times=1, service=KEY_EP)
    async with http.get(urls[OTHER_KEY_EP], headers=bearer(arm_token)) as resp:
        assert resp.status == 200
    statuses = []
    for _ in range(2):
        async with http.get(urls[KEY_EP], headers=bearer(arm_token)) as resp:
            statuses.append((resp.status, await resp.json()))
    assert statuses[0][0] == 500
    assert statuses[1] == (200, {"status": "InProgress"})
    assert granted.count("arm.operation", service=KEY_EP) == 2


async def test_missing_fields_drops_the_token_essentials(
    http: aiohttp.ClientSession, arm_token: str, granted: EmulatorState
) -> None:
    """kind="missing_fields" on the endpoint token drops accessToken and expiryTimeUtc."""
    granted.fail("arm.endpoint_token", kind="missing_fields", times=1)
    status, body = await _status(http, "POST", f"{ENDPOINTS_PATH}/{TOKEN_EP}/token", arm_token)
    assert status == 200
    assert set(body) == {"tokenType", "refreshAfterTimeUtc"}


def test_new_routes_are_known_to_faults_and_the_command_line() -> None:
    """The endpoint routes can be armed in process, over JSON and on the command line."""
    for route in (
        "arm.endpoint",
        "arm.endpoint_token",
        "arm.endpoint_keys",
        "arm.endpoint_regenerate",
        "arm.operation",
    ):
        assert Fault(route).route == route
        assert Fault.from_json({"route": route, "service": "x"}).service == "x"
    fault = parse_fault("arm.endpoint_token=503@fraud-v2")
    assert (fault.route, fault.status, fault.service) == ("arm.endpoint_token", 503, "fraud-v2")


def test_demo_state_holds_the_three_endpoints() -> None:
    """The demo cloud has one endpoint per auth mode and lets its client fetch tokens and keys."""
    state = demo_state(token_lifetime_s=20.0, refresh_after_s=8.0)
    ws = state.workspace(seed.SUBSCRIPTION_ID, seed.RESOURCE_GROUP, seed.WORKSPACE)
    assert ws is not None
    modes = {
        name: endpoint.auth_mode
        for name in (seed.ENDPOINT_TOKEN, seed.ENDPOINT_KEY, seed.ENDPOINT_AAD)
        if (endpoint := state.online_endpoint(*ws.key, name)) is not None
    }
    assert modes == {"fraud-v2": "AMLToken", "churn-v2": "Key", "sentiment-v2": "AADToken"}
    token_ep = state.online_endpoint(*ws.key, seed.ENDPOINT_TOKEN)
    assert token_ep is not None
    assert (token_ep.token_lifetime_s, token_ep.refresh_after_s) == (20.0, 8.0)
    assert state.may_perform(seed.CLIENT_ID, ws, ENDPOINT_TOKEN_ACTION)
    assert state.may_perform(seed.CLIENT_ID, ws, ENDPOINT_LIST_KEYS_ACTION)
    assert not state.may_perform(seed.CLIENT_ID, ws, ENDPOINT_REGENERATE_ACTION)


@pytest.mark.parametrize(
    ("workspace", "kwargs", "match"),
    [
        ("nope", {}, "does not exist"),
        (WS, {"auth_mode": "Basic"}, "auth_mode"),
        (WS, {"token_lifetime_s": 0.0}, "positive"),
    ],
)
def test_add_online_endpoint_validates(
    state: EmulatorState, workspace: str, kwargs: dict[str, Any], match: str
) -> None:
    """Endpoints need an existing workspace, a known auth mode and a positive lifetime."""
    with pytest.raises(ValueError, match=match):
        state.add_online_endpoint(SUB, RG, workspace, "ep-new", **kwargs)


def test_endpoint_names_are_unique_per_region_and_keys_random(state: EmulatorState) -> None:
    """A second workspace of the region cannot reuse a name; every endpoint gets its own keys."""
    state.add_workspace(SUB, RG, "ws-other", region=REGION)
    with pytest.raises(ValueError, match="already exists"):
        state.add_online_endpoint(SUB, RG, "ws-other", KEY_EP)
    state.add_online_endpoint(SUB, RG, WS, "ep-key-3", auth_mode="key")
    keys = {*state.current_endpoint_keys(SUB, RG, WS, KEY_EP)}
    keys |= {*state.current_endpoint_keys(SUB, RG, WS, "ep-key-3")}
    assert len(keys) == 4
    with pytest.raises(KeyError):
        state.current_endpoint_keys(SUB, RG, WS, "ep-missing")
