"""Every guard on the local API, over the listener it defends, and the caller it refuses,
on the front door and on aiohttp's path alike."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from broker.emulator import Emulator
from broker.emulator import seed as demo
from tests.conftest import config_text
from tests.e2e.conftest import LISTENERS, PATHS, StartBroker

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(params=PATHS)
def front_door(request: pytest.FixtureRequest) -> bool:
    """Every guard test runs on the front door and on aiohttp's path behind it."""
    return bool(request.param)


NOBODY = 65534
API_KEY = "tbk_test-key-for-the-scorer-0123456789"


async def raw(path: str | Path | tuple[str, int], request: bytes) -> tuple[int, dict[str, Any]]:
    """Send raw bytes to a Unix socket path or (host, port); the status and JSON body."""
    if isinstance(path, tuple):
        reader, writer = await asyncio.open_connection(*path)
    else:
        reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(request)
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body) if body else {}


@pytest.mark.parametrize("listener", LISTENERS)
async def test_metadata_header_is_required_on_v1_routes(
    start_broker: StartBroker, listener: str
) -> None:
    """Without `Metadata: true` a /v1 request is refused with a message naming the header."""
    broker = await start_broker()
    client = broker.client(listener)
    for headers in ({"Metadata": ""}, {"Metadata": "false"}):
        for path in ("/v1/token/fraud", "/v1/services"):
            reply = await client.get(path, headers=headers)
            assert reply.status == 400
            assert reply.json()["error"] == "missing_metadata_header"
            assert "Metadata: true" in reply.json()["message"]
    assert (await client.get("/v1/token/fraud", headers={"Metadata": "True"})).status == 200
    for path in ("/healthz", "/readyz"):
        assert (await client.get(path, headers={"Metadata": ""})).status in (200, 503)


async def test_metadata_header_absent_entirely(start_broker: StartBroker) -> None:
    """A request with no Metadata header at all is refused (what an SSRF-ed app would send)."""
    broker = await start_broker()
    assert broker.daemon.tcp_address is not None
    status, body = await raw(
        broker.daemon.tcp_address,
        b"GET /v1/token/fraud HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    assert status == 400 and body["error"] == "missing_metadata_header"


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:8765", "10.0.0.1", "attacker.localhost.evil"]
)
async def test_non_loopback_host_is_refused_on_tcp(start_broker: StartBroker, host: str) -> None:
    """A Host that is not a loopback name is refused on TCP: DNS rebinding."""
    broker = await start_broker()
    reply = await broker.client("tcp").get("/v1/token/fraud", headers={"Host": host})
    assert reply.status == 403 and reply.json()["error"] == "host_not_allowed"


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1:8765", "[::1]:8765", "127.1.2.3"])
async def test_loopback_hosts_are_served(start_broker: StartBroker, host: str) -> None:
    """Loopback names, with or without a port, are served."""
    broker = await start_broker()
    assert (await broker.client("tcp").get("/v1/token/fraud", headers={"Host": host})).status == 200


async def test_any_host_on_the_socket(start_broker: StartBroker) -> None:
    """On the Unix socket, which browsers cannot reach, the Host header is not a guard."""
    broker = await start_broker()
    assert (
        await broker.client("unix").get("/v1/token/fraud", headers={"Host": "x.sock"})
    ).status == 200


@pytest.mark.parametrize("listener", LISTENERS)
@pytest.mark.parametrize(
    "header", ["X-Forwarded-For", "Forwarded", "X-Forwarded-Host", "X-Real-IP"]
)
async def test_forwarded_requests_are_refused(
    start_broker: StartBroker, listener: str, header: str
) -> None:
    """A request relayed by a proxy is refused, naming the header."""
    broker = await start_broker()
    reply = await broker.client(listener).get("/v1/token/fraud", headers={header: "203.0.113.9"})
    assert reply.status == 400 and header in reply.json()["message"]


@pytest.mark.parametrize("listener", LISTENERS)
async def test_browser_origin_and_preflight_are_refused(
    start_broker: StartBroker, listener: str
) -> None:
    """A browser's Origin or CORS preflight is refused: web pages never read tokens."""
    broker = await start_broker()
    reply = await broker.client(listener).get(
        "/v1/token/fraud", headers={"Origin": "https://evil.example"}
    )
    assert reply.status == 403 and reply.json()["error"] == "browser_request"
    assert broker.daemon.tcp_address is not None
    status, body = await raw(
        broker.daemon.tcp_address,
        b"OPTIONS /v1/token/fraud HTTP/1.1\r\nHost: localhost\r\nOrigin: https://evil.example\r\n"
        b"Access-Control-Request-Method: GET\r\nConnection: close\r\n\r\n",
    )
    assert status == 403 and body["error"] == "browser_request"


async def test_absolute_form_request_line_is_refused(start_broker: StartBroker) -> None:
    """`GET http://other.host/…` is refused even with a loopback Host."""
    broker = await start_broker()
    assert broker.daemon.tcp_address is not None
    status, body = await raw(
        broker.daemon.tcp_address,
        b"GET http://evil.example/v1/token/fraud HTTP/1.1\r\nHost: 127.0.0.1\r\nMetadata: true\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert status == 400 and body["error"] == "absolute_form"


def fork_client(uid: int, gid: int, sock: Path, path: str) -> tuple[int, int]:
    """Fork a child that GETs `path` over the socket as another user; its pid and pipe."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to uid/gid, ask, report through the pipe, leave
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.connect(str(sock))
            client.sendall(
                f"GET {path} HTTP/1.1\r\nHost: localhost\r\nMetadata: true\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            while chunk := client.recv(65536):
                os.write(write_end, chunk)
        except BaseException as exc:  # noqa: BLE001 — the forked child reports anything to the parent
            os.write(write_end, f"HTTP/1.1 000 {exc!r}\r\n\r\n".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    return pid, read_end


async def as_user(uid: int, gid: int, sock: Path, path: str) -> tuple[int, dict[str, Any]]:
    pid, read_end = fork_client(uid, gid, sock, path)

    def collect() -> bytes:
        chunks = []
        while chunk := os.read(read_end, 65536):
            chunks.append(chunk)
        os.close(read_end)
        os.waitpid(pid, 0)
        return b"".join(chunks)

    data = await asyncio.to_thread(collect)
    head, _, body = data.partition(b"\r\n\r\n")
    assert not head.startswith(b"HTTP/1.1 000"), head
    return int(head.split()[1]), json.loads(body) if body else {}


def socket_for_nogroup(emulator: Emulator, short_dir: Path, access: str) -> str:
    """Socket group nogroup (so `nobody` may connect) and one service with `access` lines."""
    short_dir.chmod(0o755)
    text = config_text(
        emulator, short_dir, services={"fraud": demo.TOKEN_SERVICE}, extra_service_keys=access
    )
    return text.replace("[listen.unix]\n", f"[listen.unix]\ngroup = {NOBODY}\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
async def test_disallowed_uid_is_refused_and_audited(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, logs: io.StringIO
) -> None:
    """A user not on the service's list gets 403 and an audit event naming uid and pid."""
    broker = await start_broker(socket_for_nogroup(emulator, short_dir, "allow_users = [0]"))
    sock = broker.daemon.unix_path
    assert sock is not None
    status, body = await as_user(NOBODY, NOBODY, sock, "/v1/token/fraud")
    assert status == 403 and body["error"] == "access_denied"
    denied = [json.loads(line) for line in logs.getvalue().splitlines() if "access.denied" in line]
    assert denied and denied[-1]["uid"] == NOBODY and denied[-1]["pid"] > 0
    assert denied[-1]["service"] == "fraud" and denied[-1]["route"] == "/v1/token/fraud"
    assert (await broker.client("unix").get("/v1/token/fraud")).status == 200  # root is listed


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
async def test_allowed_group_is_served(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path
) -> None:
    """A caller whose group is on the list is served, from the kernel's word on its groups."""
    broker = await start_broker(
        socket_for_nogroup(emulator, short_dir, f"allow_groups = [{NOBODY}]")
    )
    assert broker.daemon.unix_path is not None
    status, body = await as_user(NOBODY, NOBODY, broker.daemon.unix_path, "/v1/token/fraud")
    assert status == 200 and body["service"] == "fraud"
    assert (await broker.client("unix").get("/v1/token/fraud")).status == 403  # root is not


async def test_api_key_on_tcp(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, logs: io.StringIO
) -> None:
    """On TCP a key-protected service needs the right key; a wrong or missing one is 403."""
    digest = hashlib.sha256(API_KEY.encode()).hexdigest()
    text = config_text(
        emulator,
        short_dir,
        services={"fraud": demo.TOKEN_SERVICE},
        extra_service_keys='api_keys = ["scorer"]',
    )
    broker = await start_broker(text + f'\n[api_key.scorer]\nsha256 = "{digest}"\n')
    tcp = broker.client("tcp")
    missing = await tcp.get("/v1/token/fraud")
    assert missing.status == 403 and "X-Token-Broker-Key" in missing.json()["message"]
    wrong = await tcp.get("/v1/token/fraud", headers={"X-Token-Broker-Key": "tbk_wrong"})
    assert wrong.status == 403
    right = await tcp.get("/v1/token/fraud", headers={"X-Token-Broker-Key": API_KEY})
    assert right.status == 200
    assert (await broker.client("unix").get("/v1/token/fraud")).status == 200  # socket mode guards
    assert "access.denied" in logs.getvalue()
    assert API_KEY not in logs.getvalue() and "tbk_wrong" not in logs.getvalue()


async def test_user_restricted_service_is_not_served_on_tcp(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path
) -> None:
    """A service limited to given users, with no API key, is refused on TCP."""
    text = config_text(
        emulator,
        short_dir,
        services={"fraud": demo.TOKEN_SERVICE},
        extra_service_keys="allow_users = [0]",
    )
    broker = await start_broker(text)
    reply = await broker.client("tcp").get("/v1/token/fraud")
    assert reply.status == 403 and "Unix socket" in reply.json()["message"]


async def test_connections_beyond_the_cap_take_the_quietest_place(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path
) -> None:
    """With max_connections reached by connections that send nothing, a new connection is
    served in the place of the quietest, which is closed (tests/e2e/test_limits.py pins the
    503 for when every place is busy)."""
    text = config_text(emulator, short_dir).replace(
        "[listen.unix]\n", "[listen]\nmax_connections = 2\n\n[listen.unix]\n", 1
    )
    broker = await start_broker(text)
    assert broker.daemon.tcp_address is not None
    held = [await asyncio.open_connection(*broker.daemon.tcp_address) for _ in range(2)]
    status, _ = await raw(
        broker.daemon.tcp_address,
        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    assert status == 200
    for reader, _ in held:  # evicted, well before their idle timeout (10 s)
        assert await asyncio.wait_for(reader.read(), 5) == b""
    for _, writer in held:
        writer.close()


async def test_oversized_header_gets_a_4xx(start_broker: StartBroker) -> None:
    """A header longer than max_header_bytes is answered 4xx, and the broker stays up."""
    broker = await start_broker()
    reply = await broker.client("tcp").get("/v1/token/fraud", headers={"X-Big": "a" * 20000})
    assert 400 <= reply.status < 500
    assert (await broker.client("tcp").get("/healthz")).status == 200


@pytest.mark.parametrize("listener", LISTENERS)
@pytest.mark.parametrize(
    "request_bytes",
    [
        b"CONNECT \r\n\r\n",
        b"CONNECT \r\nX-0: v\r\n\r\n",
        b"CONNECT evil.example:443 HTTP/1.1\r\n\r\n",
    ],
)
async def test_connect_is_answered_and_closed(
    start_broker: StartBroker, listener: str, request_bytes: bytes
) -> None:
    """A CONNECT, even one aiohttp cannot parse, is answered 405 at once and holds no place."""
    broker = await start_broker()
    where = broker.daemon.tcp_address if listener == "tcp" else broker.daemon.unix_path
    assert where is not None
    status, body = await asyncio.wait_for(raw(where, request_bytes), 5)
    assert status == 405 and body["error"] == "method_not_allowed"
    assert (await broker.client(listener).get("/healthz")).status == 200


def head(lines: list[bytes]) -> bytes:
    """A request from its lines, with CRLFs, ending the connection after its answer."""
    return b"\r\n".join([*lines, b"Connection: close", b"", b""])


@pytest.mark.parametrize(
    "host", [b"[::1]evil.com", b"[::1]:evil", b"localhost:abc", b"127.0.0.1:80x", b"[::1]]"]
)
async def test_hosts_with_anything_but_a_port_after_the_name_are_refused(
    start_broker: StartBroker, host: bytes
) -> None:
    """Nothing may follow a name or `]` but `:` and digits: such a Host is refused on TCP."""
    broker = await start_broker()
    assert broker.daemon.tcp_address is not None
    request = head([b"GET /v1/token/fraud HTTP/1.1", b"Host: " + host, b"Metadata: true"])
    status, body = await raw(broker.daemon.tcp_address, request)
    assert status == 403 and body["error"] == "host_not_allowed"


@pytest.mark.parametrize("listener", LISTENERS)
@pytest.mark.parametrize(
    "headers",
    [
        [b"Metadata: true", b"Metadata: false"],
        [b"Metadata: false", b"Metadata: true"],
        [b"Metadata: true", b"metadata: true"],
        [b"Metadata: true", b"X-Token-Broker-Key: " + API_KEY.encode(), b"X-Token-Broker-Key: x"],
    ],
)
async def test_a_guard_header_sent_twice_is_refused(
    start_broker: StartBroker,
    emulator: Emulator,
    short_dir: Path,
    listener: str,
    headers: list[bytes],
) -> None:
    """Two Metadata (or API key) headers are refused with 400, whatever their values: which
    one a guard reads is never a question."""
    digest = hashlib.sha256(API_KEY.encode()).hexdigest()
    text = config_text(emulator, short_dir, extra_service_keys='api_keys = ["scorer"]')
    broker = await start_broker(text + f'\n[api_key.scorer]\nsha256 = "{digest}"\n')
    where = broker.daemon.tcp_address if listener == "tcp" else broker.daemon.unix_path
    assert where is not None
    request = head([b"GET /v1/token/fraud HTTP/1.1", b"Host: localhost", *headers])
    status, body = await raw(where, request)
    assert status == 400 and body["error"] == "duplicate_header", body


@pytest.mark.parametrize("listener", LISTENERS)
@pytest.mark.parametrize("path", ["/v1/token/fraud", "/v1/proxy/fraud", "/healthz"])
@pytest.mark.parametrize(
    "header",
    ["Via", "X-Client-IP", "True-Client-IP", "X-Forwarded-Port", "X_Forwarded_For", "X-Real_IP"],
)
async def test_every_forwarding_header_is_refused(
    start_broker: StartBroker, listener: str, path: str, header: str
) -> None:
    """Via, X-Client-IP, True-Client-IP, any X-Forwarded-* and their `_` spellings mark a
    relayed request, refused on every route (the proxy's too) naming the header."""
    broker = await start_broker()
    reply = await broker.client(listener).get(path, headers={header: "203.0.113.9"})
    assert reply.status == 400, reply
    assert reply.json()["error"] == "forwarded_request" and header in reply.json()["message"]


@pytest.mark.parametrize("listener", LISTENERS)
async def test_a_request_line_without_a_version_is_refused(
    start_broker: StartBroker, listener: str
) -> None:
    """`GET /v1/token/fraud` with no HTTP version is refused with 400, not served as HTTP/0.9."""
    broker = await start_broker()
    where = broker.daemon.tcp_address if listener == "tcp" else broker.daemon.unix_path
    assert where is not None
    request = head([b"GET /v1/token/fraud", b"Host: localhost", b"Metadata: true"])
    status, body = await asyncio.wait_for(raw(where, request), 5)
    assert status == 400 and body["error"] == "bad_request_line", body
    assert (await broker.client(listener).get("/healthz")).status == 200


@pytest.mark.parametrize("listener", LISTENERS)
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_connect_in_a_body_is_a_body(
    start_broker: StartBroker, listener: str, framing: str
) -> None:
    """A body line starting with `CONNECT ` does not get the request refused; a CONNECT
    pipelined after it, as the next request's method, still is, and ends the connection."""
    broker = await start_broker()
    where = broker.daemon.tcp_address if listener == "tcp" else broker.daemon.unix_path
    assert where is not None
    body = b"hello\r\nCONNECT me HTTP/1.1\r\n\nCONNECT x\n"
    if framing == "chunked":
        frame, framed = b"Transfer-Encoding: chunked", b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    else:
        frame, framed = b"Content-Length: %d" % len(body), body
    post = [b"POST /v1/token/fraud/refresh HTTP/1.1", b"Host: localhost", b"Metadata: true", frame]
    status, answer = await asyncio.wait_for(raw(where, head(post) + framed), 5)
    assert status == 200 and answer["service"] == "fraud"
    keep = b"\r\n".join([*post, b"", b""]) + framed
    connect = b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n"
    reader, writer = await (
        asyncio.open_connection(*where)
        if isinstance(where, tuple)
        else asyncio.open_unix_connection(str(where))
    )
    writer.write(keep)
    await writer.drain()
    first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert first.startswith(b"HTTP/1.1 200 ")
    writer.write(connect)
    rest = await asyncio.wait_for(reader.read(), 5)  # read() returns at the close
    writer.close()
    assert b"HTTP/1.1 405 Method Not Allowed" in rest and b"method_not_allowed" in rest
