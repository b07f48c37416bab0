"""No client secret, token or key ever reaches a log line, an error body or a status answer."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest

from broker.cli import main
from broker.config import load_config
from broker.daemon import Daemon
from broker.emulator import Emulator
from broker.emulator import seed as demo
from broker.log import MASK, forget_secret, scrub
from tests.conftest import CLIENT_SECRET, config_text
from tests.e2e.conftest import StartBroker

pytestmark = pytest.mark.timeout(30)


async def test_no_secret_in_any_output(
    start_broker: StartBroker,
    emulator: Emulator,
    logs: io.StringIO,
    short_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Known secret values pushed through success and failure paths appear in no output."""
    broker = await start_broker()
    outputs: list[str] = []
    secrets = [CLIENT_SECRET]
    for listener in ("unix", "tcp"):
        client = broker.client(listener)
        for service in ("fraud", "churn"):
            secrets.append((await client.get(f"/v1/token/{service}")).json()["access_token"])
        for path in (
            "/v1/services",
            "/v1/services/fraud",
            "/healthz",
            "/readyz",
            "/v1/token/x",
            "/metrics",
        ):
            outputs.append((await client.get(path)).text)
    secrets += emulator.state.current_keys(
        demo.SUBSCRIPTION_ID, demo.RESOURCE_GROUP, demo.WORKSPACE, demo.KEY_SERVICE
    )
    credential = broker.daemon.credentials["main"]
    secrets.append((await credential.get_token(broker.daemon.config.cloud.arm_scope)).value)

    emulator.state.fail("mms.token", status=500, body=json.dumps({"echo": secrets[1]}))
    emulator.state.fail("mms.listkeys", status=400, body=json.dumps({"message": secrets[2]}))
    for service in ("fraud", "churn"):
        await asyncio.wait([broker.daemon.store.fetch(service)])
        outputs.append((await broker.client().get(f"/v1/services/{service}")).text)
    broker.clock.advance(3600)
    outputs.append((await broker.client().get("/v1/token/fraud")).text)
    outputs.append((await broker.client().get("/metrics")).text)
    sock = str(broker.daemon.unix_path)
    for argv in (["status", "--socket", sock], ["status", "--json", "--socket", sock]):
        await asyncio.to_thread(main, argv)
    main(["check-config", "-c", str(short_dir / "broker.toml")])
    inline = short_dir / "inline.toml"
    inline.write_text(
        (short_dir / "broker.toml")
        .read_text()
        .replace(
            f'client_secret_file = "{short_dir / "client-secret"}"',
            f'client_secret = "{CLIENT_SECRET}"',
        )
    )
    inline.chmod(0o600)
    assert main(["check-config", "-c", str(inline)]) == 0
    captured = capsys.readouterr()
    assert "STATE" in captured.out and "inline in" in captured.out
    outputs += [captured.out, captured.err, logs.getvalue()]

    assert logs.getvalue().count("token.refreshed") >= 2
    everything = "\n".join(outputs)
    for secret in secrets:
        assert secret not in everything


def test_configured_secrets_are_redacted_before_any_sign_in(
    emulator: Emulator, short_dir: Path
) -> None:
    """The daemon makes its configuration's secrets known to redaction when it is built,
    not at the first sign-in: a log line or a sink command's environment before then is
    scrubbed too."""
    forget_secret(CLIENT_SECRET)
    assert scrub(CLIENT_SECRET) == CLIENT_SECRET  # not known, and not secret-shaped
    path = short_dir / "broker.toml"
    path.write_text(config_text(emulator, short_dir))
    Daemon(load_config(path))
    assert scrub(f"secret={CLIENT_SECRET}") == f"secret={MASK}"
