"""Credentials a client puts in a malformed request never reach the broker's output.

The broker registers every credential it holds for redaction, but redaction lives in its
structlog processors; this runs the real `token-broker run` process and reads everything
it writes, whichever logger wrote it.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from broker.emulator import seed as demo
from tests.fuzz.harness import (
    LISTENERS,
    TEST_TIMEOUT_S,
    Target,
    assert_aiohttp_refusal,
    assert_not_5xx,
    exchange,
    request,
)

pytestmark = [pytest.mark.fuzz, pytest.mark.timeout(TEST_TIMEOUT_S)]

STOP_TIMEOUT_S = 20.0
PLACES = ["authorization", "api-key", "path", "query"]
BREAKAGES = ["lf-line-ends", "control-after", "nul-header-after", "bad-version"]


def carrying(credential: str, place: str, breakage: str) -> bytes:
    """A request with `credential` in `place`, broken in one way after or around it."""
    value = credential.encode() + (b"\x01" if breakage == "control-after" else b"")
    path = {"path": b"/v1/token/" + value, "query": b"/v1/token/fraud?key=" + value}
    headers = [b"Host: localhost", b"Metadata: true"]
    if place == "authorization":
        headers.append(b"Authorization: Bearer " + value)
    elif place == "api-key":
        headers.append(b"X-Token-Broker-Key: " + value)
    if breakage == "nul-header-after":
        headers.append(b"X-Broken: \x00")
    version = b"HTTP/1.2" if breakage == "bad-version" else b"HTTP/1.1"
    line = b"GET " + path.get(place, b"/v1/token/fraud") + b" " + version
    eol = b"\n" if breakage == "lf-line-ends" else b"\r\n"
    return eol.join([line, *headers]) + eol + eol


class BrokerProcess:
    """`token-broker run` against the fuzz broker's emulator, its output kept: a real process
    logs whatever it logs through whatever handlers it sets up, which is what matters."""

    def __init__(self, broker: Target, directory: Path, extra: str = "") -> None:
        assert broker.config is not None
        path = directory / "broker.toml"
        path.write_text(
            broker.config.read_text().replace(str(broker.unix), str(directory / "b.sock")) + extra
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "run", "-c", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.output: list[str] = []
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # until its listeners are up (pytest-timeout bounds it)
            self.output.append(line)
            if "listeners.started" in line:
                host, port = json.loads(line)["tcp"].rsplit(":", 1)
                self.target = Target((host, int(port)), directory / "b.sock")
                return
        raise AssertionError("the broker exited before listening:\n" + "".join(self.output))

    def stop(self) -> str:
        """SIGTERM, wait (kill if it will not stop), and everything it wrote."""
        self.proc.terminate()
        try:
            rest, _ = self.proc.communicate(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise
        return "".join(self.output) + rest


@pytest.mark.parametrize("listener", LISTENERS)
def test_credentials_in_malformed_requests_are_not_logged(
    short_dir: Path, broker: Target, listener: str
) -> None:
    """A client's malformed request carrying a credential the broker holds (a key in
    X-Token-Broker-Key, a token in Authorization, the path or the query) gets a 4xx, and
    the credential appears nowhere in the broker process's output."""
    process = BrokerProcess(broker, short_dir)
    try:
        credentials = {}
        for service in ("churn", "fraud"):
            reply = request(process.target, listener, "GET", f"/v1/token/{service}")
            credentials[service] = reply.json()["access_token"]
        for credential in credentials.values():
            for place, breakage in itertools.product(PLACES, BREAKAGES):
                assert_aiohttp_refusal(
                    exchange(process.target, listener, carrying(credential, place, breakage))
                )
    finally:
        output = process.stop()
    leaked = [
        f"{service}: {line.strip()}"
        for line in output.splitlines()
        for service, credential in credentials.items()
        if credential in line
    ]
    assert not leaked, "credentials in the broker's output:\n" + "\n".join(leaked)


API_KEY = "tbk_fuzz-leak-key-" + "q" * 24
IDENTITY = "identity-fuzz-leak-" + "w" * 20


def keyed(directory: Path) -> str:
    """A service behind an API key, and the App Service route with its identity header."""
    header = directory / "identity-header"
    header.write_text(IDENTITY + "\n")
    header.chmod(0o600)
    digest = hashlib.sha256(API_KEY.encode()).hexdigest()
    return (
        f'\n[[service]]\nname = "keyed"\nsubscription_id = "{demo.SUBSCRIPTION_ID}"\n'
        f'resource_group = "{demo.RESOURCE_GROUP}"\nworkspace = "{demo.WORKSPACE}"\n'
        f'web_service = "{demo.TOKEN_SERVICE}"\napi_keys = ["leak"]\n'
        f'\n[api_key.leak]\nsha256 = "{digest}"\n'
        f'\n[compat]\napp_service_header_file = "{header}"\nresources = ["https://ml.azure.com"]\n'
    )


def hostile(credential: bytes) -> dict[str, bytes]:
    """Requests the guards and the log must withstand, credentials in every header that
    holds one and in the request line or body where the request allows. (A corrupt body
    through the proxy is tests/e2e/test_proxy.py's: the emulator here, in this process,
    logs its own failure to decode it.)"""
    carried = [
        b"X-Token-Broker-Key: " + API_KEY.encode(),
        b"X-IDENTITY-HEADER: " + IDENTITY.encode(),
        b"Authorization: Bearer " + credential,
        b"Cookie: session=" + credential,
    ]

    def make(line: bytes, headers: list[bytes], body: bytes = b"") -> bytes:
        framing = [b"Content-Length: %d" % len(body)] if body else []
        lines = [line, *headers, *framing, b"Connection: close"]
        return b"\r\n".join([*lines, b"", b""]) + body

    usual = [b"Host: localhost", b"Metadata: true", *carried]
    gzipped = [*usual, b"Content-Encoding: gzip"]
    return {
        "undecodable-body": make(b"POST /healthz HTTP/1.1", gzipped, b"junk " + credential),
        "undecodable-refresh": make(
            b"POST /v1/token/keyed/refresh HTTP/1.1", gzipped, b"\x1f\x8b" + credential
        ),
        "proxied-gzip": make(b"POST /v1/proxy/fraud HTTP/1.1", gzipped, gzip.compress(credential)),
        "key-0xff": make(
            b"GET /v1/token/keyed HTTP/1.1",
            [
                b"Host: localhost",
                b"Metadata: true",
                b"X-Token-Broker-Key: " + API_KEY.encode() + b"\xff",
            ],
        ),
        "identity-0xff": make(
            b"GET /msi/token?api-version=2019-08-01&resource=https://ml.azure.com HTTP/1.1",
            [b"Host: localhost", b"X-IDENTITY-HEADER: " + IDENTITY.encode() + b"\xc3"],
        ),
        "two-metadata": make(b"GET /v1/token/keyed HTTP/1.1", [*usual, b"Metadata: false"]),
        "two-keys": make(
            b"GET /v1/token/keyed HTTP/1.1", [*usual, b"X-Token-Broker-Key: " + credential]
        ),
        "host-after-bracket": make(
            b"GET /v1/token/keyed HTTP/1.1", [b"Host: [::1]" + credential, *usual[1:]]
        ),
        "host-port-letters": make(
            b"GET /v1/token/keyed HTTP/1.1", [b"Host: localhost:" + credential, *usual[1:]]
        ),
        "no-version": make(b"GET /v1/token/" + credential, usual),
        "connect": make(b"CONNECT " + credential + b":443 HTTP/1.1", usual),
        "connect-in-body": make(
            b"POST /v1/token/keyed/refresh HTTP/1.1", usual, b"\nCONNECT " + credential + b"\n"
        ),
        "forwarded": make(
            b"GET /v1/token/keyed HTTP/1.1", [*usual, b"X_Forwarded_For: " + credential]
        ),
    }


@pytest.mark.parametrize("listener", LISTENERS)
def test_credentials_in_hostile_headers_and_bodies_are_not_logged(
    short_dir: Path, broker: Target, listener: str
) -> None:
    """Undecodable and compressed bodies, keys and identity headers with bytes outside ASCII,
    repeated guard headers, odd Hosts, version-less and CONNECT request lines, all carrying
    credentials: no local 5xx, and no credential anywhere in the broker process's output."""
    process = BrokerProcess(broker, short_dir, keyed(short_dir))
    try:
        credentials = {"api-key": API_KEY, "identity-header": IDENTITY}
        for service in ("churn", "fraud"):
            reply = request(process.target, listener, "GET", f"/v1/token/{service}")
            credentials[service] = reply.json()["access_token"]
        for name, value in credentials.items():
            for kind, data in hostile(value.encode()).items():
                answer = exchange(process.target, listener, data)
                if not kind.startswith("proxied"):  # the scoring host's answer is its own
                    assert_not_5xx(answer)
                assert reply is None or reply.status != 500 or not reply.is_json, (name, kind)
    finally:
        output = process.stop()
    leaked = [
        f"{name}: {line.strip()}"
        for line in output.splitlines()
        for name, credential in credentials.items()
        if credential in line
    ]
    assert not leaked, "credentials in the broker's output:\n" + "\n".join(leaked)
    assert "request.crashed" not in output and "Unhandled exception" not in output
