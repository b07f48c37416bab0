"""Holding the broker's places: bodies that stall part-way and floods of watch streams and
silent connections, on both listeners. Stalled connections are cut within the idle
timeout, streams past their share are refused with a JSON 503, a closed watcher's place is
free at once, and a normal client is served on both listeners throughout."""

from __future__ import annotations

import json
import re
import socket
import time

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.fuzz.conftest import IDLE_TIMEOUT_S
from tests.fuzz.harness import (
    LISTENERS,
    TEST_TIMEOUT_S,
    Target,
    assert_token_reply,
    raw_socket,
    request,
)

pytestmark = [pytest.mark.fuzz, pytest.mark.timeout(TEST_TIMEOUT_S)]

# Each example waits out the idle timeout once: fewer of them than the other families.
FEWER = settings(max_examples=max(10, settings().max_examples // 6))
CUT_WITHIN_S = IDLE_TIMEOUT_S + 4.0  # the idle timeout, and slack for a busy machine
ROUTES = [
    b"POST /v1/proxy/fraud/score",
    b"PUT /v1/proxy/churn/",
    b"POST /v1/token/fraud/refresh",
    b"GET /v1/token/fraud2",
    b"POST /v1/services",
]


@st.composite
def stalled_bodies(draw: st.DrawFn) -> bytes:
    """A request whose body stops part-way: declared by Content-Length or chunked, with
    some of it sent (none, a few bytes, all but one)."""
    line = draw(st.sampled_from(ROUTES)) + b" HTTP/1.1\r\nHost: localhost\r\nMetadata: true\r\n"
    declared = draw(st.integers(1, 2000))
    sent = draw(st.sampled_from([0, 1, declared - 1]) | st.integers(0, declared - 1))
    if draw(st.booleans()):
        return line + b"Content-Length: %d\r\n\r\n" % declared + b"x" * sent
    head = line + b"Transfer-Encoding: chunked\r\n\r\n"
    return head + b"%x\r\n" % declared + b"x" * sent


def cut_within(sock: socket.socket, seconds: float) -> bytes:
    """Everything the broker sent before it closed the connection, which it must do in time."""
    deadline = time.monotonic() + seconds
    received = b""
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        except TimeoutError:
            pytest.fail(f"a stalled connection was still open after {seconds} s: {received!r}")
        if not chunk:
            return received
        received += chunk


@pytest.mark.parametrize("listener", LISTENERS)
@FEWER
@given(requests=st.lists(stalled_bodies(), min_size=1, max_size=6))
@example(
    requests=[
        b"POST /v1/proxy/fraud/score HTTP/1.1\r\nHost: localhost\r\n"
        b"Metadata: true\r\nContent-Length: 500\r\n\r\n"
    ]
)
def test_stalled_bodies_are_cut(broker: Target, listener: str, requests: list[bytes]) -> None:
    """Connections whose bodies stall are closed within the idle timeout (an answer first,
    from a route that reads no body, carries no credential but its own), and a normal
    client is served meanwhile on both listeners."""
    socks = [raw_socket(broker, listener) for _ in requests]
    try:
        for sock, data in zip(socks, requests, strict=True):
            sock.sendall(data)
        for each in LISTENERS:
            reply = request(broker, each, "GET", "/v1/token/fraud")
            assert_token_reply(reply, "fraud", broker.credentials())
        credentials = broker.credentials()
        for sock, data in zip(socks, requests, strict=True):
            received = cut_within(sock, CUT_WITHIN_S)
            if received:
                assert re.match(rb"HTTP/1\.1 [1-4]\d\d ", received), received[:200]
            named = (data.split(b" ", 2)[1].split(b"/") + [b""] * 4)[3].decode()  # /v1/x/{service}
            found = {
                n
                for n, values in credentials.items()
                if any(v.encode() in received for v in values)
            }
            assert found <= {named}, f"credentials of {found} in the answer to {data[:60]!r}"
    finally:
        for sock in socks:
            sock.close()


WATCH = b"GET /v1/token/%s?watch=true HTTP/1.1\r\nHost: localhost\r\nMetadata: true\r\n\r\n"


def open_streams_metric(broker: Target) -> float:
    text = request(broker, "unix", "GET", "/metrics", metadata=False).body.decode()
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("token_broker_streams_open{")
    )


@pytest.mark.parametrize("listener", LISTENERS)
@FEWER
@given(
    streams=st.integers(1, 80),
    silent=st.integers(0, 120),
    service=st.sampled_from(["fraud", "churn", "fraud2"]),
)
@example(streams=80, silent=120, service="fraud")
def test_stream_floods_leave_room_for_plain_requests(
    broker: Target, listener: str, streams: int, silent: int, service: str
) -> None:
    """A flood of watch streams and of silent connections on one listener: each watch is
    a stream or a JSON 503 too_many_streams, plain requests are served on both listeners
    meanwhile, and once the flood's connections close no stream is left open."""
    held: list[socket.socket] = []
    try:
        for _ in range(streams):
            sock = raw_socket(broker, listener)
            held.append(sock)
            sock.sendall(WATCH % service.encode())
            head = sock.recv(65536)
            status = head.split(b" ", 2)[1]
            if status == b"503":
                body = head.partition(b"\r\n\r\n")[2]
                assert json.loads(body)["error"] == "too_many_streams", head
            else:
                assert status == b"200" and b"text/event-stream" in head, head[:300]
        held += [raw_socket(broker, listener) for _ in range(silent)]
        for each in LISTENERS:
            reply = request(broker, each, "GET", "/v1/token/churn")
            assert_token_reply(reply, "churn", broker.credentials())
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5  # far below the 15 s heartbeat
    while open_streams_metric(broker) and time.monotonic() < deadline:
        pass  # each look is a request to the broker; the deadline bounds them
    assert open_streams_metric(broker) == 0
