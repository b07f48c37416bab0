"""The emulated MMS v1 web-service API: describe, token, keys, rotation, and refusals."""

from __future__ import annotations

from typing import Any

import aiohttp
import jwt
import pytest

from broker.emulator import Emulator, EmulatorState
from tests.emulator.conftest import (
    ACI,
    AKS,
    CLIENT,
    MMS_PATH,
    REGION,
    RG,
    SUB,
    WS,
    FakeClock,
    bearer,
)

pytestmark = pytest.mark.timeout(15)


async def _call(
    http: aiohttp.ClientSession, method: str, path: str, token: str, **kwargs: Any
) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with http.request(method, path, headers=bearer(token), **kwargs) as resp:
        body = await resp.json() if resp.content_length != 0 else None
        return resp.status, body, resp


async def test_describe_reports_auth_modes_and_scoring_uri(
    http: aiohttp.ClientSession, emu: Emulator, arm_token: str
) -> None:
    """Describe tells the compute type, both auth switches and the scoring URI."""
    status, body, _ = await _call(http, "GET", f"{MMS_PATH}/services/{AKS}", arm_token)
    assert status == 200
    assert body["name"] == AKS
    assert body["computeType"] == "AKS"
    assert body["state"] == "Healthy"
    assert (body["authEnabled"], body["aadAuthEnabled"]) == (False, True)
    assert (
        body["scoringUri"]
        == f"{emu.base_url}/regions/{REGION}/workspaces/{WS}/api/v1/service/{AKS}/score"
    )
    assert body["id"]


async def test_token_has_refresh_and_expiry_times(
    http: aiohttp.ClientSession, arm_token: str, clock: FakeClock
) -> None:
    """An AKS token carries refreshAfter = iat + 30 s and expiryOn = iat + 60 s."""
    status, body, _ = await _call(http, "POST", f"{MMS_PATH}/services/{AKS}/token", arm_token)
    assert status == 200
    assert body["tokenType"] == "Bearer"
    assert body["refreshAfter"] == clock.now + 30
    assert body["expiryOn"] == clock.now + 60
    claims = jwt.decode(body["accessToken"], options={"verify_signature": False})
    assert claims["exp"] == clock.now + 60
    assert claims["aud"]


async def test_each_token_is_new(http: aiohttp.ClientSession, arm_token: str) -> None:
    """Two token calls in the same second still return different tokens."""
    path = f"{MMS_PATH}/services/{AKS}/token"
    first = (await _call(http, "POST", path, arm_token))[1]["accessToken"]
    second = (await _call(http, "POST", path, arm_token))[1]["accessToken"]
    assert first != second


async def test_default_refresh_after_is_half_the_lifetime(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState, clock: FakeClock
) -> None:
    """Without refresh_after_s, refreshAfter falls at half the token's life."""
    state.add_web_service(SUB, RG, WS, "svc-half", token_lifetime_s=10.0)
    _, body, _ = await _call(http, "POST", f"{MMS_PATH}/services/svc-half/token", arm_token)
    assert body["refreshAfter"] == clock.now + 5


@pytest.mark.parametrize(
    ("name", "compute", "aad"), [("svc-aci-aad", "ACI", True), ("svc-aks-keys", "AKS", False)]
)
async def test_token_only_for_aks_with_token_auth(
    http: aiohttp.ClientSession,
    arm_token: str,
    state: EmulatorState,
    name: str,
    compute: str,
    aad: bool,
) -> None:
    """ACI, or AKS without aadAuthEnabled, gets an MMS-shaped 400 instead of a token."""
    state.add_web_service(
        SUB, RG, WS, name, compute_type=compute, aad_auth_enabled=aad, auth_enabled=not aad
    )
    status, body, _ = await _call(http, "POST", f"{MMS_PATH}/services/{name}/token", arm_token)
    assert status == 400
    assert (body["code"], body["statusCode"]) == ("BadRequest", 400)
    assert body["message"]


async def test_listkeys_only_with_key_auth(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState
) -> None:
    """Keys are listed for a key-auth service and refused for a token-only one."""
    status, body, _ = await _call(http, "POST", f"{MMS_PATH}/services/{ACI}/listkeys", arm_token)
    assert status == 200
    assert (body["primaryKey"], body["secondaryKey"]) == state.current_keys(SUB, RG, WS, ACI)
    status, body, _ = await _call(http, "POST", f"{MMS_PATH}/services/{AKS}/listkeys", arm_token)
    assert (status, body["code"]) == (400, "BadRequest")


async def test_regenerate_keys_replaces_the_key_only_when_the_operation_succeeds(
    http: aiohttp.ClientSession, emu: Emulator, arm_token: str, state: EmulatorState
) -> None:
    """The old primary stays current while the operation runs; Succeeded brings the new one."""
    old_primary, old_secondary = state.current_keys(SUB, RG, WS, ACI)
    status, _, resp = await _call(
        http,
        "POST",
        f"{MMS_PATH}/services/{ACI}/regenerateKeys",
        arm_token,
        json={"keyType": "Primary", "keyValue": None},
    )
    assert status == 202
    location = resp.headers["Operation-Location"]
    assert location.startswith(f"{emu.base_url}{MMS_PATH}/operations/")
    operation_id = location.rsplit("/", 1)[1]

    _, running, _ = await _call(http, "GET", location, arm_token)
    assert running == {**running, "id": operation_id, "state": "Running"}
    assert state.current_keys(SUB, RG, WS, ACI) == (old_primary, old_secondary)

    _, done, _ = await _call(http, "GET", location, arm_token)
    assert done["state"] == "Succeeded"
    new_primary, secondary = state.current_keys(SUB, RG, WS, ACI)
    assert new_primary != old_primary
    assert secondary == old_secondary


async def test_regenerate_keys_with_a_chosen_value(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState
) -> None:
    """A keyValue in the body becomes the new secondary key on success."""
    _, _, resp = await _call(
        http,
        "POST",
        f"{MMS_PATH}/services/{ACI}/regenerateKeys",
        arm_token,
        json={"keyType": "Secondary", "keyValue": "chosen-key"},
    )
    location = resp.headers["Operation-Location"]
    for _ in range(2):
        await _call(http, "GET", location, arm_token)
    assert state.current_keys(SUB, RG, WS, ACI)[1] == "chosen-key"


@pytest.mark.parametrize(
    "body", [{"keyType": "Tertiary"}, {}, {"keyType": "Primary", "keyValue": 7}]
)
async def test_regenerate_keys_rejects_a_bad_body(
    http: aiohttp.ClientSession, arm_token: str, body: dict[str, Any]
) -> None:
    """A keyType other than Primary or Secondary, or a non-string keyValue, is a 400."""
    path = f"{MMS_PATH}/services/{ACI}/regenerateKeys"
    status, answer, _ = await _call(http, "POST", path, arm_token, json=body)
    assert (status, answer["code"]) == (400, "BadRequest")


async def test_unknown_operation_is_404(http: aiohttp.ClientSession, arm_token: str) -> None:
    """Polling an operation that was never started answers NotFound."""
    status, body, _ = await _call(http, "GET", f"{MMS_PATH}/operations/nope", arm_token)
    assert (status, body["code"]) == (404, "NotFound")


async def test_mms_without_a_token_is_401(http: aiohttp.ClientSession) -> None:
    """MMS refuses a call without a valid Entra token, in its own error shape."""
    async with http.get(f"{MMS_PATH}/services/{AKS}") as resp:
        assert resp.status == 401
        body = await resp.json()
    assert (body["code"], body["statusCode"]) == ("Unauthorized", 401)


async def test_mms_without_reader_is_403(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState
) -> None:
    """Without Reader on the workspace, MMS answers Forbidden naming the client."""
    state.revoke_role(CLIENT, SUB, RG, WS)
    status, body, _ = await _call(http, "POST", f"{MMS_PATH}/services/{AKS}/token", arm_token)
    assert (status, body["code"], body["statusCode"]) == (403, "Forbidden", 403)
    assert body["message"].startswith(f"The client '{CLIENT}' does not have authorization")
    assert f"on workspace '{WS}'" in body["message"]


@pytest.mark.parametrize(
    "path",
    [
        f"{MMS_PATH}/services/missing",
        MMS_PATH.replace(f"/regions/{REGION}/", "/regions/eastus/") + f"/services/{AKS}",
        MMS_PATH.replace(WS, "ws-missing") + f"/services/{AKS}",
    ],
    ids=["service", "region", "workspace"],
)
async def test_unknown_service_region_or_workspace_is_404(
    http: aiohttp.ClientSession, arm_token: str, path: str
) -> None:
    """An unknown service, a wrong region or an unknown workspace answers NotFound."""
    status, body, _ = await _call(http, "GET", path, arm_token)
    assert (status, body["code"]) == (404, "NotFound")


async def test_set_token_lifetime_changes_later_tokens(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState, clock: FakeClock
) -> None:
    """set_token_lifetime shortens the next tokens of the named service."""
    state.set_token_lifetime(4.0, service=AKS)
    _, body, _ = await _call(http, "POST", f"{MMS_PATH}/services/{AKS}/token", arm_token)
    assert (body["refreshAfter"], body["expiryOn"]) == (clock.now + 2, clock.now + 4)


async def test_token_times_are_whole_seconds(
    http: aiohttp.ClientSession, arm_token: str, clock: FakeClock
) -> None:
    """With a fractional clock, refreshAfter and expiryOn are still whole epoch seconds."""
    clock.advance(0.75)
    _, body, _ = await _call(http, "POST", f"{MMS_PATH}/services/{AKS}/token", arm_token)
    assert body["expiryOn"] == int(clock.now) + 60
    assert body["refreshAfter"] == int(clock.now) + 30
    assert all(isinstance(body[k], int) for k in ("expiryOn", "refreshAfter"))
