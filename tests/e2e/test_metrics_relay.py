"""The Kubernetes metrics relay (deploy/kubernetes/podmonitor/metrics-relay.patch.yaml), run as
the patch runs it, in front of a live broker: it passes /metrics through and nothing else."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
import yaml
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from broker.emulator import seed as demo
from tests.e2e.conftest import Broker, StartBroker

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parents[2]
PATCH = REPO / "deploy" / "kubernetes" / "podmonitor" / "metrics-relay.patch.yaml"
BROKER_URL = "'http://127.0.0.1:8765/metrics'"
LISTEN = "(('', 9765), Relay)"


def relay_command() -> list[str]:
    [container] = yaml.safe_load(PATCH.read_text())["spec"]["template"]["spec"]["containers"]
    command: list[str] = container["command"]
    return command


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Relay:
    def __init__(self, port: int, session: aiohttp.ClientSession) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.session = session

    async def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
        async with self.session.get(self.base + path, headers=headers) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


StartRelay = Callable[[Broker], Awaitable[Relay]]


@pytest.fixture
async def start_relay() -> AsyncIterator[StartRelay]:
    """Run the patch's command with this Python, on a free loopback port, for one broker."""
    procs: list[asyncio.subprocess.Process] = []
    session = aiohttp.ClientSession()

    async def start(broker: Broker) -> Relay:
        assert broker.daemon.tcp_address is not None
        host, port = broker.daemon.tcp_address
        command = relay_command()
        code = command[-1]
        assert BROKER_URL in code and LISTEN in code, "the relay changed: update this test"
        code = code.replace(BROKER_URL, f"'http://{host}:{port}/metrics'")
        listen = free_port()
        code = code.replace(LISTEN, f"(('127.0.0.1', {listen}), Relay)")
        proc = await asyncio.create_subprocess_exec(sys.executable, *command[1:-1], code)
        procs.append(proc)
        relay = Relay(listen, session)
        deadline = asyncio.get_running_loop().time() + 10
        while True:  # poll until it accepts connections, within a deadline
            try:
                await relay.get("/ready-check")
            except aiohttp.ClientConnectionError:
                assert proc.returncode is None, "the relay exited"
                assert asyncio.get_running_loop().time() < deadline, "the relay never listened"
                await asyncio.sleep(0.05)
            else:
                return relay

    yield start
    await session.close()
    for proc in procs:
        proc.terminate()
        await proc.wait()


async def test_relay_passes_the_brokers_metrics_and_nothing_else(
    start_broker: StartBroker, start_relay: StartRelay
) -> None:
    """GET /metrics answers the broker's exposition; a token route answers 404 without the
    broker being asked; once the broker is gone, 502."""
    broker = await start_broker(services={"fraud": demo.TOKEN_SERVICE})
    await broker.settled()
    relay = await start_relay(broker)
    status, kind, body = await relay.get("/metrics")
    assert status == 200
    assert kind == CONTENT_TYPE_LATEST
    assert 'token_broker_service_state{service="fraud",state="fresh"} 1.0' in body
    token = (await broker.client().get("/v1/token/fraud")).json()["access_token"]
    for path in ("/v1/token/fraud", "/metrics/../v1/token/fraud", "/v1/services", "/"):
        status, _, text = await relay.get(path, headers={"Metadata": "true"})
        assert status == 404, path
        assert token not in text
    _, _, body = await relay.get("/metrics?x=1")
    assert 'route="/v1/token/{service}",status="200"} 1.0' in body  # only the test's own ask
    await broker.daemon.stop()
    status, _, _ = await relay.get("/metrics")
    assert status == 502
