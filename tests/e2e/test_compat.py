"""Unmodified Azure SDK clients (azure-identity) get the principal's tokens from the broker."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import jwt
import pytest
from azure.core.exceptions import ClientAuthenticationError
from azure.identity import DefaultAzureCredential, ManagedIdentityCredential
from azure.identity.aio import ManagedIdentityCredential as AsyncManagedIdentityCredential

from broker.config import load_config
from broker.emulator import Emulator
from broker.emulator import seed as demo
from tests.conftest import config_text
from tests.e2e.conftest import Broker, StartBroker

pytestmark = pytest.mark.timeout(30)

IDENTITY_SECRET = "identity-header-0123456789abcdef"
ML = "https://ml.azure.com/.default"
SDK_ENV = (
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
    "MSI_ENDPOINT",
    "MSI_SECRET",
    "IDENTITY_SERVER_THUMBPRINT",
    "IMDS_ENDPOINT",
    "AZURE_POD_IDENTITY_AUTHORITY_HOST",
    "AZURE_CLIENT_ID",
    "AZURE_TENANT_ID",
    "AZURE_CLIENT_SECRET",
    "AZURE_FEDERATED_TOKEN_FILE",
)


@pytest.fixture
def sdk_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """An environment holding no managed-identity settings but the ones a test sets."""
    for name in SDK_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


async def compat_broker(start_broker: StartBroker, emulator: Emulator, short_dir: Path) -> Broker:
    header = short_dir / "identity-header"
    header.write_text(IDENTITY_SECRET + "\n")
    header.chmod(0o600)
    text = config_text(emulator, short_dir, services={"fraud": demo.TOKEN_SERVICE})
    text += (
        f'\n[compat]\nimds = true\napp_service_header_file = "{header}"\n'
        'resources = ["https://ml.azure.com", "https://management.azure.com/"]\n'
    )
    return await start_broker(text)


def base(broker: Broker) -> str:
    assert broker.daemon.tcp_address is not None
    host, port = broker.daemon.tcp_address
    return f"http://{host}:{port}"


def assert_ml_token(token: str) -> None:
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["aud"] == "https://ml.azure.com" and claims["appid"] == demo.CLIENT_ID


async def test_app_service_protocol_sync_and_async(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, sdk_env: pytest.MonkeyPatch
) -> None:
    """ManagedIdentityCredential, sync and aio, through IDENTITY_ENDPOINT/IDENTITY_HEADER."""
    broker = await compat_broker(start_broker, emulator, short_dir)
    sdk_env.setenv("IDENTITY_ENDPOINT", base(broker) + "/msi/token")
    sdk_env.setenv("IDENTITY_HEADER", IDENTITY_SECRET)
    sync = await asyncio.to_thread(ManagedIdentityCredential().get_token, ML)
    assert_ml_token(sync.token)
    assert sync.expires_on > time.time() + 60
    async with AsyncManagedIdentityCredential() as credential:
        aio = await credential.get_token(ML)
    assert_ml_token(aio.token)
    assert aio.expires_on > time.time() + 60


async def test_imds_protocol_sync_and_async(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, sdk_env: pytest.MonkeyPatch
) -> None:
    """ManagedIdentityCredential, sync and aio, through AZURE_POD_IDENTITY_AUTHORITY_HOST."""
    broker = await compat_broker(start_broker, emulator, short_dir)
    sdk_env.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", base(broker))
    sync = await asyncio.to_thread(ManagedIdentityCredential().get_token, ML)
    assert_ml_token(sync.token)
    async with AsyncManagedIdentityCredential() as credential:
        assert_ml_token((await credential.get_token(ML)).token)


async def test_default_azure_credential(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, sdk_env: pytest.MonkeyPatch
) -> None:
    """DefaultAzureCredential finds the broker as its managed identity."""
    broker = await compat_broker(start_broker, emulator, short_dir)
    sdk_env.setenv("IDENTITY_ENDPOINT", base(broker) + "/msi/token")
    sdk_env.setenv("IDENTITY_HEADER", IDENTITY_SECRET)
    credential = DefaultAzureCredential(
        exclude_environment_credential=True,
        exclude_workload_identity_credential=True,
        exclude_shared_token_cache_credential=True,
        exclude_cli_credential=True,
        exclude_powershell_credential=True,
        exclude_developer_cli_credential=True,
        exclude_visual_studio_code_credential=True,
        exclude_interactive_browser_credential=True,
    )
    token = await asyncio.to_thread(credential.get_token, ML)
    assert_ml_token(token.token)


async def test_resources_off_the_allowlist_and_wrong_headers_are_refused(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, sdk_env: pytest.MonkeyPatch
) -> None:
    """A resource not listed, or a wrong identity header, gets no token."""
    broker = await compat_broker(start_broker, emulator, short_dir)
    client = broker.client("tcp")
    vault = await client.get(
        "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net"
    )
    assert vault.status == 403 and vault.json()["error"] == "invalid_resource"
    wrong = await client.get(
        "/msi/token?api-version=2019-08-01&resource=https://ml.azure.com",
        headers={"X-IDENTITY-HEADER": "guess"},
    )
    assert wrong.status == 403
    no_metadata = await client.get(
        "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://ml.azure.com",
        headers={"Metadata": ""},
    )
    assert no_metadata.status == 400
    sdk_env.setenv("IDENTITY_ENDPOINT", base(broker) + "/msi/token")
    sdk_env.setenv("IDENTITY_HEADER", IDENTITY_SECRET)
    with pytest.raises(ClientAuthenticationError):
        await asyncio.to_thread(
            ManagedIdentityCredential().get_token, "https://vault.azure.net/.default"
        )


async def test_routes_are_absent_unless_configured(start_broker: StartBroker) -> None:
    """Without [compat], the compatible routes answer 404."""
    broker = await start_broker()
    client = broker.client("tcp")
    reply = await client.get("/metadata/identity/oauth2/token?api-version=2018-02-01&resource=x")
    assert reply.status == 404
    assert (await client.get("/msi/token?api-version=2019-08-01&resource=x")).status == 404


async def test_compat_changes_apply_on_reload(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path
) -> None:
    """A reload applies [compat] at once: a new identity header, a narrower allowlist, and
    the routes gone when the table is removed — no restart."""
    broker = await compat_broker(start_broker, emulator, short_dir)
    client = broker.client("tcp")
    app_service = "/msi/token?api-version=2019-08-01&resource=https://ml.azure.com"
    imds = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource="
    old = {"X-IDENTITY-HEADER": IDENTITY_SECRET}
    assert (await client.get(app_service, headers=old)).status == 200
    assert (await client.get(imds + "https://management.azure.com")).status == 200

    rotated = "identity-header-rotated-0123456789"
    (short_dir / "identity-header").write_text(rotated + "\n")
    config = short_dir / "broker.toml"
    config.write_text(config.read_text().replace(', "https://management.azure.com/"', ""))
    await broker.daemon.reload(load_config(config))
    assert (await client.get(app_service, headers=old)).status == 403
    assert (await client.get(app_service, headers={"X-IDENTITY-HEADER": rotated})).status == 200
    narrowed = await client.get(imds + "https://management.azure.com")
    assert narrowed.status == 403 and narrowed.json()["error"] == "invalid_resource"

    config.write_text(config.read_text().split("\n[compat]")[0] + "\n")
    await broker.daemon.reload(load_config(config))
    assert (await client.get(imds + "https://ml.azure.com")).status == 404
    assert (await client.get(app_service, headers={"X-IDENTITY-HEADER": rotated})).status == 404


async def test_lifetimes_are_counted_on_the_brokers_clock(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path
) -> None:
    """`expires_in` and `not_before` come from the broker's clock, as the expiry does: with
    that clock an hour ahead, a fresh token still has its whole lifetime left."""
    broker = await compat_broker(start_broker, emulator, short_dir)
    broker.clock.advance(3600)
    reply = await broker.client("tcp").get(
        "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://ml.azure.com"
    )
    body = reply.json()
    lifetime = emulator.state.entra_token_lifetime_s
    assert lifetime - 60 <= int(body["expires_in"]) <= lifetime
    assert int(body["expires_on"]) - int(body["not_before"]) == int(body["expires_in"])
    assert abs(int(body["not_before"]) - broker.clock()) < 60


@pytest.mark.parametrize("kind", ["expired", "not_yet_valid"])
async def test_an_unusable_entra_answer_keeps_the_last_token_served(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, kind: str
) -> None:
    """While Entra answers tokens that cannot be used, the compatible route keeps serving
    the last good token for the resource; good answers bring a new one."""
    emulator.state.entra_token_lifetime_s = 60  # short enough for every request to ask Entra
    broker = await compat_broker(start_broker, emulator, short_dir)
    client = broker.client("tcp")
    path = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://ml.azure.com"
    first = await client.get(path)
    assert first.status == 200, first.text
    emulator.state.fail("entra.token", kind=kind)
    calls = emulator.state.count("entra.token")
    during = [await client.get(path) for _ in range(3)]
    assert emulator.state.count("entra.token") > calls  # Entra was asked, and refused
    assert [r.status for r in during] == [200] * 3
    assert {r.json()["access_token"] for r in during} == {first.json()["access_token"]}
    emulator.state.clear_faults()
    after = await client.get(path)
    assert after.status == 200 and after.json()["access_token"] != first.json()["access_token"]
