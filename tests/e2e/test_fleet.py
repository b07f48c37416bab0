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
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from broker.config import load_config
from broker.emulator import Emulator
from broker.emulator import seed as demo
from broker.fleet import Sealer, ServiceKeys, UnreadableEntry
from broker.saved_credentials import Saved
from tests.conftest import CLIENT_SECRET, RedisServer, TlsRedis, config_text, started_redis

pytestmark = pytest.mark.timeout(120)

FLEET_KEY = bytes(range(7, 71))
OTHER_KEY = bytes(range(100, 164))
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
        self.logged = asyncio.Event()  # set at every event; cleared by whoever waits for one
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            try:
                self.events.append(json.loads(line))
            except ValueError:
                self.events.append({"event": "unparsed", "line": line.decode(errors="replace")})
            self.logged.set()

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

    async def reload(self, fleet: str) -> dict[str, Any]:
        """Rewrite the configuration's `[fleet]` table as `fleet` ("" for none), send
        SIGHUP, and return the reload's outcome: `config.reloaded` or `.reload_rejected`."""
        path = self.directory / "broker.toml"
        text = path.read_text().split("\n[fleet]\n", 1)[0]
        path.write_text(text + fleet)
        outcomes = ("config.reloaded", "config.reload_rejected")
        seen = len([e for e in self.events if e.get("event") in outcomes])
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while True:
            done = [e for e in self.events if e.get("event") in outcomes]
            if len(done) > seen:
                return done[-1]
            assert time.monotonic() < deadline, "the reload never finished"
            await asyncio.sleep(0.05)

    async def fleet(self) -> str:
        """The fleet's health as `/v1/services/fraud` says it."""
        return str((await self.get("/v1/services/fraud"))[1]["fleet"])

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

    def keys(self, service: str) -> tuple[ServiceKeys, str]:
        """The Redis keys of `service` in this broker's configuration, and its identity."""
        config = load_config(self.directory / "broker.toml")
        identity = config.service_identity(service)
        assert identity is not None
        return ServiceKeys.of(config.fleet.key_prefix, identity), identity

    def ignored(self, service: str) -> list[dict[str, Any]]:
        return [e for e in self.named("fleet.entry_ignored") if e["service"] == service]


StartBroker = Callable[..., Coroutine[Any, Any, Broker]]


@pytest.fixture
async def emulator(short_dir: Path) -> AsyncIterator[Emulator]:
    """The emulator with tokens of seconds."""
    state = demo.demo_state(token_lifetime_s=LIFETIME_S, refresh_after_s=REFRESH_AFTER_S)
    async with Emulator(state=state, ca_dir=short_dir) as emu:
        yield emu


def fleet_table(redis_url: str, key_file: Path, extra: str = "") -> str:
    """A `[fleet]` table on `redis_url` with the key in `key_file`."""
    return (
        f'\n[fleet]\nenabled = true\nredis_url = "{redis_url}"\n'
        f'encryption_key_file = "{key_file}"\nlease_s = {LEASE_S}\n'
        f"connect_timeout_s = 2\ncommand_timeout_s = 1\n{extra}"
    )


def write_key(path: Path, key: bytes = FLEET_KEY) -> Path:
    path.write_bytes(key)
    path.chmod(0o600)
    return path


def with_sinks(text: str, directory: Path) -> str:
    """`text` with a `[service.sink]` file in `directory` after each service, named after it."""
    head, *blocks = text.split("\n[[service]]\n")
    for block in blocks:
        name = block.split('name = "', 1)[1].split('"', 1)[0]
        head += f'\n[[service]]\n{block}\n[service.sink]\npath = "{directory / name}.cred"\n'
    return head


@pytest.fixture
def fleet_key(short_dir: Path) -> Path:
    """The fleet's encryption key, in a file of mode 0600."""
    return write_key(short_dir / "fleet.key")


@pytest.fixture
async def start_broker(
    emulator: Emulator, short_dir: Path, redis: RedisServer, fleet_key: Path
) -> AsyncIterator[StartBroker]:
    """Start `token-broker run` processes of one configuration but for their sockets, all
    in one fleet; every one is killed after the test."""
    started: list[Broker] = []

    async def start(
        key_file: Path = fleet_key, *, table: str | None = None, services: str = ""
    ) -> Broker:
        """A broker of `SERVICES` and the `[[service]]` tables in `services`."""
        directory = short_dir / f"b{len(started)}"
        directory.mkdir()
        text = config_text(emulator, directory, services=SERVICES) + services
        text += fleet_table(redis.unix_url, key_file) if table is None else table
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


async def next_event(brokers: list[Broker], within: float) -> None:
    """Wait until one of `brokers` logs an event after its `logged` was last cleared, or
    `within` seconds pass."""
    waits = [asyncio.create_task(b.logged.wait()) for b in brokers]
    try:
        await asyncio.wait(waits, timeout=max(within, 0.0), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


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
    """Ten brokers of one configuration fetch each service once per refresh cycle between
    them, serve the same unexpired token, and a broker joining is ready with no upstream
    call at all."""
    called: list[float] = []
    emulator.state.listen(
        lambda what, route: called.append(time.monotonic()) if route == "mms.token" else None
    )
    started = time.monotonic()
    brokers = await start_fleet(start_broker, 10)
    await asyncio.sleep(4 * REFRESH_AFTER_S)
    elapsed = time.monotonic() - started
    calls = emulator.state.count("mms.token", demo.TOKEN_SERVICE)
    assert 4 <= calls <= elapsed / SHORTEST_CYCLE_S + 1, (calls, elapsed)  # alone: 10 times
    gaps = [later - earlier for earlier, later in itertools.pairwise(called)]
    assert min(gaps) > SHORTEST_CYCLE_S * 0.8, gaps  # never two fetches in one cycle
    assert emulator.state.count("mms.listkeys", demo.KEY_SERVICE) == 1
    # The fleet's fetches are the emulator's calls, and no more: read when no fetch is in
    # flight (the emulator counts a call before its broker logs the token it got).
    deadline = time.monotonic() + 5.0
    while True:
        for broker in brokers:
            broker.logged.clear()  # before the counts: an event logged after wakes the wait
        calls = emulator.state.count("mms.token", demo.TOKEN_SERVICE)
        fetched = sum(e["source"] == "azure" for b in brokers for e in b.named("token.refreshed"))
        if fetched == calls + 1 or time.monotonic() > deadline:
            break
        await next_event(brokers, deadline - time.monotonic())
    assert fetched == calls + 1, (fetched, calls)
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


async def test_a_429_to_one_broker_holds_the_fleet_back(
    start_broker: StartBroker, emulator: Emulator
) -> None:
    """Azure answers one broker's token call 429 with a Retry-After: no broker of the fleet
    calls that route again until it has passed (the emulator's call times), the others say
    the fleet held them back, and every broker keeps serving a valid token."""
    hold_s = 5.0
    brokers = await start_fleet(start_broker, 3)
    called: list[float] = []
    emulator.state.listen(
        lambda what, route: called.append(time.monotonic()) if route == "mms.token" else None
    )
    emulator.state.fail("mms.token", status=429, retry_after=hold_s, times=1)
    deadline = time.monotonic() + 3 * REFRESH_AFTER_S + hold_s
    while len(called) < 2:  # the call answered 429, then the next one
        assert time.monotonic() < deadline, called
        for broker in brokers:
            assert (await broker.token())["expires_on"] > time.time()
        await asyncio.sleep(0.1)
    assert called[1] - called[0] >= hold_s - 0.2, called
    throttled = [b for b in brokers if b.named("upstream.throttled")]
    assert len(throttled) == 1
    held = [b for b in brokers if b.named("upstream.held_back_by_fleet")]
    assert held and throttled[0] not in held
    assert len(await converged(brokers)) == 1


ENDPOINTS = "".join(
    f'\n[[service]]\nname = "{name}"\nkind = "azureml-online-endpoint"\n'
    f'subscription_id = "{demo.SUBSCRIPTION_ID}"\nresource_group = "{demo.RESOURCE_GROUP}"\n'
    f'workspace = "{demo.WORKSPACE}"\nendpoint = "{endpoint}"\n'
    for name, endpoint in {"v2-token": demo.ENDPOINT_TOKEN, "v2-key": demo.ENDPOINT_KEY}.items()
)
METADATA_ROUTES = ("arm.workspace", "discovery", "mms.describe", "arm.endpoint")


async def test_a_broker_that_must_fetch_takes_discovery_and_describes_from_the_fleet(
    start_broker: StartBroker, emulator: Emulator, redis: RedisServer
) -> None:
    """A broker started after the fleet's only broker died and its credentials were evicted
    fetches each service itself, but makes no workspace discovery and no describe call:
    the fleet has them."""
    first = await start_broker(services=ENDPOINTS)
    await first.ready()
    learnt = {route: emulator.state.count(route) for route in METADATA_ROUTES}
    assert all(learnt.values()), learnt
    await _only_facts_left(first, redis)
    fetched = emulator.state.count("mms.token") + emulator.state.count("arm.endpoint_token")
    second = await start_broker(services=ENDPOINTS)
    await second.ready()
    assert {route: emulator.state.count(route) for route in METADATA_ROUTES} == learnt
    refetched = emulator.state.count("mms.token") + emulator.state.count("arm.endpoint_token")
    assert refetched > fetched  # the credentials were fetched again, by someone
    described = second.named("service.described") + second.named("endpoint.described")
    assert len(described) == 4 and {e["source"] for e in described} == {"fleet"}, described
    assert {e["source"] for e in second.named("workspace.discovered")} <= {"fleet"}
    for name in ("fraud", "churn", "v2-token", "v2-key"):
        assert (await second.token(name))["access_token"]
    status, detail = await second.get("/v1/services/v2-token")
    assert status == 200 and detail["scoring_uri"], detail


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
    refreshes within lease_s plus its poll (at the most two lease_s, when it stops waiting),
    and no client meanwhile gets an expired token or an error."""
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
        # The dead holder's lease lapses within lease_s, and a waiter polling every lease_s/10
        # takes it; a waiter goes alone after two lease_s at the most. The slack is the
        # fetch's own time, and these clients', on a busy machine.
        assert time.monotonic() - killed_at < 2 * LEASE_S + 2.0, "nobody took over"
        await asyncio.sleep(0.05)
    assert len(await converged(others)) == 1


async def test_a_broker_started_during_a_region_outage_serves_the_fleets_token(
    start_broker: StartBroker, emulator: Emulator
) -> None:
    """The workspace's region goes down: a broker started then is ready with the fleet's
    still-valid token and makes no upstream call; through a refresh cycle of the outage
    every broker keeps serving that token; when the region is back the fleet refreshes and
    agrees again."""
    brokers = await start_fleet(start_broker, 2)
    fleet_token = await _next_token(brokers, after=(await converged(brokers)).pop())
    emulator.state.region_down(demo.REGION)  # with the whole lifetime of a new token left
    joining = await start_broker()
    await joining.ready()
    assert (await joining.token())["access_token"] == fleet_token
    status, metrics = await joining.get("/metrics")  # ready on the fleet's word alone
    assert status == 200 and "token_broker_upstream_request_duration_seconds_count" not in metrics
    sources = {e["service"]: e["source"] for e in joining.named("token.refreshed")}
    assert sources == {"fraud": "fleet", "churn": "fleet"}
    brokers.append(joining)
    outage_ends = time.monotonic() + REFRESH_AFTER_S + 1.0  # past the token's refreshAfter
    while time.monotonic() < outage_ends:
        for broker in brokers:
            body = await broker.token()  # never a 5xx, never expired
            assert body["access_token"] == fleet_token and body["expires_on"] > time.time()
        await asyncio.sleep(0.2)
    emulator.state.region_up(demo.REGION)
    await _next_token(brokers, after=fleet_token)


async def _next_token(brokers: list[Broker], after: str) -> str:
    """Wait until every broker serves one token other than `after`; that token."""
    deadline = time.monotonic() + LIFETIME_S
    while True:
        tokens = await converged(brokers)
        if len(tokens) == 1 and after not in tokens:
            return tokens.pop()
        assert time.monotonic() < deadline, "the fleet never refreshed"
        await asyncio.sleep(0.1)


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


async def run_once(config: Path, *args: str) -> tuple[int, str, list[dict[str, Any]]]:
    """`token-broker once -c config args…` as its own process: its exit code, its stdout
    and its JSON log events."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "broker", "once", "-c", str(config), *args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    events = [json.loads(line) for line in err.splitlines() if line.startswith(b"{")]
    return proc.returncode, out.decode(), events


def once_config(emulator: Emulator, directory: Path, redis: RedisServer, fleet_key: Path) -> Path:
    """A configuration for `once` in `directory`: the fleet's, with a sink per service."""
    directory.mkdir()
    text = with_sinks(config_text(emulator, directory, services=SERVICES), directory)
    path = directory / "broker.toml"
    path.write_text(text + fleet_table(redis.unix_url, fleet_key))
    return path


async def _only_facts_left(broker: Broker, redis: RedisServer) -> None:
    """Kill the fleet's only broker and evict its credentials: Redis keeps what it learnt
    of Azure (discoveries, describe results), and nobody serves a credential."""
    broker.proc.kill()
    await broker.proc.wait()
    for key in redis.command("KEYS", "token-broker:*:credential").split():
        redis.command("DEL", key)


def upstream_calls(emulator: Emulator) -> int:
    """Every request the emulator received: sign-ins, ARM, discovery, describe, tokens, keys."""
    return sum(emulator.state.calls.values())


async def test_once_beside_a_fleet_asks_azure_nothing(
    start_broker: StartBroker,
    emulator: Emulator,
    redis: RedisServer,
    short_dir: Path,
    fleet_key: Path,
) -> None:
    """`token-broker once` beside a broker that shared every service adopts them all: zero
    upstream calls, the sink files hold what the broker serves, and the report says fleet."""
    broker = (await start_fleet(start_broker, 1))[0]
    served = {name: (await broker.token(name))["access_token"] for name in SERVICES}
    before = upstream_calls(emulator)
    directory = short_dir / "once"
    code, out, events = await run_once(once_config(emulator, directory, redis, fleet_key), "--json")
    assert code == 0, (out, events)
    assert upstream_calls(emulator) == before
    report = json.loads(out)
    assert report["fleet"] == "up"
    rows = {row["service"]: row for row in report["services"]}
    assert {name: (row["source"], row["attempts"]) for name, row in rows.items()} == {
        "fraud": ("fleet", 0),
        "churn": ("fleet", 0),
    }
    for name, value in served.items():
        assert (directory / f"{name}.cred").read_text() == value
    assert not [e for e in events if e.get("event") == "fleet.unavailable"]


async def test_once_shares_what_it_fetched(
    start_broker: StartBroker,
    emulator: Emulator,
    redis: RedisServer,
    short_dir: Path,
    fleet_key: Path,
) -> None:
    """A `once` run on an empty fleet fetches from Azure under the lease and shares: a
    broker started after it is ready with no upstream call."""
    code, out, _ = await run_once(once_config(emulator, short_dir / "once", redis, fleet_key))
    assert code == 0, out
    assert [row.split()[-2] for row in out.splitlines()[1:]] == ["azure", "azure"]
    before = upstream_calls(emulator)
    broker = await start_broker()
    await broker.ready()
    assert upstream_calls(emulator) == before
    assert {e["source"] for e in broker.named("token.refreshed")} == {"fleet"}


async def test_once_takes_discovery_and_describes_from_the_fleet(
    start_broker: StartBroker,
    emulator: Emulator,
    redis: RedisServer,
    short_dir: Path,
    fleet_key: Path,
) -> None:
    """A `once` run after the fleet's credentials were evicted fetches them from Azure but
    asks it no discovery and no describe: the fleet learnt them."""
    broker = await start_broker()
    await broker.ready()
    await _only_facts_left(broker, redis)
    learnt = {route: emulator.state.count(route) for route in METADATA_ROUTES}
    code, out, events = await run_once(once_config(emulator, short_dir / "once", redis, fleet_key))
    assert code == 0, out
    assert [row.split()[-2] for row in out.splitlines()[1:]] == ["azure", "azure"]
    assert {route: emulator.state.count(route) for route in METADATA_ROUTES} == learnt
    described = [e for e in events if e.get("event") == "service.described"]
    assert len(described) == 2 and {e["source"] for e in described} == {"fleet"}, described


async def test_once_with_redis_down_fetches_alone_and_says_so(
    emulator: Emulator, redis: RedisServer, short_dir: Path, fleet_key: Path
) -> None:
    """With Redis stopped `once` fetches every service from Azure within its bounded wait,
    writes the sink files, warns fleet.unavailable once and prints fleet: down and why."""
    config = once_config(emulator, short_dir / "once", redis, fleet_key)
    redis.stop()
    started = time.monotonic()
    code, out, events = await run_once(config)
    assert code == 0, out
    assert time.monotonic() - started < 30
    _, *rows, blank, footer = out.splitlines()
    assert [row.split()[-2] for row in rows] == ["azure", "azure"] and blank == ""
    assert footer.startswith("fleet: down, fetched alone: Redis did not answer")
    assert len([e for e in events if e.get("event") == "fleet.unavailable"]) == 1
    assert emulator.state.count("mms.token", demo.TOKEN_SERVICE) == 1
    for name in SERVICES:
        assert (short_dir / "once" / f"{name}.cred").read_text()
    assert CLIENT_SECRET not in out + json.dumps(events)


@pytest.fixture
async def client(redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A client of the test's Redis, for what a hostile writer would do."""
    connection = aioredis.Redis(unix_socket_path=str(redis.socket))
    yield connection
    await connection.aclose()


async def stored(client: aioredis.Redis, key: str) -> bytes:
    """The value under `key`, which must be there."""
    value = await client.get(key)
    assert isinstance(value, bytes), key
    return value


async def shared(client: aioredis.Redis, broker: Broker, service: str) -> Saved | None:
    """The credential under `service`'s key, opened with the fleet's key; None when it
    does not open or is not there."""
    keys, identity = broker.keys(service)
    value = await client.get(keys.credential)
    assert value is None or isinstance(value, bytes)
    try:
        return None if value is None else Sealer(FLEET_KEY).open(keys.credential, identity, value)
    except UnreadableEntry:
        return None


async def serve_until(
    brokers: list[Broker], emulator: Emulator, done: Callable[[], Coroutine[Any, Any, bool]]
) -> set[str]:
    """Ask every broker for the token service's credential until `done()`, asserting each
    one served is a token the emulator issued and still accepts; the tokens served."""
    token_service = emulator.state.web_service(
        demo.SUBSCRIPTION_ID, demo.RESOURCE_GROUP, demo.WORKSPACE, demo.TOKEN_SERVICE
    )
    assert token_service is not None
    deadline = time.monotonic() + 4 * REFRESH_AFTER_S
    served: set[str] = set()
    while not await done():
        assert time.monotonic() < deadline, "the bad entry was never replaced"
        for broker in brokers:
            body = await broker.token("fraud")
            assert body["token_type"] == "Bearer" and body["expires_on"] > time.time()
            assert emulator.state.token_is_valid(body["access_token"], token_service)
            served.add(body["access_token"])
        await asyncio.sleep(0.1)
    return served


def altered(value: bytes) -> bytes:
    """The entry with its stamp raised (as a writer would to look newer) and its last
    byte flipped."""
    magic, stamp, rest = value.split(b":", 2)
    return b"%s:%d:%s%c" % (magic, int(stamp) * 10, rest[:-1], rest[-1] ^ 1)


@pytest.mark.parametrize("tampering", ["altered", "moved"])
async def test_a_tampered_entry_is_ignored_and_replaced(
    start_broker: StartBroker,
    emulator: Emulator,
    client: aioredis.Redis,
    tampering: str,
) -> None:
    """An entry altered in Redis (a higher stamp, a flipped byte) or copied from another
    service's key is never served: each broker warns once, keeps serving its own valid
    token, and the next refresh writes a good entry over it."""
    brokers = await start_fleet(start_broker, 2)
    keys, _ = brokers[0].keys("fraud")
    if tampering == "altered":
        bad = altered(await stored(client, keys.credential))
    else:
        bad = await stored(client, brokers[0].keys("churn")[0].credential)
    await client.set(keys.credential, bad, px=600_000)  # outlives the test: not expiry
    await client.publish(keys.notices, bad.split(b":")[1])  # every broker reads it now

    async def replaced() -> bool:
        return (
            all(b.ignored("fraud") for b in brokers)
            and (await shared(client, brokers[0], "fraud")) is not None
        )

    served = await serve_until(brokers, emulator, replaced)
    churn_key = (await brokers[0].token("churn"))["access_token"]
    assert churn_key not in served
    for broker in brokers:
        (warning,) = broker.ignored("fraud")  # once per bad value, however often it is read
        assert warning["level"] == "warning" and "does not open" in warning["reason"]
    now_shared = await shared(client, brokers[0], "fraud")
    assert now_shared is not None
    assert len(await converged(brokers)) == 1
    assert (await brokers[0].token("fraud"))["access_token"] == now_shared.token.value


async def test_an_entry_written_with_another_key_is_ignored_and_replaced(
    start_broker: StartBroker,
    emulator: Emulator,
    client: aioredis.Redis,
    short_dir: Path,
) -> None:
    """A broker with another encryption key cannot read the fleet's entries and writes its
    own over them; the fleet's brokers warn, never serve its token, and their next refresh
    writes an entry the fleet's key opens."""
    brokers = await start_fleet(start_broker, 2)
    stranger = await start_broker(write_key(short_dir / "other.key", OTHER_KEY))
    await stranger.ready()
    assert {e["source"] for e in stranger.named("token.refreshed")} == {"azure"}
    assert stranger.ignored("fraud") and stranger.ignored("churn")
    strangers_token = (await stranger.token("fraud"))["access_token"]
    assert await shared(client, brokers[0], "fraud") is None  # the stranger's entry is there
    stranger.proc.kill()
    await stranger.proc.wait()

    async def replaced() -> bool:
        found = await shared(client, brokers[0], "fraud")
        return found is not None and found.token.value != strangers_token

    served = await serve_until(brokers, emulator, replaced)
    assert strangers_token not in served
    for broker in brokers:
        assert "another encryption key" in broker.ignored("fraud")[0]["reason"]
    assert len(await converged(brokers)) == 1


# The README's ACL, less +client|setinfo, which Debian's Redis 7.0 does not know.
README_ACL = (
    "on", "resetkeys", "~token-broker:*", "resetchannels", "&token-broker:*", "-@all",
    "+get", "+set", "+evalsha", "+script|load", "+publish", "+subscribe", "+unsubscribe",
    "+ping", "+client|setname",
)  # fmt: skip
REDIS_PASSWORD = "redis-PASSWORD-tls-0001"


@pytest.fixture
def acl_user(tls_redis: TlsRedis, short_dir: Path) -> Iterator[Path]:
    """The TLS Redis, emptied, with the README's ACL user "broker"; its password's file."""
    server = tls_redis.server
    server.command("FLUSHALL")
    server.command("ACL", "SETUSER", "broker", *README_ACL, f">{REDIS_PASSWORD}")
    password_file = short_dir / "redis-password"
    password_file.write_text(REDIS_PASSWORD + "\n")
    password_file.chmod(0o600)
    yield password_file
    server.command("ACL", "DELUSER", "broker")


async def test_brokers_share_over_tls_as_an_acl_user(
    start_broker: StartBroker,
    emulator: Emulator,
    tls_redis: TlsRedis,
    acl_user: Path,
    fleet_key: Path,
) -> None:
    """Over rediss:// with the CA the test made and the README's ACL user, a second broker
    is ready with no upstream call; one given another CA cannot connect, refreshes alone
    and says certificate verify failed, naming ca_file and no secret."""

    def table(ca_file: Path) -> str:
        return fleet_table(
            tls_redis.url,
            fleet_key,
            f'ca_file = "{ca_file}"\nusername = "broker"\npassword_file = "{acl_user}"\n',
        )

    first = await start_broker(table=table(tls_redis.ca_file))
    await first.ready()
    before = upstream_calls(emulator)
    second = await start_broker(table=table(tls_redis.ca_file))
    await second.ready()
    assert upstream_calls(emulator) == before
    assert {e["source"] for e in second.named("token.refreshed")} == {"fleet"}
    assert (await second.get("/v1/services/fraud"))[1]["fleet"] == "up"
    stranger = await start_broker(table=table(tls_redis.other_ca_file))
    await stranger.ready()
    assert {e["source"] for e in stranger.named("token.refreshed")} == {"azure"}
    (unavailable,) = stranger.named("fleet.unavailable")
    assert "certificate verify failed" in unavailable["error"], unavailable
    assert "ca_file" in unavailable["error"]
    assert (await stranger.get("/v1/services/fraud"))[1]["fleet"] == "down"
    for broker in (first, second, stranger):
        printed = json.dumps(broker.events)
        assert REDIS_PASSWORD not in printed and CLIENT_SECRET not in printed


@pytest.fixture
def other_redis() -> Iterator[RedisServer]:
    """A second redis-server, for a fleet moved to another Redis."""
    with started_redis() as server:
        yield server


async def eventually(check: Callable[[], Coroutine[Any, Any, bool]], what: str) -> None:
    """Wait, within three refresh cycles, until `check()`."""
    deadline = time.monotonic() + 3 * REFRESH_AFTER_S
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.1)


def entries(redis: RedisServer) -> list[bytes]:
    return redis.command("KEYS", "token-broker:*:credential").split()


async def test_a_reload_joins_moves_and_leaves_the_fleet(
    start_broker: StartBroker,
    redis: RedisServer,
    other_redis: RedisServer,
    fleet_key: Path,
) -> None:
    """A reload that enables [fleet] joins it (the broker then serves the fleet's token),
    one that changes redis_url shares through the new Redis, a broken [fleet] is rejected
    with the key and the fix while the running fleet stays, and one without [fleet] leaves
    it: the broker refreshes alone and writes nothing to Redis."""
    member = await start_broker()
    await member.ready()
    broker = await start_broker(table="")
    await broker.ready()
    assert await broker.fleet() == "off"
    status, metrics = await broker.get("/metrics")
    assert "token_broker_fleet_up" not in metrics

    reloaded = await broker.reload(fleet_table(redis.unix_url, fleet_key))
    assert reloaded["event"] == "config.reloaded"
    (joined,) = broker.named("fleet.reconfigured")
    assert joined["enabled"] is True and "redis_url" in joined["changed"]
    await eventually(lambda: _is(broker.fleet(), "up"), "the broker never reached the fleet")
    assert len(await converged([member, broker], within=3 * REFRESH_AFTER_S)) == 1

    reloaded = await broker.reload(fleet_table(other_redis.unix_url, fleet_key))
    assert reloaded["event"] == "config.reloaded"
    assert broker.named("fleet.reconfigured")[-1]["changed"] == ["redis_url"]
    await eventually(lambda: _now(bool(entries(other_redis))), "nothing shared in the new Redis")

    rejected = await broker.reload(fleet_table("http://redis.internal", fleet_key))
    assert rejected["event"] == "config.reload_rejected"
    (problem,) = rejected["problems"]
    assert "broker.toml" in problem and "redis_url" in problem and "rediss://" in problem
    assert len(broker.named("fleet.reconfigured")) == 2  # the running fleet stays
    assert await broker.fleet() == "up"

    reloaded = await broker.reload("")
    assert reloaded["event"] == "config.reloaded"
    assert broker.named("fleet.reconfigured")[-1]["enabled"] is False
    assert await broker.fleet() == "off"
    status, metrics = await broker.get("/metrics")
    assert status == 200 and "token_broker_fleet_up" not in metrics
    other_redis.command("FLUSHALL")
    refreshed = len(broker.named("token.refreshed"))
    await eventually(
        lambda: _now(len(broker.named("token.refreshed")) > refreshed), "no refresh alone"
    )
    assert broker.named("token.refreshed")[-1]["source"] == "azure"
    assert entries(other_redis) == []
    assert (await broker.token())["expires_on"] > time.time()


async def _is(value: Coroutine[Any, Any, str], expected: str) -> bool:
    return await value == expected


async def _now(value: bool) -> bool:
    return value


async def test_rolling_the_key_costs_no_upstream_call(
    start_broker: StartBroker,
    emulator: Emulator,
    redis: RedisServer,
    short_dir: Path,
    fleet_key: Path,
) -> None:
    """Mid-roll, a broker still writing with the old key (the new one listed as previous)
    and one already writing with the new key (the old one listed) read each other's
    entries: the second is ready with no upstream call, both serve one token, and neither
    ignores an entry."""
    new_key = write_key(short_dir / "new.key", OTHER_KEY)

    def table(current: Path, previous: Path) -> str:
        return fleet_table(
            redis.unix_url, current, f'previous_encryption_key_files = ["{previous}"]\n'
        )

    first_step = await start_broker(table=table(fleet_key, new_key))
    await first_step.ready()
    before = upstream_calls(emulator)
    second_step = await start_broker(table=table(new_key, fleet_key))
    await second_step.ready()
    assert upstream_calls(emulator) == before
    assert {e["source"] for e in second_step.named("token.refreshed")} == {"fleet"}
    calls = emulator.state.count("mms.token", demo.TOKEN_SERVICE)
    await eventually(  # two refresh cycles, whoever refreshes: each adopts the other's
        lambda: _now(emulator.state.count("mms.token", demo.TOKEN_SERVICE) >= calls + 2),
        "no refresh",
    )
    assert len(await converged([first_step, second_step])) == 1
    assert not first_step.named("fleet.entry_ignored")
    assert not second_step.named("fleet.entry_ignored")
