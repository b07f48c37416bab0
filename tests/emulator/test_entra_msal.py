"""The emulated Entra ID driven by the real MSAL client, for every credential kind."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import msal
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from broker.emulator import Emulator, EmulatorState
from tests.emulator.conftest import CLIENT, SECRET, TENANT, FakeClock, make_certificate

pytestmark = pytest.mark.timeout(20)

CERT_CLIENT = "44444444-4444-4444-4444-444444444444"
FED_CLIENT = "55555555-5555-5555-5555-555555555555"
FED_SUBJECT = "system:serviceaccount:ml:token-broker"


@pytest.fixture
def session(emu: Emulator) -> Iterator[requests.Session]:
    http = requests.Session()
    http.verify = str(emu.ca_path)
    http.trust_env = False  # REQUESTS_CA_BUNDLE would otherwise override `verify`
    yield http
    http.close()


MakeApp = Callable[[str, Any], Awaitable[msal.ConfidentialClientApplication]]


@pytest.fixture
def make_app(emu: Emulator, session: requests.Session) -> MakeApp:
    """Build an MSAL app off the loop: its constructor already fetches OpenID metadata."""

    async def make(client_id: str, credential: Any) -> msal.ConfidentialClientApplication:
        return await asyncio.to_thread(
            msal.ConfidentialClientApplication,
            client_id,
            client_credential=credential,
            authority=f"{emu.authority_host}/{TENANT}",
            instance_discovery=False,
            http_client=session,
        )

    return make


async def _acquire(app: msal.ConfidentialClientApplication, emu: Emulator) -> dict[str, Any]:
    scopes = [f"{emu.resource_manager}/.default"]
    result: dict[str, Any] = await asyncio.to_thread(app.acquire_token_for_client, scopes)
    return result


async def test_secret_grants_a_token_and_msal_caches_it(
    make_app: MakeApp,
    emu: Emulator,
    state: EmulatorState,
) -> None:
    """MSAL signs in with the right secret once, then answers from its own cache."""
    app = await make_app(CLIENT, SECRET)
    first = await _acquire(app, emu)
    second = await _acquire(app, emu)
    assert first["token_type"] == "Bearer"
    assert second["access_token"] == first["access_token"]
    assert state.count("entra.token") == 1
    assert state.count("entra.openid") == 1


async def test_wrong_secret_reaches_msal_as_aadsts7000215(make_app: MakeApp, emu: Emulator) -> None:
    """MSAL reports a wrong secret as invalid_client with Entra's AADSTS text."""
    result = await _acquire(await make_app(CLIENT, "not-the-secret"), emu)
    assert result["error"] == "invalid_client"
    assert result["error_description"].startswith("AADSTS7000215: Invalid client secret provided.")
    assert result["error_codes"] == [7000215]


@pytest.mark.parametrize("style", ["public_certificate", "thumbprint"])
async def test_certificate_assertion_grants_a_token(
    make_app: MakeApp,
    emu: Emulator,
    state: EmulatorState,
    certificate: tuple[str, str],
    style: str,
) -> None:
    """MSAL's PS256 (x5t#S256, x5c) and RS256 (SHA-1 x5t) assertions are both accepted."""
    cert_pem, key_pem = certificate
    state.add_client(TENANT, CERT_CLIENT, certificate_pem=cert_pem)
    credential: dict[str, str] = {"private_key": key_pem}
    if style == "thumbprint":
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        credential["thumbprint"] = cert.fingerprint(hashes.SHA1()).hex()  # noqa: S303
    else:
        credential["public_certificate"] = cert_pem
    result = await _acquire(await make_app(CERT_CLIENT, credential), emu)
    assert "access_token" in result, result


async def test_assertion_from_an_unregistered_certificate_is_refused(
    make_app: MakeApp,
    emu: Emulator,
    state: EmulatorState,
    certificate: tuple[str, str],
) -> None:
    """An assertion signed with another certificate's key fails with AADSTS700027."""
    state.add_client(TENANT, CERT_CLIENT, certificate_pem=certificate[0])
    other_cert, other_key = make_certificate()
    credential = {"private_key": other_key, "public_certificate": other_cert}
    result = await _acquire(await make_app(CERT_CLIENT, credential), emu)
    assert result["error"] == "invalid_client"
    assert result["error_description"].startswith("AADSTS700027: ")


async def test_federated_assertion_is_read_fresh_and_accepted(
    make_app: MakeApp,
    emu: Emulator,
    state: EmulatorState,
) -> None:
    """A workload-identity token with the registered subject signs the client in."""
    state.add_client(TENANT, FED_CLIENT, federated_subject=FED_SUBJECT)
    reads: list[str] = []

    def read_token() -> str:
        reads.append(state.mint_federated_token(FED_SUBJECT))
        return reads[-1]

    result = await _acquire(await make_app(FED_CLIENT, {"client_assertion": read_token}), emu)
    assert "access_token" in result, result
    assert len(reads) == 1


async def test_federated_assertion_with_another_subject_is_refused(
    make_app: MakeApp,
    emu: Emulator,
    state: EmulatorState,
) -> None:
    """A federated token for a different service account answers AADSTS70021."""
    state.add_client(TENANT, FED_CLIENT, federated_subject=FED_SUBJECT)
    token = state.mint_federated_token("system:serviceaccount:ml:someone-else")
    result = await _acquire(await make_app(FED_CLIENT, {"client_assertion": lambda: token}), emu)
    assert result["error"] == "invalid_request"
    assert result["error_description"].startswith("AADSTS70021: No matching federated identity")


async def test_expired_federated_assertion_is_refused(
    make_app: MakeApp,
    emu: Emulator,
    state: EmulatorState,
    clock: FakeClock,
) -> None:
    """A federated token past its exp by the emulator's clock answers AADSTS700024."""
    state.add_client(TENANT, FED_CLIENT, federated_subject=FED_SUBJECT)
    token = state.mint_federated_token(FED_SUBJECT, lifetime_s=60)
    clock.advance(61)
    result = await _acquire(await make_app(FED_CLIENT, {"client_assertion": lambda: token}), emu)
    assert result["error_description"].startswith("AADSTS700024: ")


async def test_federated_assertion_for_a_client_without_federation_is_refused(
    make_app: MakeApp,
    emu: Emulator,
    state: EmulatorState,
) -> None:
    """A client with only a secret has no federated record to match."""
    token = state.mint_federated_token(FED_SUBJECT)
    result = await _acquire(await make_app(CLIENT, {"client_assertion": lambda: token}), emu)
    assert result["error_description"].startswith("AADSTS70021: ")
