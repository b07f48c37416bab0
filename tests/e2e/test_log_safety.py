"""The real `token-broker run` process under requests that used to put credentials in its
log: undecodable bodies (aiohttp logged every header of those), header bytes outside ASCII,
and repeated guard headers. Every line it writes is read and searched."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from broker.emulator import Emulator
from broker.emulator import seed as demo
from tests.conftest import config_text

pytestmark = pytest.mark.timeout(60)

API_KEY = "tbk_log-safety-key-" + "k" * 24
IDENTITY = "identity-header-" + "i" * 24
FLOOD = 100  # requests in a burst; each wrote about 3 KB of headers to the log before


class Process:
    """`token-broker run` with everything it writes kept, and its TCP address."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.tcp: tuple[str, int] | None = None
        self._started = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace")
            self.lines.append(line)
            if '"listeners.started"' in line:
                host, port = json.loads(line)["tcp"].rsplit(":", 1)
                self.tcp = (host, int(port))
                self._started.set()

    async def started(self) -> tuple[str, int]:
        """Wait until the listeners are up (or fail with what the process said as it exited)."""
        waiting = asyncio.create_task(self._started.wait())
        await asyncio.wait([waiting, self._reader], timeout=30, return_when="FIRST_COMPLETED")
        waiting.cancel()
        assert self.tcp is not None, "the broker is not listening:\n" + "".join(self.lines)
        return self.tcp

    async def stop(self) -> str:
        """SIGTERM, wait for the exit, and everything the process wrote."""
        if self.proc.returncode is None:
            self.proc.terminate()
        await asyncio.wait_for(self.proc.wait(), 20)
        await asyncio.wait_for(self._reader, 5)
        return "".join(self.lines)


@pytest.fixture
async def process(emulator: Emulator, short_dir: Path) -> AsyncIterator[Process]:
    """A broker process with an API-key service and the App Service identity header."""
    header = short_dir / "identity-header"
    header.write_text(IDENTITY + "\n")
    header.chmod(0o600)
    digest = hashlib.sha256(API_KEY.encode()).hexdigest()
    text = config_text(
        emulator,
        short_dir,
        services={"fraud": demo.TOKEN_SERVICE},
        extra_service_keys='api_keys = ["scorer"]',
    )
    text += f'\n[api_key.scorer]\nsha256 = "{digest}"\n'
    text += (
        f'\n[compat]\napp_service_header_file = "{header}"\nresources = ["https://ml.azure.com"]\n'
    )
    path = short_dir / "broker.toml"
    path.write_text(text)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker",
        "run",
        "-c",
        str(path),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    running = Process(proc)
    yield running
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def exchange(address: tuple[str, int], request: bytes) -> tuple[int, dict[str, Any]]:
    """Send one request on a new TCP connection; its status and JSON body."""
    reader, writer = await asyncio.open_connection(*address)
    writer.write(request)
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body) if body else {}


def carrying(path: bytes, *, extra: list[bytes], body: bytes = b"") -> bytes:
    """A request to `path` with credentials in every header that holds one."""
    lines = [
        b"POST " + path + b" HTTP/1.1",
        b"Host: localhost",
        b"Metadata: true",
        b"X-Token-Broker-Key: " + API_KEY.encode(),
        b"X-IDENTITY-HEADER: " + IDENTITY.encode(),
        *extra,
        b"Content-Length: %d" % len(body),
        b"Connection: close",
    ]
    return b"\r\n".join([*lines, b"", b""]) + body


def leaks(output: str, values: list[str]) -> list[str]:
    return [line for line in output.splitlines() if any(v in line for v in values)]


async def test_undecodable_bodies_get_a_400_and_no_header_reaches_the_log(
    process: Process,
) -> None:
    """A body that is not the gzip its Content-Encoding says, on any of the broker's own
    routes, gets a JSON 400; a burst of them writes no header value (API key, identity
    header, Authorization, cookies) and next to nothing to the log."""
    address = await process.started()
    bearer, cookie = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    extra = [
        b"Authorization: Bearer " + bearer.encode(),
        b"Cookie: session=" + cookie.encode(),
        b"Content-Encoding: gzip",
    ]
    paths = [b"/healthz", b"/v1/token/fraud/refresh", b"/msi/token?api-version=2019-08-01"]
    before = len("".join(process.lines))
    for i in range(FLOOD):
        request = carrying(paths[i % len(paths)], extra=extra, body=b"not gzip at all")
        status, body = await exchange(address, request)
        assert status == 400 and body["error"] == "encoded_body", body
    output = await process.stop()
    assert not leaks(output, [API_KEY, IDENTITY, bearer, cookie])
    assert "Unhandled exception" not in output and "request.crashed" not in output
    assert len(output) - before < 4096, output[before:][:2000]


async def test_an_api_key_with_a_byte_outside_ascii_is_refused_unlogged(
    process: Process,
) -> None:
    """An API key header ending in byte 0xff (or holding UTF-8) is a 403, not a 500, and
    the key appears nowhere in the log."""
    address = await process.started()
    for tail in (b"\xff", "\u00e9".encode(), b"\x80\x80"):
        request = b"\r\n".join(
            [
                b"GET /v1/token/fraud HTTP/1.1",
                b"Host: localhost",
                b"Metadata: true",
                b"X-Token-Broker-Key: " + API_KEY.encode() + tail,
                b"Connection: close",
                b"",
                b"",
            ]
        )
        status, body = await exchange(address, request)
        assert status == 403 and body["error"] == "access_denied", body
    for tail in (b"\xff", b"\xc3\xa9"):
        request = b"\r\n".join(
            [
                b"GET /msi/token?api-version=2019-08-01&resource=https://ml.azure.com HTTP/1.1",
                b"Host: localhost",
                b"X-IDENTITY-HEADER: " + IDENTITY.encode() + tail,
                b"Connection: close",
                b"",
                b"",
            ]
        )
        status, body = await exchange(address, request)
        assert status == 403 and body["error"] == "access_denied", body
    output = await process.stop()
    assert not leaks(output, [API_KEY])
    assert "request.crashed" not in output
