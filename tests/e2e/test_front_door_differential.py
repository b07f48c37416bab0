"""The front door and aiohttp's path answer one corpus of requests alike: valid, hostile,
malformed and pipelined, whole and split at every byte, on both listeners.

One broker serves both paths (a reload of `[listen] front_door` switches new connections),
so the two answers carry the same credentials and can be compared byte for byte, Date and
Server set aside. aiohttp names itself in a Server header and the front door does not:
each case also says how many of its answers the front door gave itself, so that a front
door handing everything over (or answering what is not its own) fails too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.daemon import Daemon
from broker.emulator import Emulator
from broker.emulator import seed as demo
from tests.conftest import config_text
from tests.e2e.conftest import LISTENERS, StartBroker
from tests.e2e.wire import CLOSE, exchange, normalized, statuses, without_server

# Every refusal logged, repeats too: each path must log the same ones.
pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("every_repeat")]

API_KEY = b"tbk_differential-key-0123456789abcdef"
H = b"Host: localhost\r\nMetadata: true\r\n"


def request(line: bytes, *headers: bytes, body: bytes = b"", host: bytes = H) -> bytes:
    return line + b"\r\n" + host + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


TOKEN = request(b"GET /v1/token/fraud HTTP/1.1")


@dataclass(frozen=True)
class Case:
    """One request or several, what the broker answers on each listener, and how many of
    those answers the front door gives itself (the rest are aiohttp's)."""

    id: str
    data: bytes
    unix: tuple[int, ...]
    door: int
    tcp: tuple[int, ...] | None = None  # when TCP's answers differ from the socket's
    # What follows, so that the broker closes the connection: a last request, or nothing
    # when the case ends it (aiohttp refuses bytes after `Connection: close` in one read
    # with a 400 instead of the answer; the front door answers and closes: see
    # test_front_door.py).
    then: bytes = CLOSE
    same_body: bool = True  # False for /metrics, whose counts the first answer moves

    def expected(self, listener: str) -> tuple[int, ...]:
        return self.tcp if listener == "tcp" and self.tcp is not None else self.unix


OK2 = (200, 200)  # the request's answer and the closing /healthz's
CORPUS = [
    Case("token", TOKEN, OK2, 2),
    Case("format-json", request(b"GET /v1/token/fraud?format=json HTTP/1.1"), OK2, 2),
    Case("format-header", request(b"GET /v1/token/churn?format=header HTTP/1.1"), OK2, 2),
    Case("empty-query", request(b"GET /v1/token/fraud? HTTP/1.1"), OK2, 2),
    Case("head", request(b"HEAD /v1/token/fraud HTTP/1.1"), OK2, 2),
    Case("head-then-get", request(b"HEAD /v1/token/churn HTTP/1.1") + TOKEN, (200,) * 3, 3),
    Case("healthz", b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n", OK2, 2),
    Case("readyz-head", b"HEAD /readyz HTTP/1.1\r\nHost: [::1]:8765\r\n\r\n", OK2, 2),
    Case("http-1.0", request(b"GET /v1/token/fraud HTTP/1.0"), (200,), 1, then=b""),
    Case(
        "http-1.0-keep-alive", request(b"GET /healthz HTTP/1.0", b"Connection: keep-alive"), OK2, 2
    ),
    Case(
        "connection-close",
        request(b"GET /v1/token/fraud HTTP/1.1", b"Connection: close"),
        (200,),
        1,
        then=b"",
    ),
    Case(
        "body-on-get",
        request(b"GET /v1/token/fraud HTTP/1.1", b"Content-Length: 5", body=b"hello"),
        OK2,
        2,
    ),
    Case("leading-line-ends", b"\r\n\r\n" + TOKEN, OK2, 2),
    Case(
        "pipelined-then-aiohttp",
        TOKEN
        + b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
        + request(b"GET /v1/services HTTP/1.1")
        + request(b"GET /v1/token/churn HTTP/1.1"),
        (200,) * 5,
        2,
    ),
    Case("no-metadata", b"GET /v1/token/fraud HTTP/1.1\r\nHost: localhost\r\n\r\n", (400, 200), 2),
    Case(
        "metadata-false",
        request(b"GET /v1/token/fraud HTTP/1.1", host=b"Host: localhost\r\nMetadata: false\r\n"),
        (400, 200),
        2,
    ),
    Case(
        "metadata-twice", request(b"GET /v1/token/fraud HTTP/1.1", b"metadata: true"), (400, 200), 2
    ),
    Case(
        "metadata-odd-case",
        request(b"GET /v1/token/fraud HTTP/1.1", host=b"Host: localhost\r\nMETADATA:  TRUE \r\n"),
        OK2,
        2,
    ),
    Case(
        "x-forwarded-for",
        request(b"GET /v1/token/fraud HTTP/1.1", b"X-Forwarded-For: 203.0.113.9"),
        (400, 200),
        2,
    ),
    Case(
        "x_forwarded_for",
        request(b"GET /healthz HTTP/1.1", b"X_Forwarded_For: 203.0.113.9"),
        (400, 200),
        2,
    ),
    Case("via", request(b"GET /v1/token/fraud HTTP/1.1", b"Via: 1.1 proxy"), (400, 200), 2),
    Case(
        "origin",
        request(b"GET /v1/token/fraud HTTP/1.1", b"Origin: https://evil.example"),
        (403, 200),
        2,
    ),
    Case(
        "preflight",
        request(
            b"OPTIONS /v1/token/fraud HTTP/1.1",
            b"Origin: https://evil.example",
            b"Access-Control-Request-Method: GET",
        ),
        (403, 200),
        0,
    ),
    Case(
        "absolute-form",
        request(
            b"GET http://evil.example/v1/token/fraud HTTP/1.1",
            host=b"Host: 127.0.0.1\r\nMetadata: true\r\n",
        ),
        (400, 200),
        0,
    ),
    Case(
        "foreign-host",
        request(b"GET /v1/token/fraud HTTP/1.1", host=b"Host: evil.example\r\nMetadata: true\r\n"),
        OK2,
        2,
        tcp=(403, 200),
    ),
    Case(
        "host-port-junk",
        request(b"GET /v1/token/fraud HTTP/1.1", host=b"Host: [::1]:evil\r\nMetadata: true\r\n"),
        OK2,
        2,
        tcp=(403, 200),
    ),
    Case("no-host", b"GET /v1/token/fraud HTTP/1.1\r\nMetadata: true\r\n\r\n", (400,), 0),
    Case(
        "no-host-http-1.0",
        b"GET /v1/token/fraud HTTP/1.0\r\nMetadata: true\r\n\r\n",
        (200,),
        1,
        tcp=(403,),
        then=b"",
    ),
    Case("host-twice", request(b"GET /v1/token/fraud HTTP/1.1", b"Host: localhost"), (400,), 0),
    Case(
        "encoded-body",
        request(
            b"GET /v1/token/fraud HTTP/1.1",
            b"Content-Encoding: gzip",
            b"Content-Length: 3",
            body=b"abc",
        ),
        (400, 200),
        2,
    ),
    Case(
        "encoding-no-body",
        request(b"GET /v1/token/fraud HTTP/1.1", b"Content-Encoding: gzip"),
        OK2,
        2,
    ),
    Case("unknown-service", request(b"GET /v1/token/nope HTTP/1.1"), (404, 200), 0),
    Case("percent-encoded-name", request(b"GET /v1/token/fr%61ud HTTP/1.1"), OK2, 0),
    Case("trailing-slash", request(b"GET /v1/token/fraud/ HTTP/1.1"), (404, 200), 0),
    Case("fragment", request(b"GET /v1/token/fraud#x HTTP/1.1"), OK2, 0),
    Case("format-xml", request(b"GET /v1/token/fraud?format=xml HTTP/1.1"), (400, 200), 0),
    Case("healthz-query", b"GET /healthz?x=1 HTTP/1.1\r\nHost: localhost\r\n\r\n", OK2, 0),
    Case("locked-no-key", request(b"GET /v1/token/locked HTTP/1.1"), (403, 200), 2),
    Case(
        "locked-key",
        request(b"GET /v1/token/locked HTTP/1.1", b"X-Token-Broker-Key: " + API_KEY),
        (403, 200),
        2,
        tcp=OK2,
    ),
    Case(
        "locked-wrong-key",
        request(b"GET /v1/token/locked?format=header HTTP/1.1", b"X-Token-Broker-Key: tbk_wrong"),
        (403, 200),
        2,
    ),
    Case(
        "locked-key-twice",
        request(
            b"GET /v1/token/locked HTTP/1.1",
            b"X-Token-Broker-Key: " + API_KEY,
            b"x-token-broker-key: x",
        ),
        (400, 200),
        2,
    ),
    Case("mine", request(b"GET /v1/token/mine HTTP/1.1"), OK2, 2, tcp=(403, 200)),
    # A read holding a CONNECT gets the refusal alone, whatever came before it in the read.
    Case("connect-after-token", TOKEN + b"CONNECT evil.example:443 HTTP/1.1\r\n\r\n", (405,), 0),
    Case("connect-no-target", b"CONNECT \r\n\r\n", (405,), 0),
    Case("no-version", b"GET /v1/token/fraud\r\n" + H + b"\r\n", (400,), 0),
    Case(
        "post-refresh",
        request(b"POST /v1/token/fraud/refresh HTTP/1.1", b"Content-Length: 0"),
        OK2,
        0,
    ),
    Case("metrics", b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n", OK2, 0, same_body=False),
    Case(
        "put-token", request(b"PUT /v1/token/fraud HTTP/1.1", b"Content-Length: 0"), (405, 200), 0
    ),
    Case(
        "upgrade",
        request(b"GET /v1/token/fraud HTTP/1.1", b"Upgrade: websocket", b"Connection: Upgrade"),
        OK2,
        0,
    ),
    Case(
        "expect-continue",
        request(b"GET /v1/token/fraud HTTP/1.1", b"Expect: 100-continue"),
        (100, 200, 200),
        0,
    ),
    Case(
        "chunked-body-on-get",
        request(
            b"GET /v1/token/fraud HTTP/1.1",
            b"Transfer-Encoding: chunked",
            body=b"5\r\nhello\r\n0\r\n\r\n",
        ),
        OK2,
        0,
    ),
    Case(
        "many-headers",
        request(b"GET /v1/token/fraud HTTP/1.1", *(b"X-%d: v" % i for i in range(100))),
        OK2,
        2,
    ),
    Case(
        "too-many-headers",
        request(b"GET /v1/token/fraud HTTP/1.1", *(b"X-%d: v" % i for i in range(200))),
        (400,),
        0,
    ),
    Case(
        "long-header",
        request(b"GET /v1/token/fraud HTTP/1.1", b"X-Long: " + b"a" * 9000),
        (400,),
        0,
    ),
    Case("no-colon", request(b"GET /v1/token/fraud HTTP/1.1", b"NoColon"), (400,), 0),
    # A read llhttp finds malformed anywhere is aiohttp's whole: it refuses it whole.
    Case("token-then-junk", TOKEN + b"\x16\x03\x01\x02\x00junk\r\n\r\n", (400,), 0),
    Case("close-then-more", request(b"GET /healthz HTTP/1.1", b"Connection: close"), (400,), 0),
    Case("nul-in-value", request(b"GET /v1/token/fraud HTTP/1.1", b"X-Nul: a\x00b"), (400,), 0),
    Case("lowercase-method", request(b"get /v1/token/fraud HTTP/1.1"), (400,), 0),
    Case("http-2.0", request(b"GET /v1/token/fraud HTTP/2.0"), (400,), 0),
    Case("bare-line-feeds", TOKEN.replace(b"\r\n", b"\n"), (400,), 0),
    Case(
        "pipelined-door-only",
        request(b"GET /v1/token/churn?format=header HTTP/1.1", b"Content-Length: 2", body=b"{}")
        + b"HEAD /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
        + request(b"GET /v1/token/locked HTTP/1.1")
        + b"\r\n"
        + request(b"GET /readyz HTTP/1.1", b"Origin: null"),
        (200, 200, 403, 403, 200),
        5,
    ),
]
CORPUS.append(
    Case(
        "body-then-aiohttp",
        request(b"GET /healthz HTTP/1.1", b"Content-Length: 5", body=b"hello")
        + request(b"POST /v1/token/churn/refresh HTTP/1.1", b"Content-Length: 2", body=b"{}"),
        (200, 200, 200),
        1,
    )
)
# Cases sent again split in two at every byte, then one byte at a time: pipelined ones,
# whose answers do not depend on how the broker reads them...
SPLIT = ["head-then-get", "body-on-get", "leading-line-ends", "pipelined-then-aiohttp"]
SPLIT += ["encoded-body", "pipelined-door-only", "body-then-aiohttp"]
# ...and one that does: a read llhttp finds malformed is refused whole by either path.
READ_BY_READ = ["token-then-junk"]


def differential_config(emulator: Emulator, short_dir: Path) -> str:
    """fraud and churn open to all, `locked` for another user on the socket and an API key
    on TCP, `mine` for this test's own user on the socket only."""
    text = config_text(emulator, short_dir)
    digest = hashlib.sha256(API_KEY).hexdigest()
    for name, access in (
        ("locked", 'allow_users = [65534]\napi_keys = ["scorer"]'),
        ("mine", f"allow_users = [{os.getuid()}]"),
    ):
        text += (
            f'\n[[service]]\nname = "{name}"\nsubscription_id = "{demo.SUBSCRIPTION_ID}"\n'
            f'resource_group = "{demo.RESOURCE_GROUP}"\nworkspace = "{demo.WORKSPACE}"\n'
            f'web_service = "{demo.TOKEN_SERVICE}"\n{access}\n'
        )
    return text + f'\n[api_key.scorer]\nsha256 = "{digest}"\n'


def switch(daemon: Daemon, front_door: bool) -> None:
    """Serve the connections opened from now on through the front door, or not: a reload."""
    listen = dataclasses.replace(daemon.config.listen, front_door=front_door)
    assert daemon.listeners.reconfigure(listen)  # applied at once, no restart needed


async def both_paths(
    daemon: Daemon, listener: str, parts: list[bytes], logs: io.StringIO
) -> tuple[bytes, bytes]:
    """What the front door answers to `parts`, and what aiohttp's path answers; each path
    must log the same refusals."""
    answers, denials = [], []
    for front_door in (True, False):
        switch(daemon, front_door)
        start = logs.getvalue().count("access.denied")
        answers.append(await exchange(daemon, listener, parts))
        denials.append(logs.getvalue().count("access.denied") - start)
    assert denials[0] == denials[1], (denials, parts[0][:200])
    return answers[0], answers[1]


@pytest.mark.parametrize("listener", LISTENERS)
async def test_both_paths_answer_the_corpus_alike(
    start_broker: StartBroker,
    emulator: Emulator,
    short_dir: Path,
    listener: str,
    logs: io.StringIO,
) -> None:
    """Every case gets the same answers, byte for byte but for Date and Server, from the
    front door and from aiohttp, the statuses expected, and as many answers from the front
    door itself as the case says."""
    broker = await start_broker(differential_config(emulator, short_dir))
    await broker.settled()
    for case in CORPUS:
        door, behind = await both_paths(broker.daemon, listener, [case.data + case.then], logs)
        assert normalized(door) == normalized(behind) or not case.same_body, case.id
        assert tuple(statuses(door)) == case.expected(listener), (case.id, door[:300])
        assert without_server(door) - without_server(behind) == case.door, (case.id, door[:300])


@pytest.mark.parametrize("listener", LISTENERS)
async def test_both_paths_answer_alike_when_the_same_read_comes_again(
    start_broker: StartBroker,
    emulator: Emulator,
    short_dir: Path,
    listener: str,
    logs: io.StringIO,
) -> None:
    """Each case's bytes sent three times, each time read on its own, then its closing
    request: the front door sends its earlier answers again for bytes it answered whole,
    and both paths give the same answers, byte for byte but for Date and Server."""
    broker = await start_broker(differential_config(emulator, short_dir))
    await broker.settled()
    for case in CORPUS:
        if not case.then:
            continue  # the case ends the connection: nothing after it is read
        parts = [case.data] * 3 + [case.then]
        door, behind = await both_paths(broker.daemon, listener, parts, logs)
        assert normalized(door) == normalized(behind) or not case.same_body, case.id
        assert statuses(door) == statuses(behind), (case.id, door[:300])
        if case.id == "token":
            assert without_server(door) == 4, door[:300]  # every answer the front door's


@pytest.mark.parametrize("listener", LISTENERS)
async def test_both_paths_answer_alike_however_the_bytes_are_split(
    start_broker: StartBroker,
    emulator: Emulator,
    short_dir: Path,
    listener: str,
    logs: io.StringIO,
) -> None:
    """Pipelined cases split in two at every byte (each part read by the broker before the
    next is sent) and sent a byte at a time get from both paths the answers they get whole,
    as many from the front door itself; a malformed one gets the same answers from both."""
    broker = await start_broker(differential_config(emulator, short_dir))
    await broker.settled()
    cases = {case.id: case for case in CORPUS}
    for name in SPLIT + READ_BY_READ:
        data = cases[name].data + cases[name].then
        whole, _ = await both_paths(broker.daemon, listener, [data], logs)
        splits = [[data[:at], data[at:]] for at in range(1, len(data))]
        for parts in [*splits, [data[at : at + 1] for at in range(len(data))]]:
            door, behind = await both_paths(broker.daemon, listener, parts, logs)
            where = (name, len(parts[0]), len(parts))
            assert normalized(door) == normalized(behind), where
            if name in SPLIT:
                assert normalized(door) == normalized(whole), where
                assert without_server(door) == without_server(whole), where
