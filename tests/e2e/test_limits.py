"""Issue 12, finding 2: no local process can lock the other clients out of either listener.

Stalled bodies are cut after idle_timeout_s; watch streams have a cap of their own below
max_connections; one peer uid, and the TCP listener's clients together, hold at most their
share; quiet connections give way to new ones. The last test runs an attacker in a process
of its own, as another user, holding everything these limits let it hold, and shows a
normal client served on both listeners.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
import time
from pathlib import Path

import pytest

from broker.config import load_config
from broker.emulator import Emulator
from broker.emulator import seed as demo
from tests.conftest import config_text
from tests.e2e.conftest import LISTENERS, Broker, StartBroker
from tests.e2e.test_log_safety import Process, exchange

pytestmark = pytest.mark.timeout(60)

STALLED = (
    b"POST /v1/proxy/fraud/score HTTP/1.1\r\nHost: localhost\r\nMetadata: true\r\n"
    b"Content-Type: application/json\r\nContent-Length: 500\r\n\r\n"
)
WATCH = b"GET /v1/token/fraud?watch=true HTTP/1.1\r\nHost: localhost\r\nMetadata: true\r\n\r\n"
SYSTEM_PYTHON = Path("/usr/bin/python3")  # one another user may run (the venv's may be in /root)
NOBODY = 65534


def limited(emulator: Emulator, short_dir: Path, listen: str, unix: str = "") -> str:
    text = config_text(emulator, short_dir, services={"fraud": demo.TOKEN_SERVICE})
    text = text.replace("[listen.unix]\n", f"[listen]\n{listen}\n[listen.unix]\n{unix}", 1)
    return text + "\n[proxy]\ntimeout_s = 20\n"


async def connect(
    broker: Broker, listener: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    daemon = broker.daemon
    if listener == "unix":
        return await asyncio.open_unix_connection(str(daemon.unix_path))
    assert daemon.tcp_address is not None
    return await asyncio.open_connection(*daemon.tcp_address)


async def metric(broker: Broker, sample: str) -> float:
    """The value of one sample of `GET /metrics`, given as `name{labels}`; 0 when absent."""
    for line in (await broker.client().get("/metrics")).text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.parametrize("listener", LISTENERS)
async def test_a_stalled_body_is_cut_after_the_idle_timeout(
    start_broker: StartBroker,
    emulator: Emulator,
    short_dir: Path,
    listener: str,
    logs: io.StringIO,
) -> None:
    """A proxy request that declares Content-Length: 500 and sends no body is cut after
    idle_timeout_s (1 s here, [proxy] timeout_s = 20), counted, and logged as no crash."""
    broker = await start_broker(limited(emulator, short_dir, "idle_timeout_s = 1"))
    await broker.settled()
    reader, writer = await connect(broker, listener)
    writer.write(STALLED)
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 10) == b""
    assert time.monotonic() - started < 5
    writer.close()
    cut = f'token_broker_connections_cut_total{{listener="{listener}",reason="stalled_body"}}'
    assert await metric(broker, cut) == 1
    assert "request.crashed" not in logs.getvalue()


async def test_a_body_that_keeps_coming_is_not_cut(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path
) -> None:
    """A body sent slowly, each piece within idle_timeout_s, is read to its end and forwarded."""
    broker = await start_broker(limited(emulator, short_dir, "idle_timeout_s = 1"))
    await broker.settled()
    reader, writer = await connect(broker, "unix")
    body = json.dumps({"data": "x" * 480}).encode()
    writer.write(STALLED.replace(b"500", str(len(body)).encode()))
    for start in range(0, len(body), len(body) // 4 + 1):
        await asyncio.sleep(0.4)
        writer.write(body[start : start + len(body) // 4 + 1])
    status = await asyncio.wait_for(reader.readline(), 10)
    assert status.startswith(b"HTTP/1.1 200"), status
    writer.close()


async def test_streams_cannot_take_the_places_plain_requests_need(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path
) -> None:
    """Past its share of max_streams a watch is refused with 503 too_many_streams, and plain
    requests are still served on both listeners."""
    listen = "max_connections = 8\nmax_streams = 4\nuid_share = 0.5"
    broker = await start_broker(limited(emulator, short_dir, listen))
    held = []
    for _ in range(2):  # the socket's half of 4 streams; one uid may hold half of 4
        reader, writer = await connect(broker, "unix")
        writer.write(WATCH)
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 200")
        held.append(writer)
    refused = await broker.client().get("/v1/token/fraud?watch=true")
    assert refused.status == 503 and refused.json()["error"] == "too_many_streams"
    assert refused.headers["Retry-After"] == "1"
    for listener in LISTENERS:
        assert (await broker.client(listener).get("/v1/token/fraud")).status == 200
    assert await metric(broker, 'token_broker_streams_open{listener="unix"}') == 2
    for writer in held:
        writer.close()


ATTACKER = r"""
import asyncio, json, sys

UNIX, HOST, PORT = sys.argv[1], sys.argv[2], int(sys.argv[3])
WATCH = __WATCH__
STALLED = __STALLED__


async def connect(kind):
    if kind == "unix":
        return await asyncio.open_unix_connection(UNIX)
    return await asyncio.open_connection(HOST, PORT)


async def main():
    held, streams = [], {"unix": 0, "tcp": 0}
    for kind, tries in (("unix", 10), ("tcp", 20)):
        for _ in range(tries):
            reader, writer = await connect(kind)
            writer.write(WATCH)
            streams[kind] += (await reader.readline()).startswith(b"HTTP/1.1 200")
            held.append(writer)
    for kind, tries in (("unix", 10), ("tcp", 20)):
        for _ in range(tries):
            reader, writer = await connect(kind)
            writer.write(STALLED)
            held.append(writer)
    print(json.dumps(streams), flush=True)
    flood = []
    while True:  # and a flood of connections that never send a byte, on both listeners
        for kind in ("unix", "tcp"):
            try:
                flood.append((await connect(kind))[1])
            except OSError:
                pass
        for writer in flood[:-100]:
            writer.close()
        del flood[:-100]
        await asyncio.sleep(0.005)


asyncio.run(main())
""".replace("__WATCH__", repr(WATCH)).replace("__STALLED__", repr(STALLED))


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the attacker as another user")
@pytest.mark.skipif(not SYSTEM_PYTHON.exists(), reason="needs /usr/bin/python3 for the attacker")
async def test_a_normal_client_is_served_while_an_attacker_holds_all_it_may(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path
) -> None:
    """One process of another user holds its uid's share of streams and connections on the
    socket, the TCP listener's share of streams, stalled bodies on both, and floods both
    with connections that send nothing; a normal client is served on both listeners, and
    can still open a watch stream on the socket."""
    listen = "max_connections = 40\nmax_streams = 20\nidle_timeout_s = 5"
    broker = await start_broker(limited(emulator, short_dir, listen, f"group = {NOBODY}\n"))
    await broker.settled()
    short_dir.chmod(0o711)  # the attacker reaches the socket through its group
    assert broker.daemon.tcp_address is not None
    host, port = broker.daemon.tcp_address
    attacker = await asyncio.create_subprocess_exec(
        str(SYSTEM_PYTHON),
        "-c",
        ATTACKER,
        str(broker.daemon.unix_path),
        host,
        str(port),
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert attacker.stdout is not None
        held = json.loads(await asyncio.wait_for(attacker.stdout.readline(), 30))
        # uid_share 0.25 of 20 streams; tcp_share 0.5 of 20 streams
        assert held == {"unix": 5, "tcp": 10}
        await asyncio.sleep(1)  # the flood under way
        latencies = {}
        for listener in LISTENERS:
            times = []
            for _ in range(10):
                started = time.perf_counter()
                reply = await asyncio.wait_for(broker.client(listener).get("/v1/token/fraud"), 10)
                times.append(time.perf_counter() - started)
                assert reply.status == 200, (listener, reply.text)
            latencies[listener] = max(times)
        reader, writer = await connect(broker, "unix")
        writer.write(WATCH)
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 200")
        writer.close()
        for listener, share in (("unix", "uid_share"), ("tcp", "listener_share")):
            refused = (
                f'token_broker_connections_refused_total{{listener="{listener}",reason="{share}"}}'
            )
            assert await metric(broker, refused) >= 5
        evicted = 'token_broker_connections_cut_total{listener="tcp",reason="evicted"}'
        assert await metric(broker, evicted) > 0
        print(f"attacker held {held}; slowest normal request {latencies}")
    finally:
        attacker.kill()
        await attacker.wait()


async def test_a_broker_process_cuts_stalled_bodies_and_caps_streams(
    emulator: Emulator, short_dir: Path
) -> None:
    """The same limits hold in `token-broker run` (on uvloop when it is installed): a
    stalled body is cut after idle_timeout_s, a watch past the TCP share of max_streams gets
    503, and plain requests are served meanwhile."""
    listen = "max_connections = 8\nmax_streams = 4\nidle_timeout_s = 1"
    path = short_dir / "broker.toml"
    path.write_text(limited(emulator, short_dir, listen))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "broker", "run", "-c", str(path)),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    running = Process(proc)
    try:
        address = await running.started()
        reader, writer = await asyncio.open_connection(*address)
        writer.write(STALLED)
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        streams = []
        for _ in range(2):  # TCP's half of 4
            reader, writer = await asyncio.open_connection(*address)
            writer.write(WATCH)
            assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 200")
            streams.append(writer)
        status, body = await exchange(
            address, WATCH.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
        )
        assert status == 503 and body["error"] == "too_many_streams"
        plain = WATCH.replace(b"?watch=true", b"").replace(
            b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"
        )
        status, body = await exchange(address, plain)
        assert status == 200 and body["service"] == "fraud"
        for writer in streams:
            writer.close()
    finally:
        log = await running.stop()
    assert "request.crashed" not in log and "Traceback" not in log


async def test_a_reload_applies_the_limits_at_once(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, logs: io.StringIO
) -> None:
    """A reload that lowers stream_max_age_s ends the streams already older (max_age) and
    one that changes max_streams applies it, with no `config.listen_needs_restart`."""
    path = short_dir / "broker.toml"
    broker = await start_broker(limited(emulator, short_dir, "max_streams = 100"))
    reader, writer = await connect(broker, "unix")
    writer.write(WATCH)
    await asyncio.wait_for(reader.readuntil(b"event: token\n"), 10)
    broker.clock.advance(120)
    path.write_text(limited(emulator, short_dir, "max_streams = 2\nstream_max_age_s = 60"))
    await broker.daemon.reload(load_config(path))
    ended = await asyncio.wait_for(reader.readuntil(b"event: end\ndata: "), 10)
    assert b"event: end" in ended
    assert json.loads(await asyncio.wait_for(reader.readline(), 10))["reason"] == "max_age"
    writer.close()
    reader, writer = await connect(broker, "unix")
    writer.write(WATCH)
    assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 200")
    refused = await broker.client().get("/v1/token/fraud?watch=true")  # the socket's 1 of 2
    assert refused.status == 503 and refused.json()["error"] == "too_many_streams"
    writer.close()
    assert "config.listen_needs_restart" not in logs.getvalue()
