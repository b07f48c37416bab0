"""Fixtures for the emulator's own tests: a movable clock, a populated emulator served on
a real HTTPS socket, and an aiohttp client that trusts only the emulator's CA."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.emulator import Emulator, EmulatorState
from tests.conftest import self_signed

TENANT = "00000000-0000-0000-0000-00000000cafe"
CLIENT = "22222222-2222-2222-2222-222222222222"
SECRET = "test-secret-value"
SUB = "00000000-0000-0000-0000-000000000042"
RG = "rg-test"
WS = "ws-test"
REGION = "westeurope"
AKS = "svc-aks"
ACI = "svc-aci"
TOKEN_EP = "ep-token"
KEY_EP = "ep-key"
AAD_EP = "ep-aad"
MMS_PATH = (
    f"/regions/{REGION}/modelmanagement/v1.0/subscriptions/{SUB}/resourceGroups/{RG}"
    f"/providers/Microsoft.MachineLearningServices/workspaces/{WS}"
)
WS_PATH = (
    f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/"
    f"Microsoft.MachineLearningServices/workspaces/{WS}"
)
SCORE_PATH = f"/regions/{REGION}/workspaces/{WS}/api/v1/service/{AKS}/score"
ENDPOINTS_PATH = f"{WS_PATH}/onlineEndpoints"


class FakeClock:
    """A clock that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def state(clock: FakeClock) -> EmulatorState:
    state = EmulatorState(clock=clock)
    state.add_client(TENANT, CLIENT, secret=SECRET)
    state.add_workspace(SUB, RG, WS, region=REGION)
    state.grant_role(CLIENT, SUB, RG, WS)
    state.add_web_service(SUB, RG, WS, AKS, token_lifetime_s=60.0, refresh_after_s=30.0)
    state.add_web_service(
        SUB, RG, WS, ACI, compute_type="ACI", auth_enabled=True, aad_auth_enabled=False
    )
    state.add_online_endpoint(
        SUB, RG, WS, TOKEN_EP, auth_mode="AMLToken", token_lifetime_s=60.0, refresh_after_s=30.0
    )
    state.add_online_endpoint(SUB, RG, WS, KEY_EP, auth_mode="Key")
    state.add_online_endpoint(SUB, RG, WS, AAD_EP, auth_mode="AADToken")
    return state


@pytest.fixture
async def emu(state: EmulatorState, tmp_path: Path) -> AsyncIterator[Emulator]:
    async with Emulator(state=state, ca_dir=tmp_path / "ca") as emulator:
        yield emulator


@pytest.fixture
async def http(emu: Emulator) -> AsyncIterator[aiohttp.ClientSession]:
    context = ssl.create_default_context(cafile=str(emu.ca_path))
    connector = aiohttp.TCPConnector(ssl=context)
    async with aiohttp.ClientSession(base_url=emu.base_url, connector=connector) as session:
        yield session


@pytest.fixture
async def arm_token(http: aiohttp.ClientSession, emu: Emulator) -> str:
    return await entra_token(http, emu.resource_manager)


async def entra_token(
    http: aiohttp.ClientSession,
    resource: str,
    *,
    tenant: str = TENANT,
    client_id: str = CLIENT,
    secret: str = SECRET,
) -> str:
    """An access token for `resource`, by the client-credentials grant with a secret."""
    form = {
        "grant_type": "client_credentials",
        "client_id": client_id,
        "client_secret": secret,
        "scope": f"{resource}/.default",
    }
    async with http.post(f"/{tenant}/oauth2/v2.0/token", data=form) as resp:
        body: dict[str, Any] = await resp.json()
        assert resp.status == 200, body
        return str(body["access_token"])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def arrival(state: EmulatorState, route: str) -> asyncio.Event:
    """An event set once the emulator has counted a request of `route`: a way to know a
    hung request has reached the server without sleeping."""
    event = asyncio.Event()
    state.listen(lambda what, called: event.set() if (what, called) == ("called", route) else None)
    return event


@pytest.fixture(scope="session")
def certificate() -> tuple[str, str]:
    """A self-signed certificate and its private key (PEM), for client assertions."""
    return make_certificate()


def make_certificate() -> tuple[str, str]:
    """A self-signed certificate and its private key, both PEM."""
    pair = self_signed()
    return pair.cert_pem, pair.key_pem
