"""`GET /v1/token/{service}?watch=true`: the credential at once, each new one, and heartbeats."""

from __future__ import annotations

import asyncio
import io
import json

import aiohttp
import pytest

from broker.emulator import Emulator
from broker.emulator import seed as demo
from broker.server import routes
from tests.e2e.conftest import Broker, StartBroker

pytestmark = pytest.mark.timeout(30)


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


async def test_watch_sends_heartbeats(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between tokens, comment lines keep the connection visibly alive."""
    monkeypatch.setattr(routes, "SSE_HEARTBEAT_S", 0.05)
    broker = await start_broker(services={"fraud": demo.TOKEN_SERVICE})
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
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch, logs: io.StringIO
) -> None:
    """A watcher that disconnects ends its stream at the next write: `watch.client_left` at
    debug, counted under status 499, no error record and no piece of the token logged."""
    monkeypatch.setattr(routes, "SSE_HEARTBEAT_S", 0.05)
    broker = await start_broker(services={"fraud": demo.TOKEN_SERVICE})
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
