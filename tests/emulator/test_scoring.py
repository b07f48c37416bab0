"""The emulated scoring endpoint accepts only a currently valid token or key."""

from __future__ import annotations

import aiohttp
import pytest

from broker.emulator import EmulatorState
from tests.emulator.conftest import ACI, AKS, MMS_PATH, REGION, RG, SUB, WS, FakeClock, bearer

pytestmark = pytest.mark.timeout(15)

SCORE = f"/regions/{REGION}/workspaces/{WS}/api/v1/service"


async def _service_token(http: aiohttp.ClientSession, arm_token: str, name: str = AKS) -> str:
    async with http.post(f"{MMS_PATH}/services/{name}/token", headers=bearer(arm_token)) as resp:
        return str((await resp.json())["accessToken"])


async def _score(
    http: aiohttp.ClientSession, name: str, credential: str | None
) -> tuple[int, object]:
    headers = bearer(credential) if credential is not None else {}
    async with http.post(f"{SCORE}/{name}/score", json={"data": [1]}, headers=headers) as resp:
        return resp.status, await resp.json()


async def test_valid_token_is_accepted(http: aiohttp.ClientSession, arm_token: str) -> None:
    """A token MMS just issued for the service scores."""
    token = await _service_token(http, arm_token)
    assert await _score(http, AKS, token) == (200, {"accepted": True, "auth": "token"})


async def test_expired_token_is_rejected(
    http: aiohttp.ClientSession, arm_token: str, clock: FakeClock
) -> None:
    """Once the emulator's clock passes expiryOn, the same token is refused."""
    token = await _service_token(http, arm_token)
    clock.advance(59)
    assert (await _score(http, AKS, token))[0] == 200
    clock.advance(1)
    assert await _score(http, AKS, token) == (401, {"error": "unauthorized"})


async def test_token_of_another_service_is_rejected(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState
) -> None:
    """A token is only good for the service it was issued for."""
    state.add_web_service(SUB, RG, WS, "svc-other")
    token = await _service_token(http, arm_token, "svc-other")
    assert (await _score(http, AKS, token))[0] == 401


async def test_entra_token_and_garbage_are_rejected(
    http: aiohttp.ClientSession, arm_token: str
) -> None:
    """Neither the Entra token, nor anything else, nor nothing is a scoring credential."""
    for credential in (arm_token, "garbage", None):
        assert (await _score(http, AKS, credential))[0] == 401


async def test_both_current_keys_are_accepted(
    http: aiohttp.ClientSession, state: EmulatorState
) -> None:
    """Primary and secondary keys both score a key-auth service."""
    for key in state.current_keys(SUB, RG, WS, ACI):
        assert await _score(http, ACI, key) == (200, {"accepted": True, "auth": "key"})


async def test_keys_do_not_open_a_token_only_service(
    http: aiohttp.ClientSession, state: EmulatorState
) -> None:
    """A token-auth service has keys, but with key auth off they are refused."""
    primary, _ = state.current_keys(SUB, RG, WS, AKS)
    assert (await _score(http, AKS, primary))[0] == 401


async def test_old_key_is_rejected_after_rotation(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState
) -> None:
    """After a rotation succeeds, the replaced key no longer scores and the new one does."""
    old_primary, _ = state.current_keys(SUB, RG, WS, ACI)
    path = f"{MMS_PATH}/services/{ACI}/regenerateKeys"
    async with http.post(path, json={"keyType": "Primary"}, headers=bearer(arm_token)) as resp:
        location = resp.headers["Operation-Location"]
    async with http.get(location, headers=bearer(arm_token)):
        pass
    assert (await _score(http, ACI, old_primary))[0] == 200
    async with http.get(location, headers=bearer(arm_token)):
        pass
    assert (await _score(http, ACI, old_primary))[0] == 401
    assert (await _score(http, ACI, state.current_keys(SUB, RG, WS, ACI)[0]))[0] == 200


async def test_unknown_scoring_target_is_404(http: aiohttp.ClientSession) -> None:
    """A scoring URI naming no deployed service answers 404."""
    assert (await _score(http, "missing", "x"))[0] == 404
