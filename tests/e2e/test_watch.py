"""`GET /v1/token/{service}?watch=true`: the credential at once, each new one, and heartbeats."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from pathlib import Path

import aiohttp
import pytest

from broker.config import load_config
from broker.emulator import Emulator
from broker.emulator import seed as demo
from tests.conftest import config_text
from tests.e2e.conftest import Broker, StartBroker

pytestmark = pytest.mark.timeout(30)

FAST_HEARTBEAT = "watch_heartbeat_s = 0.05"


async def next_event(stream: aiohttp.StreamReader) -> str:
    """The next SSE event or comment block, as text."""
    lines = []
    while (line := (await stream.readline()).decode()) != "\n":
        lines.append(line)
    return "".join(lines)


async def open_watch(broker: Broker, session: aiohttp.ClientSession) -> aiohttp.ClientResponse:
    resp = await session.get(
        "http://localhost/v1/token/fraud?watch=true", headers={"Metadata": "true"}
    )
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
    return resp


async def test_watch_pushes_each_new_token(start_broker: StartBroker) -> None:
    """The stream starts with the current token and carries the next one when it is fetched."""
    broker = await start_broker(services={"fraud": demo.TOKEN_SERVICE})
    connector = aiohttp.UnixConnector(path=str(broker.daemon.unix_path))
    async with aiohttp.ClientSession(connector=connector) as session:
        resp = await open_watch(broker, session)
        first = await asyncio.wait_for(next_event(resp.content), 10)
        assert first.startswith("event: token\n")
        token = json.loads(first.split("data: ", 1)[1])["access_token"]
        await broker.daemon.store.fetch("fraud")
        second = await asyncio.wait_for(next_event(resp.content), 10)
        assert json.loads(second.split("data: ", 1)[1])["access_token"] != token
        resp.close()


async def test_watch_follows_scheduled_refreshes(
    start_broker: StartBroker, emulator: Emulator
) -> None:
    """With 3-second tokens, each scheduled refresh reaches the stream as the token the
    store now holds. The heartbeat is 15 s and the test ends long before: every event came
    from the store's change notification, not from a poll."""
    emulator.state.set_token_lifetime(3.0, refresh_after_s=1.5)
    broker = await start_broker(services={"fraud": demo.TOKEN_SERVICE})
    fetched: list[str] = []
    broker.daemon.store.on_result(
        lambda entry: fetched.append(entry.token.value) if entry.token is not None else None
    )
    connector = aiohttp.UnixConnector(path=str(broker.daemon.unix_path))
    async with aiohttp.ClientSession(connector=connector) as session:
        resp = await open_watch(broker, session)
        pushed = []
        for _ in range(4):
            event = await asyncio.wait_for(next_event(resp.content), 10)
            assert event.startswith("event: token\n"), event
            pushed.append(json.loads(event.split("data: ", 1)[1])["access_token"])
        resp.close()
    assert len(set(pushed)) == 4
    # The first event is whatever the store held; then each refresh, in order, none missed.
    start = fetched.index(pushed[1])
    assert pushed[1:] == fetched[start : start + 3]


async def test_watch_sends_heartbeats(start_broker: StartBroker) -> None:
    """Between tokens, comment lines keep the connection visibly alive."""
    broker = await start_broker(services={"fraud": demo.TOKEN_SERVICE}, listen=FAST_HEARTBEAT)
    await broker.settled()  # else a slow first fetch lets a heartbeat come first
    connector = aiohttp.UnixConnector(path=str(broker.daemon.unix_path))
    async with aiohttp.ClientSession(connector=connector) as session:
        resp = await open_watch(broker, session)
        events = [await asyncio.wait_for(next_event(resp.content), 10) for _ in range(4)]
        assert events[0].startswith("event: token\n")
        assert ": heartbeat\n" in events[1:]
        resp.close()


async def test_watch_of_unknown_service_is_404(start_broker: StartBroker) -> None:
    """Watching a service that is not configured is a JSON 404, not an empty stream."""
    broker = await start_broker()
    reply = await broker.client().get("/v1/token/nope?watch=true")
    assert reply.status == 404 and reply.json()["error"] == "unknown_service"


async def test_a_watcher_leaving_ends_the_stream_quietly(
    start_broker: StartBroker, logs: io.StringIO
) -> None:
    """A watcher that disconnects ends its stream at the next write: `watch.client_left` at
    debug, counted under status 499, no error record and no piece of the token logged."""
    broker = await start_broker(services={"fraud": demo.TOKEN_SERVICE}, listen=FAST_HEARTBEAT)
    reader, writer = await asyncio.open_unix_connection(str(broker.daemon.unix_path))
    writer.write(
        b"GET /v1/token/fraud?watch=true HTTP/1.1\r\nHost: localhost\r\nMetadata: true\r\n\r\n"
    )
    await asyncio.wait_for(reader.readuntil(b"event: token\n"), 10)
    event = await asyncio.wait_for(reader.readuntil(b"\n\n"), 10)
    token = json.loads(event.split(b"data: ", 1)[1])["access_token"]
    writer.close()
    await writer.wait_closed()

    counted = 'token_broker_requests_total{route="/v1/token/{service}",status="%s"}'

    async def counted_as_left() -> str:
        while counted % "499" + " 1.0" not in (
            text := (await broker.client().get("/metrics")).text
        ):
            pass  # each look is a request to the broker; the deadline below bounds them
        return text

    metrics = await asyncio.wait_for(counted_as_left(), 10)
    assert counted % "500" not in metrics
    text = logs.getvalue()
    assert '"watch.client_left"' in text
    assert "request.crashed" not in text and '"level": "error"' not in text
    middle = len(token) // 2
    for piece in (token[:20], token[middle : middle + 20], token[-20:]):
        assert piece not in text


async def read_until_end(stream: aiohttp.StreamReader) -> dict[str, str]:
    """Skip token events and heartbeats up to the stream's `end` event; its data."""
    while not (event := await next_event(stream)).startswith("event: end\n"):
        assert event.startswith(("event: token\n", ": heartbeat")), event
    ended: dict[str, str] = json.loads(event.split("data: ", 1)[1])
    return ended


def guarded_text(emulator: Emulator, short_dir: Path, keys: str, listen: str = "") -> str:
    text = config_text(
        emulator,
        short_dir,
        services={"fraud": demo.TOKEN_SERVICE},
        extra_service_keys=keys,
        listen=listen,
    )
    digest = hashlib.sha256(API_KEY.encode()).hexdigest()
    return text + f'\n[api_key.scorer]\nsha256 = "{digest}"\n'


async def reload_with(broker: Broker, path: Path, text: str) -> None:
    path.write_text(text)
    await broker.daemon.reload(load_config(path))


API_KEY = "watch-key-for-tests-0123456789"


async def test_a_user_removed_from_allow_users_loses_the_open_stream(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path
) -> None:
    """Issue 12, finding 1: a reload that removes the watcher's uid from allow_users ends its
    open stream at once with `event: end` naming access_revoked; no token follows."""
    broker = await start_broker(guarded_text(emulator, short_dir, "allow_users = [0]"))
    connector = aiohttp.UnixConnector(path=str(broker.daemon.unix_path))
    async with aiohttp.ClientSession(connector=connector) as session:
        resp = await open_watch(broker, session)
        assert (await asyncio.wait_for(next_event(resp.content), 10)).startswith("event: token")
        text = guarded_text(emulator, short_dir, "allow_users = [4242]")
        await reload_with(broker, short_dir / "broker.toml", text)
        await broker.daemon.store.fetch("fraud")  # a new token the stream must not carry
        ended = await asyncio.wait_for(read_until_end(resp.content), 10)
        assert ended["reason"] == "access_revoked"
        assert await asyncio.wait_for(resp.content.read(), 10) == b""
    assert (await broker.client().get("/v1/token/fraud")).status == 403


async def test_an_api_key_removed_from_the_service_ends_its_tcp_stream(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path
) -> None:
    """Issue 12, finding 1, on TCP: removing the API key a watcher presented from the
    service's api_keys ends its stream with access_revoked at the reload."""
    keys = 'api_keys = ["scorer"]'
    broker = await start_broker(guarded_text(emulator, short_dir, keys))
    assert broker.daemon.tcp_address is not None
    host, port = broker.daemon.tcp_address
    headers = {"Metadata": "true", "X-Token-Broker-Key": API_KEY}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{host}:{port}/v1/token/fraud?watch=true", headers=headers) as resp,
    ):
        assert resp.status == 200
        assert (await asyncio.wait_for(next_event(resp.content), 10)).startswith("event: token")
        text = guarded_text(emulator, short_dir, "allow_users = [0]")  # no key any more
        await reload_with(broker, short_dir / "broker.toml", text)
        ended = await asyncio.wait_for(read_until_end(resp.content), 10)
        assert ended["reason"] == "access_revoked"
    reply = await broker.client("tcp").get(
        "/v1/token/fraud", headers={"X-Token-Broker-Key": API_KEY}
    )
    assert reply.status == 403


async def test_a_stream_ends_at_its_maximum_age(
    start_broker: StartBroker,
    emulator: Emulator,
    short_dir: Path,
) -> None:
    """A stream lives at most stream_max_age_s on the broker's clock, then ends with
    max_age, so that its client comes back through the guards."""
    listen = f"stream_max_age_s = 600\n{FAST_HEARTBEAT}"
    text = guarded_text(emulator, short_dir, "", listen=listen)
    broker = await start_broker(text)
    connector = aiohttp.UnixConnector(path=str(broker.daemon.unix_path))
    async with aiohttp.ClientSession(connector=connector) as session:
        resp = await open_watch(broker, session)
        events = [await asyncio.wait_for(next_event(resp.content), 10) for _ in range(3)]
        assert not any(e.startswith("event: end") for e in events)
        broker.clock.advance(601)
        ended = await asyncio.wait_for(read_until_end(resp.content), 10)
        assert ended["reason"] == "max_age"


async def test_a_watcher_leaving_frees_its_place_at_once(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path
) -> None:
    """With the 15 s heartbeat, a watcher that disconnects is counted gone (499) and its
    stream's place is free within a second or two, not at the next heartbeat."""
    broker = await start_broker(services={"fraud": demo.TOKEN_SERVICE})
    reader, writer = await asyncio.open_unix_connection(str(broker.daemon.unix_path))
    writer.write(
        b"GET /v1/token/fraud?watch=true HTTP/1.1\r\nHost: localhost\r\nMetadata: true\r\n\r\n"
    )
    await asyncio.wait_for(reader.readuntil(b"event: token\n"), 10)
    writer.close()
    await writer.wait_closed()
    counted = 'token_broker_requests_total{route="/v1/token/{service}",status="499"} 1.0'

    async def counted_as_left() -> None:
        while counted not in (await broker.client().get("/metrics")).text:
            pass  # each look is a request to the broker; the deadline below bounds them

    await asyncio.wait_for(counted_as_left(), 5)
    text = (await broker.client().get("/metrics")).text
    assert 'token_broker_streams_open{listener="unix"} 0.0' in text
    assert 'token_broker_streams_closed_total{listener="unix",reason="client_gone"} 1.0' in text
