"""The broker under test as a local program reaches it: its addresses, blocking clients
over both listeners, and the checks every answer to hostile input must pass."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.cache import Entry
from broker.emulator import seed as demo

# Two services with near-identical names fetch the same Azure service with different
# tokens: a response for one that carries the other's is the leak the tests look for.
SERVICES = {"fraud": demo.TOKEN_SERVICE, "churn": demo.KEY_SERVICE, "fraud2": demo.TOKEN_SERVICE}
LISTENERS = ["unix", "tcp"]
TIMEOUT_S = 5.0  # every request's socket timeout: a hang fails the example, not the run
MAX_FIELD = 8190  # aiohttp's (and the broker's default) longest request line and header field
MAX_HEADERS = 128  # aiohttp's most header lines in one request
# pytest-timeout bounds each test; a long run of thousands of examples needs more.
TEST_TIMEOUT_S = 1800 if os.environ.get("HYPOTHESIS_PROFILE") == "long" else 120


class Target:
    """The running broker as clients see it, and every credential it has held."""

    def __init__(self, tcp: tuple[str, int], unix: Path, config: Path | None = None) -> None:
        self.tcp = tcp
        self.unix = unix
        self.config = config  # the broker's configuration file, if it has one
        self._seen: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # Hypothesis prints it in reports: no credentials there
        return f"Target(tcp={self.tcp!r}, unix={str(self.unix)!r})"

    def record(self, entry: Entry) -> None:
        """Remember a service's credential (called on the broker's loop after each fetch)."""
        if entry.token is not None:
            with self._lock:
                self._seen.setdefault(entry.service, set()).add(entry.token.value)

    def credentials(self) -> dict[str, frozenset[str]]:
        """Service → every credential value it has held since the broker started."""
        with self._lock:
            return {name: frozenset(values) for name, values in self._seen.items()}


@dataclass(frozen=True)
class Reply:
    """A response as the client read it: status, headers (lower-cased names) and body."""

    status: int
    headers: dict[str, str]
    body: bytes
    head: bool = False  # an answer to HEAD: headers only, whatever Content-Length says

    @property
    def raw(self) -> bytes:
        """Everything that came back, for searching: header values and body."""
        values = (v.encode("latin-1", "replace") for v in self.headers.values())
        return b"\n".join(values) + b"\n" + self.body

    @property
    def is_json(self) -> bool:
        return self.headers.get("content-type", "").startswith("application/json")

    def json(self) -> Any:
        return json.loads(self.body)


class UnixHTTPConnection(http.client.HTTPConnection):
    """`HTTPConnection` over a Unix socket path."""

    def __init__(self, path: Path, timeout: float = TIMEOUT_S) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def connection(target: Target, listener: str) -> http.client.HTTPConnection:
    if listener == "unix":
        return UnixHTTPConnection(target.unix)
    return http.client.HTTPConnection(*target.tcp, timeout=TIMEOUT_S)


def request(
    target: Target,
    listener: str,
    method: str,
    path: str,
    headers: list[tuple[str, str]] | None = None,
    *,
    metadata: bool = True,
) -> Reply:
    """One request on a new connection: `Host: localhost` unless `headers` has a Host,
    `Metadata: true` unless told otherwise, then `headers` in order."""
    conn = connection(target, listener)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        pairs = list(headers or [])
        if all(name.lower() != "host" for name, _ in pairs):
            conn.putheader("Host", "localhost")
        if metadata:
            conn.putheader("Metadata", "true")
        for name, value in pairs:
            conn.putheader(name, value)
        conn.putheader("Connection", "close")
        if method == "POST":
            conn.putheader("Content-Length", "0")
        conn.endheaders()
        response = conn.getresponse()
        body = response.read()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, body)
    finally:
        conn.close()


def raw_socket(target: Target, listener: str) -> socket.socket:
    if listener == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address: str | tuple[str, int] = str(target.unix)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        address = target.tcp
    sock.settimeout(TIMEOUT_S)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        raise
    return sock


def exchange(target: Target, listener: str, data: bytes) -> Reply | None:
    """Send raw bytes and read the first response; None if the broker closed (or reset)
    the connection without answering. A broker that does neither within `TIMEOUT_S`
    raises `TimeoutError`: a hang."""
    sock = raw_socket(target, listener)
    try:
        # The broker may answer and close before it has read everything.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        try:
            return read_reply(sock, head=_HEAD.match(data) is not None)
        except ConnectionResetError:
            return None
    finally:
        sock.close()


_HEAD = re.compile(rb"[\r\n]*HEAD ")  # aiohttp skips blank lines before a request line


def read_reply(sock: socket.socket, *, head: bool = False) -> Reply | None:
    """Parse the first final HTTP/1.x response off `sock` (skipping a `100 Continue`; any
    version in its status line, which aiohttp echoes from the request), framed by its
    Content-Length as aiohttp frames every answer."""
    data = b""
    while True:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                assert not data, f"connection closed in the middle of a response: {data[:300]!r}"
                return None
            data += chunk
        head_bytes, _, data = data.partition(b"\r\n\r\n")
        status_line, *lines = head_bytes.split(b"\r\n")
        version, status, *_ = status_line.split(b" ", 2)
        assert version.startswith(b"HTTP/") and status.isdigit(), status_line
        if not 100 <= int(status) < 200:
            break
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    assert "transfer-encoding" not in headers, headers
    length = 0 if head else int(headers.get("content-length", "0"))
    while len(data) < length:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed in the middle of a body: {data[:300]!r}"
        data += chunk
    return Reply(int(status), headers, data[:length], head)


def healthy(target: Target, listener: str) -> None:
    """`/healthz` answers 200 on a new connection."""
    reply = request(target, listener, "GET", "/healthz", metadata=False)
    assert reply.status == 200 and reply.json()["status"] == "ok", reply


# --- checks ---------------------------------------------------------------------------

ANY_SERVICE = "*"  # for `assert_no_leak`: the request may be for whichever service


def assert_not_5xx(reply: Reply | None) -> None:
    """No answer at all is fine; a 5xx of any kind is not (all services are fresh here, so
    not even a 503 `not_ready` is expected)."""
    assert reply is None or reply.status < 500, reply


def assert_error_shape(reply: Reply) -> None:
    """An error the application answered is JSON `{"error": str, "message": str}`."""
    assert reply.status >= 400 and reply.is_json, reply
    if reply.head:
        return
    body = reply.json()
    assert isinstance(body, dict), reply
    assert isinstance(body.get("error"), str) and body["error"], reply
    assert isinstance(body.get("message"), str) and body["message"], reply


def assert_aiohttp_refusal(reply: Reply | None) -> None:
    """An answer aiohttp gives itself before the application sees the request: any 4xx
    (in JSON if the application did answer after all), or a closed connection."""
    if reply is None:
        return
    assert 400 <= reply.status < 500, reply
    if reply.is_json:
        assert_error_shape(reply)


def assert_no_leak(
    reply: Reply | None, credentials: dict[str, frozenset[str]], allowed: str | None
) -> None:
    """A reply may carry a credential only if it is a 200 token answer for `allowed` (the
    service the request named, `ANY_SERVICE` when the test cannot tell) and carries that
    service's credential alone; anything else carries none."""
    if reply is None:
        return
    raw = reply.raw
    found = {name for name, values in credentials.items() if any(v.encode() in raw for v in values)}
    if not found:
        return
    assert allowed is not None, (
        f"credential of {found} in a reply to a request for no service: {reply}"
    )
    assert len(found) == 1, f"credentials of {sorted(found)} in one reply: {reply}"
    (service,) = found
    assert allowed in (service, ANY_SERVICE), f"{service}'s credential in a reply for {allowed!r}"
    assert reply.status == 200, reply
    values = credentials[service]
    if reply.is_json:
        body = reply.json()
        assert body["service"] == service and body["access_token"] in values, reply
    else:
        assert reply.body in {b"Bearer " + v.encode() + b"\n" for v in values}, reply


def assert_token_reply(
    reply: Reply, service: str, credentials: dict[str, frozenset[str]], *, header: bool = False
) -> None:
    """A 200 answer carrying `service`'s credential, as JSON or as the bare header line."""
    assert reply.status == 200, reply
    values = credentials[service]
    if header:
        assert reply.headers["content-type"].startswith("text/plain"), reply
        assert reply.body in {b"Bearer " + v.encode() + b"\n" for v in values}, reply
    else:
        body = reply.json()
        assert body["service"] == service and body["access_token"] in values, reply
    assert_no_leak(reply, credentials, service)
