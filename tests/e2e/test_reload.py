"""A reload applies a new configuration without dropping what still holds."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from broker.config import load_config
from broker.emulator import Emulator
from broker.emulator import seed as demo
from broker.process import reload_from_disk
from broker.service_manager import Notifier
from tests.conftest import config_text
from tests.e2e.conftest import Broker, StartBroker

pytestmark = pytest.mark.timeout(30)


async def reload_with(broker: Broker, path: Path, text: str) -> None:
    path.write_text(text)
    await broker.daemon.reload(load_config(path))


async def test_unchanged_services_keep_tokens_and_new_ones_are_fetched(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path
) -> None:
    """Adding a service fetches it; removing one forgets it; the rest keep their token."""
    broker = await start_broker(services={"fraud": demo.TOKEN_SERVICE})
    client = broker.client()
    before = (await client.get("/v1/token/fraud")).json()["access_token"]
    text = config_text(
        emulator, short_dir, services={"fraud": demo.TOKEN_SERVICE, "churn": demo.KEY_SERVICE}
    )
    await reload_with(broker, short_dir / "broker.toml", text)
    assert (await client.get("/v1/token/churn")).status == 200
    assert (await client.get("/v1/token/fraud")).json()["access_token"] == before
    assert emulator.state.count("mms.token") == 1

    text = config_text(emulator, short_dir, services={"churn": demo.KEY_SERVICE})
    await reload_with(broker, short_dir / "broker.toml", text)
    assert (await client.get("/v1/token/fraud")).status == 404
    assert [s["service"] for s in (await client.get("/v1/services")).json()["services"]] == [
        "churn"
    ]


async def test_changed_identity_signs_in_again_and_keeps_serving(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path
) -> None:
    """A new secret for the identity makes it sign in again at once; the token stays served."""
    broker = await start_broker(services={"fraud": demo.TOKEN_SERVICE})
    client = broker.client()
    before = (await client.get("/v1/token/fraud")).json()["access_token"]
    sign_ins = emulator.state.count("entra.token")
    other = short_dir / "other-secret"
    other.write_text(demo.CLIENT_SECRET)
    text = config_text(
        emulator,
        short_dir,
        services={"fraud": demo.TOKEN_SERVICE},
        identity=f'client_secret_file = "{other}"',
    )
    await reload_with(broker, short_dir / "broker.toml", text)
    served = (await client.get("/v1/token/fraud")).json()["access_token"]
    await broker.daemon.store.fetch("fraud")
    assert served == before
    assert emulator.state.count("entra.token") == sign_ins + 1
    assert (await client.get("/v1/services/fraud")).json()["state"] == "fresh"


async def test_changed_target_starts_over(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path
) -> None:
    """A service pointed at another web service never serves the old one's token."""
    broker = await start_broker(services={"svc": demo.TOKEN_SERVICE})
    client = broker.client()
    token = (await client.get("/v1/token/svc")).json()["access_token"]
    text = config_text(emulator, short_dir, services={"svc": demo.KEY_SERVICE})
    await reload_with(broker, short_dir / "broker.toml", text)
    body = (await client.get("/v1/token/svc")).json()
    assert body["auth"] == "key" and body["access_token"] != token


async def test_invalid_configuration_is_rejected_and_old_one_kept(
    start_broker: StartBroker, logs: io.StringIO, short_dir: Path
) -> None:
    """A broken file on reload is logged with its problems; the running configuration stays."""
    broker = await start_broker()
    (short_dir / "broker.toml").write_text("[[service]]\nname = 1\n")
    await reload_from_disk(broker.daemon, Notifier({}))  # not under systemd
    assert "config.reload_rejected" in logs.getvalue()
    assert "service[1].name" in logs.getvalue()
    assert (await broker.client().get("/v1/token/fraud")).status == 200
