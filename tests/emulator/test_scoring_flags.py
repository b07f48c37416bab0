"""The scoring endpoints' test flags (report, echo, hop) and an endpoint's other paths."""

from __future__ import annotations

import hashlib
import io
import os

import aiohttp
import pytest

from broker.emulator import EmulatorState
from tests.emulator.conftest import ACI, KEY_EP, REGION, RG, SCORE_PATH, SUB, WS, bearer

pytestmark = pytest.mark.timeout(15)

ACI_SCORE = f"/regions/{REGION}/workspaces/{WS}/api/v1/service/{ACI}/score"
ENDPOINT = f"/regions/{REGION}/endpoints/{KEY_EP}"


def aci_key(state: EmulatorState) -> dict[str, str]:
    return bearer(state.current_keys(SUB, RG, WS, ACI)[0])


async def test_report_gives_size_digest_and_header_names(
    http: aiohttp.ClientSession, state: EmulatorState
) -> None:
    """`?report=true` adds the body's length and SHA-256 and the header names, no values."""
    payload = os.urandom(3 << 20)
    async with http.post(
        ACI_SCORE + "?report=true", data=io.BytesIO(payload), headers=aci_key(state)
    ) as resp:
        body = await resp.json()
    assert body["bytes"] == len(payload)
    assert body["sha256"] == hashlib.sha256(payload).hexdigest()
    assert "authorization" in body["headers"]
    assert all(key not in str(body) for key in state.current_keys(SUB, RG, WS, ACI))


async def test_echo_streams_the_body_back(
    http: aiohttp.ClientSession, state: EmulatorState
) -> None:
    """`?echo=true` answers the body itself, with its content type."""
    payload = os.urandom(2 << 20)
    headers = {**aci_key(state), "Content-Type": "application/x-test"}
    async with http.post(ACI_SCORE + "?echo=true", data=io.BytesIO(payload), headers=headers) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "application/x-test"
        assert await r.read() == payload


async def test_echo_still_needs_a_credential(http: aiohttp.ClientSession) -> None:
    """Without a credential the flags change nothing: 401."""
    async with http.post(SCORE_PATH + "?echo=true", data=b"x") as resp:
        assert resp.status == 401


async def test_hop_adds_hop_by_hop_headers(
    http: aiohttp.ClientSession, state: EmulatorState
) -> None:
    """`?hop=true` answers with a Connection-named header, Keep-Alive and one to keep."""
    async with http.post(ACI_SCORE + "?hop=true", data=b"{}", headers=aci_key(state)) as resp:
        assert resp.headers["Connection"] == "X-Emulator-Hop"
        assert "X-Emulator-Hop" in resp.headers and "Keep-Alive" in resp.headers
        assert "X-Emulator-Kept" in resp.headers


async def test_endpoint_directory_paths(http: aiohttp.ClientSession, state: EmulatorState) -> None:
    """Other paths under an endpoint answer with its credential: swagger.json, or an echo of
    the path, method and query; they are not counted as scoring calls."""
    key = bearer(state.current_endpoint_keys(SUB, RG, WS, KEY_EP)[0])
    async with http.get(ENDPOINT + "/swagger.json", headers=key) as resp:
        assert (await resp.json())["swagger"] == "2.0"
    async with http.delete(ENDPOINT + "/a/b?c=d", headers=key) as resp:
        assert await resp.json() == {
            "path": "a/b",
            "method": "DELETE",
            "query": {"c": "d"},
            "auth": "key",
        }
    async with http.get(ENDPOINT + "/swagger.json") as resp:
        assert resp.status == 401
    assert state.count("score") == 0
