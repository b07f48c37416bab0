"""Credentials a client puts in a malformed request never reach the broker's output.

The broker registers every credential it holds for redaction, but redaction lives in its
structlog processors; this runs the real `token-broker run` process and reads everything
it writes, whichever logger wrote it.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.harness import (
    LISTENERS,
    TEST_TIMEOUT_S,
    Target,
    assert_aiohttp_refusal,
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

    def __init__(self, broker: Target, directory: Path) -> None:
        assert broker.config is not None
        path = directory / "broker.toml"
        path.write_text(
            broker.config.read_text().replace(str(broker.unix), str(directory / "b.sock"))
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
