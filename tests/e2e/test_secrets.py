"""No client secret, token or key ever reaches a log line, an error body or a status answer."""

from __future__ import annotations

import asyncio
import hashlib
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


async def test_no_secret_in_the_log_lines_of_hostile_requests(
    start_broker: StartBroker,
    emulator: Emulator,
    logs: io.StringIO,
    short_dir: Path,
) -> None:
    """Undecodable bodies, an API key with a byte outside ASCII, repeated guard headers, a
    corrupt compressed body through the proxy and a watcher leaving write no credential, nor
    a piece of one, to any log line (aiohttp's own records included)."""
    api_key = "tbk_secret-search-" + "z" * 24
    digest = hashlib.sha256(api_key.encode()).hexdigest()
    text = config_text(
        emulator,
        short_dir,
        extra_service_keys='api_keys = ["search"]',
        listen="watch_heartbeat_s = 0.05",
    )
    broker = await start_broker(text + f'\n[api_key.search]\nsha256 = "{digest}"\n')
    await broker.settled()
    tokens = [e.token.value for e in broker.daemon.store.entries if e.token is not None]
    assert len(tokens) == 2
    assert broker.daemon.tcp_address is not None and broker.daemon.unix_path is not None
    key = api_key.encode()
    tcp = broker.daemon.tcp_address

    async def send(data: bytes, unix: bool = False) -> bytes:
        reader, writer = await (
            asyncio.open_unix_connection(str(broker.daemon.unix_path))
            if unix
            else asyncio.open_connection(*tcp)
        )
        writer.write(data)
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return answer

    head = b"Host: localhost\r\nMetadata: true\r\nConnection: close\r\n"
    for token in tokens:
        carried = b"X-Token-Broker-Key: " + key + b"\r\nAuthorization: Bearer " + token.encode()
        body = b"\x1f\x8b\x08\x00" + token.encode()
        encoded = b"Content-Encoding: gzip\r\nContent-Length: %d\r\n" % len(body)
        for path in (b"/healthz", b"/v1/token/fraud/refresh", b"/v1/proxy/fraud"):
            answer = await send(
                b"POST "
                + path
                + b" HTTP/1.1\r\n"
                + head
                + carried
                + b"\r\n"
                + encoded
                + b"\r\n"
                + body
            )
            assert b'"error": "internal"' not in answer, answer[:300]  # the host may 500
        for extra in (key + b"\xff", key + b"\r\nX-Token-Broker-Key: " + token.encode()):
            answer = await send(
                b"GET /v1/token/fraud HTTP/1.1\r\n"
                + head
                + b"X-Token-Broker-Key: "
                + extra
                + b"\r\n\r\n"
            )
            assert answer.startswith((b"HTTP/1.1 400", b"HTTP/1.1 403")), answer[:200]
    reader, writer = await asyncio.open_unix_connection(str(broker.daemon.unix_path))
    writer.write(
        b"GET /v1/token/fraud?watch=true HTTP/1.1\r\nHost: localhost\r\nMetadata: true\r\n\r\n"
    )
    await asyncio.wait_for(reader.readuntil(b"event: token\n"), 10)
    writer.close()
    await writer.wait_closed()

    async def watch_ended() -> None:
        while not logs.getvalue().count('"watch.client_left"'):
            await broker.client().get("/healthz")  # a look per request; the deadline bounds it

    await asyncio.wait_for(watch_ended(), 10)
    everything = logs.getvalue()
    assert "request.crashed" not in everything
    for secret in [api_key, *tokens]:
        middle = len(secret) // 2
        for piece in (secret, secret[:16], secret[middle : middle + 16], secret[-16:]):
            assert piece not in everything, piece
