"""Azure's refusals reach the operator with Azure's code and what to do about it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from broker.emulator import Emulator
from broker.emulator import seed as demo
from tests.e2e.conftest import StartBroker

pytestmark = pytest.mark.timeout(30)


async def error_of(
    start_broker: StartBroker, service: str, **kwargs: object
) -> tuple[dict[str, Any], dict[str, Any]]:
    broker = await start_broker(**kwargs)
    await broker.settled()
    client = broker.client()
    detail = (await client.get(f"/v1/services/{service}")).json()
    reply = await client.get(f"/v1/token/{service}")
    assert reply.status == 503
    return detail, reply.json()


async def test_token_auth_on_aci_is_refused(start_broker: StartBroker, emulator: Emulator) -> None:
    """Asking for token auth on an ACI service fails with Azure's rule in the message."""
    detail, body = await error_of(
        start_broker,
        "churn",
        services={"churn": demo.KEY_SERVICE},
        extra_service_keys='auth = "token"',
    )
    assert detail["state"] == "failed"
    assert "ACI does not support" in detail["last_error"]["message"]
    assert "ACI does not support" in body["message"]
    assert emulator.state.count("mms.token") == 0


async def test_both_auth_modes_on_is_refused(start_broker: StartBroker, emulator: Emulator) -> None:
    """A service with key and token auth both enabled is refused: Azure allows only one."""
    emulator.state.add_web_service(
        demo.SUBSCRIPTION_ID,
        demo.RESOURCE_GROUP,
        demo.WORKSPACE,
        "both-on",
        compute_type="AKS",
        auth_enabled=True,
        aad_auth_enabled=True,
    )
    detail, _ = await error_of(start_broker, "both", services={"both": "both-on"})
    assert "cannot both be enabled" in detail["last_error"]["message"]


async def test_wrong_client_secret_shows_aadsts(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path
) -> None:
    """A wrong client secret surfaces AADSTS7000215 and the fix, never the secret."""
    wrong = short_dir / "wrong-secret"
    wrong.write_text("not-the-secret-at-all\n")
    detail, body = await error_of(
        start_broker,
        "fraud",
        services={"fraud": demo.TOKEN_SERVICE},
        identity=f'client_secret_file = "{wrong}"',
    )
    error = detail["last_error"]
    assert error["aad_code"] == "AADSTS7000215"
    assert "AADSTS7000215" in error["message"] and "client secret is wrong" in error["message"]
    assert "not-the-secret-at-all" not in str(detail) + str(body)


async def test_missing_role_names_reader_and_workspace(
    start_broker: StartBroker, emulator: Emulator
) -> None:
    """A 403 says the principal lacks the Reader role on which workspace."""
    emulator.state.revoke_role(
        demo.CLIENT_ID, demo.SUBSCRIPTION_ID, demo.RESOURCE_GROUP, demo.WORKSPACE
    )
    detail, _ = await error_of(
        start_broker,
        "fraud",
        services={"fraud": demo.TOKEN_SERVICE},
        extra_service_keys=f'region = "{demo.REGION}"',
    )
    message = detail["last_error"]["message"]
    assert detail["last_error"]["status"] == 403
    assert "lacks the Reader role" in message and repr(demo.WORKSPACE) in message
    assert demo.CLIENT_ID in message


async def test_unknown_web_service_is_not_found(start_broker: StartBroker) -> None:
    """A web service that does not exist in the workspace is reported as HTTP 404."""
    detail, _ = await error_of(start_broker, "ghost", services={"ghost": "no-such-service"})
    assert detail["last_error"]["status"] == 404
    assert (
        "no-such-service" in detail["last_error"]["message"]
        or "ghost" in detail["last_error"]["message"]
    )
