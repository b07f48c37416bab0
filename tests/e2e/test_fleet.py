"""Fleet mode end to end: real `token-broker run` processes, a real redis-server and the
emulator, with tokens of seconds."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.emulator import Emulator
from broker.emulator import seed as demo
from tests.conftest import CLIENT_SECRET, RedisServer, config_text

pytestmark = pytest.mark.timeout(120)

FLEET_KEY = bytes(range(7, 71))
LEASE_S = 3.0
LIFETIME_S, REFRESH_AFTER_S = 12.0, 4.0
# The least time between two fetches of one credential: its refreshAfter (whole seconds, so
# up to one less) less the most the margin and the jitter take (a fifth of the lead each).
SHORTEST_CYCLE_S = (REFRESH_AFTER_S - 1) * 0.6
SERVICES = {"fraud": demo.TOKEN_SERVICE, "churn": demo.KEY_SERVICE}


class Broker:
    """One `token-broker run` process; its JSON log events collected as they come."""

    def __init__(self, directory: Path, proc: asyncio.subprocess.Process) -> None:
        self.directory = directory
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            try:
                self.events.append(json.loads(line))
            except ValueError:
                self.events.append({"event": "unparsed", "line": line.decode(errors="replace")})

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == name]

    async def get(self, path: str) -> tuple[int, Any]:
        connector = aiohttp.UnixConnector(path=str(self.directory / "broker.sock"))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(f"http://localhost{path}", headers={"Metadata": "true"}) as resp,
        ):
            text = await resp.text()
            return resp.status, json.loads(text) if "json" in resp.content_type else text

    async def token(self, service: str = "fraud") -> dict[str, Any]:
        status, body = await self.get(f"/v1/token/{service}")
        assert status == 200, body
        assert isinstance(body, dict)
        return body

    async def ready(self, within: float = 20.0) -> None:
        deadline = time.monotonic() + within
        while True:
            try:
                if (await self.get("/readyz"))[0] == 200:
                    return
            except aiohttp.ClientError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise AssertionError(f"broker in {self.directory} never became ready")
            await asyncio.sleep(0.05)

    @property
    def holder(self) -> str:
        return str(self.named("fleet.joined")[0]["holder"])


StartBroker = Callable[[], Coroutine[Any, Any, Broker]]


@pytest.fixture
async def emulator(short_dir: Path) -> AsyncIterator[Emulator]:
    """The emulator with tokens of seconds."""
    state = demo.demo_state(token_lifetime_s=LIFETIME_S, refresh_after_s=REFRESH_AFTER_S)
    async with Emulator(state=state, ca_dir=short_dir) as emu:
        yield emu


@pytest.fixture
async def start_broker(
    emulator: Emulator, short_dir: Path, redis: RedisServer
) -> AsyncIterator[StartBroker]:
    """Start `token-broker run` processes of one configuration but for their sockets, all
    in one fleet; every one is killed after the test."""
    key_file = short_dir / "fleet.key"
    key_file.write_bytes(FLEET_KEY)
    key_file.chmod(0o600)
    started: list[Broker] = []

    async def start() -> Broker:
        directory = short_dir / f"b{len(started)}"
        directory.mkdir()
        text = config_text(emulator, directory, services=SERVICES)
        text += (
            f'\n[fleet]\nenabled = true\nredis_url = "{redis.unix_url}"\n'
            f'encryption_key_file = "{key_file}"\nlease_s = {LEASE_S}\n'
            "connect_timeout_s = 2\ncommand_timeout_s = 1\n"
        )
        (directory / "broker.toml").write_text(text)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "broker", "run", "-c", str(directory / "broker.toml")),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        broker = Broker(directory, proc)
        started.append(broker)
        return broker

    yield start
    for broker in started:
        if broker.proc.returncode is None:
            broker.proc.kill()
            await broker.proc.wait()


async def start_fleet(start_broker: StartBroker, count: int) -> list[Broker]:
    """`count` brokers, started one after another's readiness, as a rollout would."""
    brokers = []
    for _ in range(count):
        broker = await start_broker()
        await broker.ready()
        brokers.append(broker)
    return brokers


async def converged(brokers: list[Broker], within: float = 10.0) -> set[str]:
    """Wait until every broker serves the same token; that token."""
    deadline = time.monotonic() + within
    while True:
        tokens = {(await b.token())["access_token"] for b in brokers}
        if len(tokens) == 1 or time.monotonic() > deadline:
            return tokens
        await asyncio.sleep(0.1)


async def test_a_fleet_makes_one_token_call_per_lifetime(
    start_broker: StartBroker, emulator: Emulator
) -> None:
    """Five brokers of one configuration fetch each service once per refresh cycle between
    them, serve the same unexpired token, and a broker joining is ready with no upstream
    call at all."""
    called: list[float] = []
    emulator.state.listen(
        lambda what, route: called.append(time.monotonic()) if route == "mms.token" else None
    )
    started = time.monotonic()
    brokers = await start_fleet(start_broker, 5)
    await asyncio.sleep(4 * REFRESH_AFTER_S)
    elapsed = time.monotonic() - started
    calls = emulator.state.count("mms.token", demo.TOKEN_SERVICE)
    assert 4 <= calls <= elapsed / SHORTEST_CYCLE_S + 1, (calls, elapsed)  # alone: 5 times
    gaps = [later - earlier for earlier, later in itertools.pairwise(called)]
    assert min(gaps) > SHORTEST_CYCLE_S * 0.8, gaps  # never two fetches in one cycle
    assert emulator.state.count("mms.listkeys", demo.KEY_SERVICE) == 1
    fetched = sum(e["source"] == "azure" for b in brokers for e in b.named("token.refreshed"))
    assert fetched == calls + 1  # the fleet's fetches are the emulator's calls, and no more
    assert len(await converged(brokers)) == 1
    for broker in brokers:
        body = await broker.token()
        assert body["expires_on"] > time.time()
    joining = await start_broker()
    await joining.ready()
    sources = {e["service"]: e["source"] for e in joining.named("token.refreshed")}
    assert sources == {"fraud": "fleet", "churn": "fleet"}
    status, metrics = await joining.get("/metrics")
    assert status == 200 and "token_broker_upstream_request_duration_seconds_count" not in metrics
    assert 'token_broker_fleet_credentials_total{origin="fleet",service="fraud"}' in metrics
    status, service = await joining.get("/v1/services/fraud")
    assert (service["source"], service["fleet"]) == ("fleet", "up")


async def test_redis_stopped_then_started(
    start_broker: StartBroker, emulator: Emulator, redis: RedisServer
) -> None:
    """With Redis stopped every broker keeps serving and refreshes alone, saying so once;
    when Redis is back they say so and share again."""
    brokers = await start_fleet(start_broker, 3)
    redis.stop()
    before = emulator.state.count("mms.token", demo.TOKEN_SERVICE)
    await asyncio.sleep(2 * REFRESH_AFTER_S)
    for broker in brokers:
        body = await broker.token()
        assert body["expires_on"] > time.time()
        assert len(broker.named("fleet.unavailable")) == 1
    alone = emulator.state.count("mms.token", demo.TOKEN_SERVICE) - before
    assert alone >= len(brokers)  # each refreshed on its own
    redis.start()
    deadline = time.monotonic() + 20
    while not all(b.named("fleet.recovered") for b in brokers):
        assert time.monotonic() < deadline, "a broker never saw Redis again"
        await asyncio.sleep(0.2)
    await asyncio.sleep(REFRESH_AFTER_S)  # one cycle to fill the fresh Redis
    before = emulator.state.count("mms.token", demo.TOKEN_SERVICE)
    started = time.monotonic()
    await asyncio.sleep(3 * REFRESH_AFTER_S)
    shared = emulator.state.count("mms.token", demo.TOKEN_SERVICE) - before
    assert shared <= (time.monotonic() - started) / SHORTEST_CYCLE_S + 1, shared
    assert len(await converged(brokers)) == 1


async def test_the_lease_holder_killed_mid_refresh(
    start_broker: StartBroker, emulator: Emulator, redis: RedisServer
) -> None:
    """`kill -9` of the broker holding the lease during a slow refresh: another broker
    refreshes within lease_s plus its poll, and no client meanwhile gets an expired
    token or an error."""
    brokers = await start_fleet(start_broker, 3)
    emulator.state.fail("mms.token", status=None, delay_s=30.0, times=1)
    lease_key = _lease_key(redis)
    deadline = time.monotonic() + 3 * REFRESH_AFTER_S
    holder_value = b""
    while not holder_value:
        assert time.monotonic() < deadline, "nobody took the lease"
        holder_value = redis.command("GET", lease_key).strip()
        await asyncio.sleep(0.05)
    holder = next(b for b in brokers if holder_value.startswith(b.holder.encode()))
    holder.proc.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    others = [b for b in brokers if b is not holder]
    first = (await others[0].token())["access_token"]
    while (await others[0].token())["access_token"] == first:
        for broker in others:
            body = await broker.token()  # never a 5xx, never expired
            assert body["expires_on"] > time.time()
        assert time.monotonic() - killed_at < LEASE_S + 3.0, "nobody took over"
        await asyncio.sleep(0.05)
    assert len(await converged(others)) == 1


def _lease_key(redis: RedisServer) -> str:
    keys = redis.command("KEYS", "token-broker:*:credential").split()
    fraud = []
    for key in keys:
        if b"TBFLEET" in redis.command("GET", key) and b"churn" not in key:
            fraud.append(key.decode())
    # the token service's entry expires with its token; the key service's lives longer
    by_ttl = sorted(fraud, key=lambda k: int(redis.command("PTTL", k)))
    return by_ttl[0].removesuffix(":credential") + ":lease"


async def test_redis_never_sees_a_credential_or_secret(
    start_broker: StartBroker, redis: RedisServer
) -> None:
    """A MONITOR capture of every command Redis received over two refresh cycles holds no
    token, key, client secret or encryption key."""
    reader, writer = await asyncio.open_unix_connection(str(redis.socket))
    writer.write(b"MONITOR\r\n")
    await writer.drain()
    brokers = await start_fleet(start_broker, 2)
    served = set()
    for _ in range(int(2 * REFRESH_AFTER_S / 0.5)):
        for broker in brokers:
            served.add((await broker.token("fraud"))["access_token"])
            served.add((await broker.token("churn"))["access_token"])
        await asyncio.sleep(0.5)
    writer.close()
    captured = b""
    while chunk := await reader.read(1 << 16):
        captured += chunk
    assert b"SET" in captured and b"TBFLEET1" in captured
    for secret in (*served, CLIENT_SECRET):
        assert secret.encode() not in captured
    assert FLEET_KEY not in captured and FLEET_KEY.hex().encode() not in captured
