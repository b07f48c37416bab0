"""The front door's own behaviour, over both listeners: what it answers itself and keeps,
when it gives a connection to aiohttp, and the limits it holds connections to meanwhile.

aiohttp names itself in a Server header and the front door does not, which is how these
tests tell who answered. tests/e2e/test_front_door_differential.py compares both paths.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import time
from pathlib import Path
from typing import cast

import pytest

from broker.config import load_config
from broker.emulator import Emulator
from broker.server import front_answers
from broker.server.front_answers import Answers
from broker.server.front_door import FrontDoor
from tests.conftest import config_text
from tests.e2e.conftest import LISTENERS, Broker, StartBroker
from tests.e2e.wire import admitted, connect, exchange, statuses, without_server

pytestmark = pytest.mark.timeout(60)

TOKEN = b"GET /v1/token/fraud HTTP/1.1\r\nHost: localhost\r\nMetadata: true\r\n\r\n"
HEALTH = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"


def with_listen(emulator: Emulator, short_dir: Path, listen: str) -> str:
    text = config_text(emulator, short_dir)
    return text.replace("[listen.unix]\n", f"[listen]\n{listen}\n\n[listen.unix]\n", 1)


async def answer(reader: asyncio.StreamReader) -> bytes:
    """One answer off a connection, framed by its Content-Length (every answer has one)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = int(head.split(b"Content-Length: ", 1)[1].split(b"\r\n", 1)[0])
    return head + await asyncio.wait_for(reader.readexactly(length), 10)


async def metric(broker: Broker, sample: str) -> float:
    for line in (await broker.client().get("/metrics")).text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.parametrize("listener", LISTENERS)
async def test_keep_alive_requests_are_answered_by_the_front_door(
    start_broker: StartBroker, listener: str
) -> None:
    """Requests sent one after another on one kept-alive connection are each answered by
    the front door, with a Date and the route's content type, and the connection stays."""
    broker = await start_broker()
    await broker.settled()
    reader, writer = await connect(broker.daemon, listener)
    for request, kind in [
        (TOKEN, b"application/json"),
        (TOKEN.replace(b"fraud", b"churn?format=header"), b"text/plain"),
        (HEALTH, b"application/json; charset=utf-8"),
        (HEALTH.replace(b"healthz", b"readyz"), b"application/json; charset=utf-8"),
    ]:
        writer.write(request)
        reply = await answer(reader)
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n"), reply[:200]
        assert b"\r\nContent-Type: " + kind + b"\r\n" in reply
        assert b"\r\nDate: " in reply and b"\r\nServer: " not in reply
        assert b"\r\nConnection: " not in reply
    writer.write(b"GET /v1/services HTTP/1.1\r\nHost: localhost\r\nMetadata: true\r\n\r\n")
    assert b"\r\nServer: " in await answer(reader)  # aiohttp's now, on the same connection
    writer.write(TOKEN)
    assert b"\r\nServer: " in await answer(reader)  # and from then on
    writer.close()


async def test_a_credential_not_yet_fetched_is_waited_for_behind_the_front_door(
    start_broker: StartBroker, emulator: Emulator
) -> None:
    """A token request while the first fetch is slow goes to aiohttp, which waits for the
    fetch and answers 200; a request after the fetch, on a new connection, is the door's."""
    emulator.state.fail("mms.token", kind="slow", delay_s=1.0, times=1)
    broker = await start_broker()
    reader, writer = await connect(broker.daemon, "tcp")
    writer.write(TOKEN)
    first = await answer(reader)
    assert first.startswith(b"HTTP/1.1 200 ") and b"\r\nServer: " in first
    writer.close()
    later = await exchange(
        broker.daemon, "tcp", [TOKEN.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")]
    )
    assert statuses(later) == [200] and without_server(later) == 1


@pytest.mark.parametrize("listener", LISTENERS)
async def test_http_1_0_and_connection_close_end_the_connection(
    start_broker: StartBroker, listener: str
) -> None:
    """HTTP/1.0 is answered as HTTP/1.0 and closed, unless it asks for keep-alive (then the
    answer says so and the connection stays); HTTP/1.1 with Connection: close is closed."""
    broker = await start_broker()
    await broker.settled()
    old = await exchange(broker.daemon, listener, [TOKEN.replace(b"HTTP/1.1", b"HTTP/1.0")])
    assert old.startswith(b"HTTP/1.0 200 OK\r\n") and b"\r\nServer: " not in old
    closing = TOKEN.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    closed = await exchange(broker.daemon, listener, [closing])
    assert statuses(closed) == [200] and b"\r\nConnection: close\r\n" in closed
    reader, writer = await connect(broker.daemon, listener)
    writer.write(
        HEALTH.replace(b"HTTP/1.1", b"HTTP/1.0").replace(
            b"\r\n\r\n", b"\r\nConnection: keep-alive\r\n\r\n"
        )
    )
    kept = await answer(reader)
    assert kept.startswith(b"HTTP/1.0 200 ") and b"\r\nConnection: keep-alive\r\n" in kept
    writer.write(HEALTH)
    assert (await answer(reader)).startswith(b"HTTP/1.1 200 ")
    writer.close()


@pytest.mark.parametrize("listener", LISTENERS)
async def test_head_and_bodies_on_get_keep_pipelined_answers_in_step(
    start_broker: StartBroker, listener: str
) -> None:
    """A HEAD gets the GET's headers and no body, a GET's body is read and passed over,
    and the answers to requests pipelined after them are each whole and in order."""
    broker = await start_broker()
    await broker.settled()
    with_body = TOKEN.replace(b"\r\n\r\n", b"\r\nContent-Length: 11\r\n\r\nhello world")
    head = TOKEN.replace(b"GET ", b"HEAD ")
    replies = await exchange(
        broker.daemon,
        listener,
        [head + with_body + HEALTH.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")],
    )
    assert statuses(replies) == [200, 200, 200] and without_server(replies) == 3
    first, rest = replies.split(b"\r\n\r\n", 1)
    length = int(first.split(b"Content-Length: ", 1)[1].split(b"\r\n")[0])
    assert length > 500 and rest.startswith(b"HTTP/1.1 200 OK\r\n")  # no body after HEAD
    token_body = rest.split(b"\r\n\r\n", 1)[1][:length]
    assert token_body.startswith(b'{"service": "fraud"') and token_body.endswith(b"}")


@pytest.mark.parametrize("listener", LISTENERS)
async def test_silent_and_trickling_connections_are_closed_after_the_idle_timeout(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, listener: str
) -> None:
    """A connection that sends nothing, one that trickles a request line, and one quiet
    after an answer are each closed idle_timeout_s (1 s) after it began or was answered."""
    broker = await start_broker(with_listen(emulator, short_dir, "idle_timeout_s = 1"))
    await broker.settled()
    silent = await connect(broker.daemon, listener)
    trickling = await connect(broker.daemon, listener)
    answered = await connect(broker.daemon, listener)
    answered[1].write(HEALTH)
    await answer(answered[0])
    started = time.monotonic()
    for byte in b"GET /v1/tok":
        trickling[1].write(bytes([byte]))
        await asyncio.sleep(0.05)  # a byte every 50 ms: trickling, as a slow client would
    for reader, writer in (silent, trickling, answered):
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    assert time.monotonic() - started < 4


@pytest.mark.parametrize("listener", LISTENERS)
async def test_a_get_whose_body_stalls_is_cut(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, listener: str
) -> None:
    """A token request declaring a 10-byte body that never comes is cut after
    idle_timeout_s and counted as a stalled body, as behind the door."""
    broker = await start_broker(with_listen(emulator, short_dir, "idle_timeout_s = 1"))
    await broker.settled()
    reader, writer = await connect(broker.daemon, listener)
    writer.write(TOKEN.replace(b"\r\n\r\n", b"\r\nContent-Length: 10\r\n\r\nabc"))
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    cut = f'token_broker_connections_cut_total{{listener="{listener}",reason="stalled_body"}}'
    assert await metric(broker, cut) == 1


async def test_a_client_that_does_not_read_is_held_to_a_bound(start_broker: StartBroker) -> None:
    """5,000 pipelined token requests from a client that reads nothing leave at most 1 MiB
    of answers in the broker (past a bound, aiohttp's writer waits for the client); once
    it reads, every answer comes, in order."""
    broker = await start_broker()
    await broker.settled()
    before = set(broker.daemon.listeners.connections)
    reader, writer = await connect(broker.daemon, "unix")
    connection = await admitted(broker.daemon, before)
    client = cast(asyncio.Transport, writer.transport)
    client.pause_reading()
    count = 5000
    closing = TOKEN.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    writer.write(TOKEN * (count - 1) + closing)
    most = 0
    for _ in range(2000):  # the broker runs on this loop: let it serve what it will
        most = max(most, cast(asyncio.Transport, connection.transport).get_write_buffer_size())
        await asyncio.sleep(0)
    assert not connection.front_door, "the flood stays the front door's"
    assert most < 1 << 20, most
    client.resume_reading()
    received = await asyncio.wait_for(reader.read(), 30)
    assert statuses(received) == [200] * count
    writer.close()


async def test_front_door_answers_are_counted_by_route(start_broker: StartBroker) -> None:
    """Tokens, refusals and health checks the front door answers are counted in
    token_broker_requests_total under their route template, as aiohttp's are."""
    broker = await start_broker()
    await broker.settled()
    route = 'token_broker_requests_total{route="/v1/token/{service}",status="%s"}'
    before = {status: await metric(broker, route % status) for status in ("200", "400")}
    health = await metric(broker, 'token_broker_requests_total{route="/healthz",status="200"}')
    no_metadata = TOKEN.replace(b"Metadata: true\r\n", b"")
    replies = await exchange(
        broker.daemon,
        "tcp",
        [TOKEN * 3 + no_metadata + HEALTH.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")],
    )
    assert statuses(replies) == [200, 200, 200, 400, 200] and without_server(replies) == 5
    assert await metric(broker, route % "200") == before["200"] + 3
    assert await metric(broker, route % "400") == before["400"] + 1
    assert (
        await metric(broker, 'token_broker_requests_total{route="/healthz",status="200"}')
        == health + 1
    )


async def token_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(TOKEN)
    return await answer(reader)


@pytest.mark.parametrize("listener", LISTENERS)
async def test_the_same_request_again_is_answered_and_counted_each_time(
    start_broker: StartBroker, listener: str
) -> None:
    """A request sent again and again, byte for byte, on one connection gets the front
    door's same answer each time, and each is counted."""
    broker = await start_broker()
    await broker.settled()
    route = 'token_broker_requests_total{route="/v1/token/{service}",status="200"}'
    before = await metric(broker, route)
    reader, writer = await connect(broker.daemon, listener)
    replies = [await token_answer(reader, writer) for _ in range(5)]
    writer.close()
    bodies = {reply.split(b"\r\n\r\n", 1)[1] for reply in replies}
    assert len(bodies) == 1 and all(b"\r\nServer: " not in reply for reply in replies)
    assert await metric(broker, route) == before + 5


async def test_a_pipelined_burst_is_answered_and_not_kept(start_broker: StartBroker) -> None:
    """A read of 20 pipelined token requests (about 20 KiB of answers) is answered whole
    and not kept to answer again: what a connection keeps for that stays small."""
    broker = await start_broker()
    await broker.settled()
    before = set(broker.daemon.listeners.connections)
    reader, writer = await connect(broker.daemon, "unix")
    connection = await admitted(broker.daemon, before)
    door = cast(FrontDoor, connection.transport.get_protocol())
    writer.write(TOKEN * 20)
    replies = [await answer(reader) for _ in range(20)]
    assert all(b"\r\nServer: " not in reply for reply in replies)
    assert door._memo is None
    await token_answer(reader, writer)
    writer.close()
    assert door._memo is not None and door._memo.read == TOKEN  # one request is kept


async def test_the_same_request_again_gets_a_new_credential_at_once(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the credential changes, the same request bytes get the new one: an answer is
    sent again only while the credential it holds is the one served."""
    broker = await start_broker()
    await broker.settled()
    second = time.time()  # the Date's second stays, so only the credential's change counts
    monkeypatch.setattr(front_answers, "wall_clock", lambda: second)
    reader, writer = await connect(broker.daemon, "unix")
    first = await token_answer(reader, writer)
    await broker.daemon.store.fetch("fraud")
    token = broker.daemon.store.entry("fraud").token
    assert token is not None and token.value.encode() not in first
    again = await token_answer(reader, writer)
    writer.close()
    assert token.value.encode() in again and b"\r\nServer: " not in again


async def test_the_same_request_again_is_refused_once_a_reload_takes_access_away(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path
) -> None:
    """A reload that no longer lets the connection's user fetch the service refuses the
    same request bytes on a connection opened before it, at once."""
    broker = await start_broker(
        config_text(emulator, short_dir, extra_service_keys=f"allow_users = [{os.getuid()}]")
    )
    await broker.settled()
    reader, writer = await connect(broker.daemon, "unix")
    assert (await token_answer(reader, writer)).startswith(b"HTTP/1.1 200 OK\r\n")
    path = short_dir / "broker.toml"
    path.write_text(
        config_text(emulator, short_dir, extra_service_keys=f"allow_users = [{os.getuid() + 1}]")
    )
    await broker.daemon.reload(load_config(path))
    refused = await token_answer(reader, writer)
    writer.close()
    assert refused.startswith(b"HTTP/1.1 403 Forbidden\r\n"), refused[:200]
    assert b"\r\nServer: " not in refused


async def test_the_same_request_again_is_not_answered_past_its_credentials_life(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An answer is never sent again once its credential may no longer be served: with the
    broker's clock past the credential's last moment, the same request bytes go to
    aiohttp's route, which fetches a new one."""
    broker = await start_broker()
    await broker.settled()
    store = broker.daemon.store
    reader, writer = await connect(broker.daemon, "unix")
    first = await token_answer(reader, writer)
    ahead = store.serve_until(store.entry("fraud")) - time.time() + 0.001
    monkeypatch.setattr(store, "clock", lambda: time.time() + ahead)
    second = await token_answer(reader, writer)
    writer.close()
    assert b"\r\nServer: " in second  # aiohttp's: a new credential, or a 503 while none is
    assert second.split(b"\r\n\r\n", 1)[1] != first.split(b"\r\n\r\n", 1)[1]


@pytest.mark.parametrize("listener", LISTENERS)
async def test_stopping_closes_the_connections_the_front_door_holds(
    start_broker: StartBroker, listener: str
) -> None:
    """A kept-alive connection the front door holds is closed as the broker stops, at
    once: it is in the middle of no answer, so it waits for no grace period."""
    broker = await start_broker()
    await broker.settled()
    reader, writer = await connect(broker.daemon, listener)
    writer.write(HEALTH)
    await answer(reader)
    started = time.monotonic()
    await broker.daemon.stop()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert time.monotonic() - started < 2
    writer.close()


async def test_a_reload_turns_the_front_door_off_for_new_connections(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path
) -> None:
    """`[listen] front_door = false` applied by a reload sends new connections to aiohttp,
    with no restart asked for; connections already open keep their front door."""
    broker = await start_broker()
    await broker.settled()
    reader, writer = await connect(broker.daemon, "tcp")
    path = short_dir / "broker.toml"
    path.write_text(with_listen(emulator, short_dir, "front_door = false"))
    config = load_config(path)
    assert not dataclasses.replace(config.listen).front_door
    await broker.daemon.reload(config)
    closing = TOKEN.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    after = await exchange(broker.daemon, "tcp", [closing])
    assert statuses(after) == [200] and b"\r\nServer: " in after
    writer.write(TOKEN)
    assert b"\r\nServer: " not in await answer(reader)
    writer.close()


async def test_a_fault_in_the_front_door_leaves_the_request_to_aiohttp(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch, logs: io.StringIO
) -> None:
    """Should the front door's answer raise, the request goes to aiohttp, which answers it,
    and the fault is logged as front_door.crashed with no credential in the line."""
    broker = await start_broker()
    await broker.settled()

    def broken(*args: object) -> bytes:
        raise RuntimeError("a fault in the front door")

    monkeypatch.setattr(Answers, "answer", broken)
    closing = TOKEN.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    replies = await exchange(broker.daemon, "unix", [closing])
    assert statuses(replies) == [200] and b"\r\nServer: " in replies
    crashed = [line for line in logs.getvalue().splitlines() if "front_door.crashed" in line]
    assert len(crashed) == 1 and '"reason": "RuntimeError"' in crashed[0]
    token = broker.daemon.store.entry("fraud").token
    assert token is not None and token.value not in logs.getvalue()


@pytest.mark.parametrize("listener", LISTENERS)
async def test_a_long_request_head_in_pieces_goes_to_aiohttp(
    start_broker: StartBroker, listener: str
) -> None:
    """A 36 KiB request head (60 headers of 600 bytes, inside aiohttp's limits) is answered
    by the front door when it comes in one read, and handed to aiohttp, which answers it,
    when its first 33 KiB come alone: the front door keeps no more than 32 KiB of a head."""
    broker = await start_broker()
    await broker.settled()
    padding = b"".join(b"X-Pad-%02d: %s\r\n" % (i, b"p" * 600) for i in range(60))
    request = TOKEN.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n" + padding + b"\r\n")
    whole = await exchange(broker.daemon, listener, [request])
    assert statuses(whole) == [200] and without_server(whole) == 1
    pieces = await exchange(broker.daemon, listener, [request[: 33 * 1024], request[33 * 1024 :]])
    assert statuses(pieces) == [200] and without_server(pieces) == 0
