"""Raw bytes on both listeners: junk, broken request lines and line ends, NULs, too many
headers, broken framing. The broker answers 4xx or closes the connection, never a 5xx,
and keeps answering `/healthz` on a new connection after every one."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.fuzz.harness import (
    ANY_SERVICE,
    LISTENERS,
    TEST_TIMEOUT_S,
    Target,
    assert_aiohttp_refusal,
    assert_error_shape,
    assert_no_leak,
    assert_not_5xx,
    exchange,
    healthy,
)

pytestmark = [pytest.mark.fuzz, pytest.mark.timeout(TEST_TIMEOUT_S)]

METHODS = [b"GET", b"POST", b"HEAD", b"PUT", b"OPTIONS", b"CONNECT", b"TRACE", b"PRI", b"get", b""]
REQUEST_TARGETS = [
    b"/v1/token/fraud",
    b"/v1/token/churn?format=header",
    b"/v1/token/fraud2/refresh",
    b"/v1/services",
    b"/healthz",
    b"*",
    b"http://localhost/v1/token/fraud",
    b"localhost:80",
    b"",
]
VERSIONS = [
    b" HTTP/1.1",
    b" HTTP/1.0",
    b"",
    b" HTTP/2.0",
    b" HTTP/0.9",
    b" HTTP/1.1 x",
    b" http/1.1",
]
LINE_ENDS = [b"\r\n", b"\n", b"\r", b"\n\r"]
HEADER_LINES = [
    b"Host: localhost",
    b"Metadata: true",
    b"Content-Length: 5",
    b"Content-Length: -1",
    b"Content-Length: 99999999999999999999",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: gzip, chunked",
    b"Connection: close",
    b"Connection: Upgrade",
    b"Upgrade: websocket",
    b"Expect: 100-continue",
    b"Content-Encoding: gzip",
    b" folded: value",
    b"NoColon",
    b": no-name",
    b"Origin: null",
    b"X-Forwarded-For: 203.0.113.9",
]


@st.composite
def malformed_requests(draw: st.DrawFn) -> bytes:
    """A request built from parts, some of them broken, then damaged byte by byte: NULs
    and junk inserted, bytes dropped or replaced."""
    method = draw(st.sampled_from(METHODS) | st.binary(max_size=8))
    line = method + b" " + draw(st.sampled_from(REQUEST_TARGETS)) + draw(st.sampled_from(VERSIONS))
    headers = draw(st.lists(st.sampled_from(HEADER_LINES) | st.binary(max_size=40), max_size=8))
    if draw(st.integers(0, 7)) == 0:  # now and then, a flood of headers
        headers += [b"X-%d: v" % i for i in range(draw(st.integers(100, 3000)))]
    eol = draw(st.sampled_from(LINE_ENDS))
    data = bytearray(eol.join([line, *headers]) + eol + eol + draw(st.binary(max_size=64)))
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["nul", "insert", "drop", "replace"]))
        if kind == "nul":
            data[at:at] = b"\x00"
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif data:
            at = min(at, len(data) - 1)
            data[at : at + 1] = b"" if kind == "drop" else draw(st.binary(min_size=1, max_size=1))
    return bytes(data)


@pytest.mark.parametrize("listener", LISTENERS)
@given(data=st.binary(max_size=4096))
@example(data=b"")
@example(data=b"\x00" * 64)
@example(data=b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a TLS ClientHello
@example(data=b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")  # the HTTP/2 preface
@example(data=b"\xff" * 70_000)
def test_binary_junk(broker: Target, listener: str, data: bytes) -> None:
    """Arbitrary bytes as a request get a 4xx or a closed connection, never a credential,
    and the broker answers the next connection."""
    reply = exchange(broker, listener, data)
    assert_aiohttp_refusal(reply)
    assert_no_leak(reply, broker.credentials(), None)
    healthy(broker, listener)


@pytest.mark.parametrize("listener", LISTENERS)
@given(data=malformed_requests())
@example(data=b"GET /v1/token/fraud\r\nHost: localhost\r\nMetadata: true\r\n\r\n")
@example(data=b"GET /v1/token/fraud HTTP/1.1\nHost: localhost\nMetadata: true\n\n")
@example(data=b"GET /v1/token/fr\x00aud HTTP/1.1\r\nHost: localhost\r\nMetadata: true\r\n\r\n")
@example(data=b"GET /v1/token/fraud HTTP/1.1\r\n" + b"X: v\r\n" * 5000 + b"\r\n")
@example(data=b"GET /v1/token/fraud HTTP/1.1\r\nHost: localhost\r\nMetadata: true\r\n\r\nGET ")
@example(
    data=b"POST /v1/token/fraud/refresh HTTP/1.1\r\nHost: localhost\r\nMetadata: true\r\n"
    b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nzz\r\n"
)
def test_malformed_requests(broker: Target, listener: str, data: bytes) -> None:
    """A broken request line, line ends, NULs, floods of headers or broken framing get a
    non-5xx answer (a JSON error when the app answers) or a closed connection, a credential
    only in a well-formed token answer, and the broker answers the next connection."""
    reply = exchange(broker, listener, data)
    assert_not_5xx(reply)
    assert_no_leak(reply, broker.credentials(), ANY_SERVICE)
    if reply is not None and reply.status >= 400:
        if reply.is_json:
            assert_error_shape(reply)
        else:
            assert_aiohttp_refusal(reply)
    healthy(broker, listener)
