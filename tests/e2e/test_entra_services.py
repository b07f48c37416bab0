"""Entra scopes as services: the principal's own token for any Azure API, served like the rest."""

from __future__ import annotations

import time
from pathlib import Path

import jwt
import pytest

from broker.config import load_config
from broker.emulator import Emulator
from broker.emulator import seed as demo
from broker.errors import ConfigError
from tests.conftest import config_text
from tests.e2e.conftest import LISTENERS, StartBroker

pytestmark = pytest.mark.timeout(30)

ENTRA = '\n[[service]]\nname = "aml"\nkind = "entra"\nscope = "https://ml.azure.com/.default"\n'


@pytest.mark.parametrize("listener", LISTENERS)
async def test_entra_scope_is_served(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, listener: str
) -> None:
    """A `kind = "entra"` service serves the principal's token for its scope."""
    broker = await start_broker(
        config_text(emulator, short_dir, services={"fraud": demo.TOKEN_SERVICE}) + ENTRA
    )
    reply = await broker.client(listener).get("/v1/token/aml")
    assert reply.status == 200, reply.text
    body = reply.json()
    assert body["auth"] == "entra" and body["token_type"] == "Bearer"
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["aud"] == "https://ml.azure.com" and claims["appid"] == demo.CLIENT_ID
    assert time.time() < body["refresh_by"] < body["expires_on"]
    detail = (await broker.client(listener).get("/v1/services/aml")).json()
    assert detail["state"] == "fresh" and detail["auth"] == "entra"


@pytest.mark.parametrize(
    ("extra", "key", "phrase"),
    [
        ("", "service[2].scope", "missing"),
        ('scope = "https://ml.azure.com"', "service[2].scope", "/.default"),
        (
            'scope = "https://ml.azure.com/.default"\nworkspace = "ws"',
            "service[2].workspace",
            "not used",
        ),
    ],
)
def test_entra_service_configuration_is_checked(
    emulator: Emulator, short_dir: Path, extra: str, key: str, phrase: str
) -> None:
    """An Entra service needs a /.default scope and no Azure ML coordinates."""
    text = config_text(emulator, short_dir, services={"fraud": demo.TOKEN_SERVICE})
    text += f'\n[[service]]\nname = "aml"\nkind = "entra"\n{extra}\n'
    path = short_dir / "broker.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    problem = next(p for p in raised.value.problems if p.key == key)
    assert phrase in problem.message or phrase in problem.fix


def test_scope_on_a_web_service_is_refused(emulator: Emulator, short_dir: Path) -> None:
    """`scope` on a web service is a mistake worth naming."""
    text = config_text(
        emulator,
        short_dir,
        services={"fraud": demo.TOKEN_SERVICE},
        extra_service_keys='scope = "https://ml.azure.com/.default"',
    )
    path = short_dir / "broker.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match='only used with kind = "entra"'):
        load_config(path)


async def test_entras_refresh_hint_is_followed(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path
) -> None:
    """For a long-lived Entra token, Entra's `refresh_in` (half the lifetime, which MSAL
    hands on as `refresh_on`) decides refresh_by, not the lifetime fraction."""
    emulator.state.entra_token_lifetime_s = 3 * 3600
    text = config_text(
        emulator,
        short_dir,
        services={"fraud": demo.TOKEN_SERVICE},
        refresh="lifetime_fraction = 0.8",  # what would apply without the hint
    )
    broker = await start_broker(text + ENTRA)
    body = (await broker.client().get("/v1/token/aml")).json()
    issued = body["expires_on"] - 3 * 3600
    assert body["refresh_by"] == pytest.approx(issued + 3 * 3600 / 2, abs=5)
