"""Request bodies in any Content-Encoding, and guard headers holding bytes outside ASCII, on
both listeners. The broker's own routes refuse an encoded body with a JSON 400, the proxy
passes it on as it came; no answer is a local 5xx, and nothing reaches the log (the
`still_up` fixture searches it after every test)."""

from __future__ import annotations

import gzip
import hashlib
import zlib

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.fuzz.harness import (
    ANY_SERVICE,
    LISTENERS,
    SERVICES,
    TEST_TIMEOUT_S,
    Reply,
    Target,
    assert_aiohttp_refusal,
    assert_error_shape,
    assert_no_leak,
    assert_not_5xx,
    exchange,
)

pytestmark = [pytest.mark.fuzz, pytest.mark.timeout(TEST_TIMEOUT_S)]

NAMES = sorted(SERVICES)
ENCODINGS = ["gzip", "GZIP", "deflate", "br", "identity", " identity ", "x-junk", "gzip, gzip", ""]
ROUTES = ["/healthz", "/v1/token/{}/refresh", "/v1/services", "/v1/proxy/{}?report=true"]
# The emulator, in this process, logs its own crash on a body it cannot decode, which the
# checks after each test would take for the broker's: through the proxy go only bodies it
# decodes (corrupt ones are tests/e2e/test_proxy.py's).
PROXIED = ["gzip", "GZIP", "identity", " identity "]


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, bytes]:
    """A route (with a service in it), a Content-Encoding and a body."""
    route = draw(st.sampled_from(ROUTES)).format(draw(st.sampled_from(NAMES)))
    if not route.startswith("/v1/proxy/"):
        return route, draw(st.sampled_from(ENCODINGS)), draw(bodies())
    encoding = draw(st.sampled_from(PROXIED))
    data = draw(st.binary(max_size=2048))
    return route, encoding, gzip.compress(data) if "gzip" in encoding.lower() else data


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """Random bytes, or random bytes compressed, whole or cut short or with a byte changed."""
    data = draw(st.binary(min_size=1, max_size=2048))
    kind = draw(st.sampled_from(["raw", "gzip", "deflate", "cut", "flipped"]))
    if kind == "raw":
        return data
    packed = zlib.compress(data) if kind == "deflate" else gzip.compress(data)
    if kind == "cut":
        return packed[: draw(st.integers(1, max(1, len(packed) - 1)))]
    if kind == "flipped":
        at = draw(st.integers(0, len(packed) - 1))
        return packed[:at] + bytes([packed[at] ^ 0xFF]) + packed[at + 1 :]
    return packed


def post(target: Target, listener: str, path: str, encoding: str, body: bytes) -> Reply | None:
    head = [
        b"POST " + path.encode() + b" HTTP/1.1",
        b"Host: localhost",
        b"Metadata: true",
        b"Content-Encoding: " + encoding.encode(),
        b"Content-Length: %d" % len(body),
        b"Connection: close",
    ]
    return exchange(target, listener, b"\r\n".join([*head, b"", b""]) + body)


def decoded(encoding: str, body: bytes) -> bytes | None:
    """What a scoring host that decodes gzip reads from `body`, when it can tell."""
    name = encoding.strip().lower()
    if name == "identity":
        return body
    if name == "gzip":
        try:
            return gzip.decompress(body)
        except (OSError, EOFError, zlib.error):
            return None
    return None


@pytest.mark.parametrize("listener", LISTENERS)
@given(sent=requests())
@example(sent=("/healthz", "gzip", b"not gzip at all"))
@example(sent=("/v1/token/fraud/refresh", "br", b"\xff" * 40))
@example(sent=("/v1/proxy/fraud?report=true", "gzip", gzip.compress(b"\nCONNECT x\n")))
@example(sent=("/v1/proxy/churn?report=true", "identity", b"x\nCONNECT y HTTP/1.1\r\n"))
def test_encoded_bodies(broker: Target, listener: str, sent: tuple[str, str, bytes]) -> None:
    """An encoded body on the broker's own routes is a JSON 400 `encoded_body` (an identity
    one is served); on the proxy it reaches the scoring host as sent, and no local 5xx
    comes back whatever the host makes of it."""
    path, encoding, body = sent
    reply = post(broker, listener, path, encoding, body)
    assert reply is not None
    service = path.split("/")[3] if "refresh" in path else None
    assert_no_leak(reply, broker.credentials(), service)
    if not path.startswith("/v1/proxy/"):
        assert_not_5xx(reply)
        if encoding.strip().lower() != "identity":
            assert_error_shape(reply)
            assert reply.status == 400 and reply.json()["error"] == "encoded_body", reply
        else:
            assert reply.status in (200, 405), reply  # /v1/services takes no POST
        return
    local_failure = reply.is_json and reply.status >= 500 and "error" in reply.json()
    assert not local_failure, reply
    expected = decoded(encoding, body)
    if expected is not None:
        assert reply.status == 200, reply
        assert reply.json()["sha256"] == hashlib.sha256(expected).hexdigest(), reply


GUARD_HEADERS = ["Metadata", "Host", "X-Token-Broker-Key", "X-IDENTITY-HEADER", "Authorization"]
HIGH_BYTES = st.binary(min_size=1, max_size=12).map(lambda b: bytes(0x80 | x for x in b))


@pytest.mark.parametrize("listener", LISTENERS)
@given(
    service=st.sampled_from(NAMES),
    name=st.sampled_from(GUARD_HEADERS),
    prefix=st.sampled_from([b"", b"true", b"localhost", b"Bearer ", b"tbk_"]),
    high=HIGH_BYTES,
    route=st.sampled_from(["/v1/token/{}", "/msi/token?api-version=2019-08-01", "/healthz"]),
)
@example(
    service="fraud", name="X-Token-Broker-Key", prefix=b"tbk_", high=b"\xff", route="/v1/token/{}"
)
@example(service="fraud", name="Metadata", prefix=b"true", high=b"\xa0", route="/v1/token/{}")
@example(service="fraud", name="Host", prefix=b"localhost", high=b"\xc3\xa9", route="/healthz")
def test_guard_headers_outside_ascii(
    broker: Target, listener: str, service: str, name: str, prefix: bytes, high: bytes, route: str
) -> None:
    """A guard or credential header holding bytes outside ASCII gets a 4xx (or is served
    when the header does not matter there), never a 5xx and never a credential."""
    value = prefix + high
    lines = [b"GET " + route.format(service).encode() + b" HTTP/1.1"]
    if name != "Host":
        lines.append(b"Host: localhost")
    if name != "Metadata":
        lines.append(b"Metadata: true")
    lines += [name.encode() + b": " + value, b"Connection: close"]
    reply = exchange(broker, listener, b"\r\n".join([*lines, b"", b""]))
    assert_not_5xx(reply)
    assert_no_leak(reply, broker.credentials(), ANY_SERVICE)
    if reply is None or not reply.is_json:
        assert_aiohttp_refusal(reply)
    elif reply.status >= 400:
        assert_error_shape(reply)
    if name == "Metadata" and route.startswith("/v1/") and reply is not None:
        assert reply.status == 400 and reply.json()["error"] == "missing_metadata_header"
