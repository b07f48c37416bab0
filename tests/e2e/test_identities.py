"""Every credential kind signs in against the emulator's Entra ID through real MSAL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from broker.emulator import Emulator
from broker.emulator import seed as demo
from tests.conftest import config_text, self_signed
from tests.e2e.conftest import StartBroker

pytestmark = pytest.mark.timeout(30)

CERT_CLIENT = "22222222-2222-2222-2222-222222222222"
FED_CLIENT = "33333333-3333-3333-3333-333333333333"
ONLY_FRAUD = {"fraud": demo.TOKEN_SERVICE}


def register(emulator: Emulator, client_id: str, **credential: Any) -> None:
    emulator.state.add_client(demo.TENANT_ID, client_id, **credential)
    emulator.state.grant_role(client_id, demo.SUBSCRIPTION_ID, demo.RESOURCE_GROUP, demo.WORKSPACE)


def identity_block(client_id: str, credential_line: str) -> str:
    return f'tenant_id = "{demo.TENANT_ID}"\nclient_id = "{client_id}"\n{credential_line}\n'


async def token_via(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, client_id: str, line: str
) -> dict[str, Any]:
    text = config_text(emulator, short_dir, services=ONLY_FRAUD, identity=line)
    text = text.replace(f'client_id = "{demo.CLIENT_ID}"', f'client_id = "{client_id}"')
    broker = await start_broker(text)
    reply = await broker.client().get("/v1/token/fraud")
    detail = (await broker.client().get("/v1/services/fraud")).json()
    assert reply.status == 200, detail
    token: dict[str, Any] = reply.json()
    return token


async def test_certificate_pem(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path
) -> None:
    """A PEM file with key and certificate signs a client assertion that Entra accepts."""
    pair = self_signed()
    register(emulator, CERT_CLIENT, certificate_pem=pair.cert_pem)
    path = short_dir / "sp.pem"
    path.write_text(pair.key_pem + pair.cert_pem)
    path.chmod(0o600)
    body = await token_via(
        start_broker, emulator, short_dir, CERT_CLIENT, f'certificate_file = "{path}"'
    )
    assert body["auth"] == "token"


async def test_certificate_pfx_with_password(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path
) -> None:
    """A password-protected PFX signs in too."""
    pair = self_signed()
    register(emulator, CERT_CLIENT, certificate_pem=pair.cert_pem)
    pfx = pkcs12.serialize_key_and_certificates(
        b"sp", pair.key, pair.cert, None, serialization.BestAvailableEncryption(b"pfx-password")
    )
    path = short_dir / "sp.pfx"
    path.write_bytes(pfx)
    password = short_dir / "pfx-password"
    password.write_text("pfx-password\n")
    line = f'certificate_file = "{path}"\ncertificate_password_file = "{password}"'
    body = await token_via(start_broker, emulator, short_dir, CERT_CLIENT, line)
    assert body["auth"] == "token"


async def test_unregistered_certificate_is_refused(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path
) -> None:
    """A certificate Entra does not know yields AADSTS700027, not a crash."""
    other = self_signed()
    register(emulator, CERT_CLIENT, certificate_pem=self_signed().cert_pem)
    path = short_dir / "sp.pem"
    path.write_text(other.key_pem + other.cert_pem)
    text = config_text(
        emulator, short_dir, services=ONLY_FRAUD, identity=f'certificate_file = "{path}"'
    )
    broker = await start_broker(text.replace(demo.CLIENT_ID, CERT_CLIENT))
    await broker.settled()
    error = (await broker.client().get("/v1/services/fraud")).json()["last_error"]
    assert error["aad_code"] == "AADSTS700027"


async def test_federated_token_is_reread_on_every_sign_in(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path
) -> None:
    """The federated token file is read afresh for each sign-in, as Kubernetes rotates it."""
    subject = "system:serviceaccount:ml:scorer"
    register(emulator, FED_CLIENT, federated_subject=subject)
    path = short_dir / "azure-identity-token"
    path.write_text(emulator.state.mint_federated_token("system:serviceaccount:ml:someone-else"))
    text = config_text(
        emulator, short_dir, services=ONLY_FRAUD, identity=f'federated_token_file = "{path}"'
    )
    broker = await start_broker(text.replace(demo.CLIENT_ID, FED_CLIENT))
    await broker.settled()
    error = (await broker.client().get("/v1/services/fraud")).json()["last_error"]
    assert error["aad_code"] == "AADSTS70021"

    path.write_text(emulator.state.mint_federated_token(subject))
    emulator.state.clear_faults()
    await broker.daemon.store.fetch("fraud")
    assert (await broker.client().get("/v1/token/fraud")).status == 200
