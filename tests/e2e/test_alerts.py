"""The alert rules and the dashboard in a real Prometheus scraping a live broker: the series
arrive, the dashboard's queries answer, and an expired credential or a killed
`token-broker run` process fires its alert through Prometheus's own API.

The rules are deploy/prometheus/token-broker.rules.yml with every `for:` cut to one second
(promtool's unit tests hold the production durations); Prometheus scrapes and evaluates
every second, on loopback only, with its data in the test's directory.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import shutil
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from broker.emulator import Emulator
from broker.emulator import seed as demo
from tests.conftest import config_text
from tests.e2e.conftest import StartBroker
from tests.e2e.test_process import Process

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "token-broker.rules.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "token-broker.json"
# Grafana's variables as the dashboard's "All" fills them in.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$job": ".+", "$instance": ".+", "$service": ".+"}
JOB = "token-broker"
# Prometheus logs its bound address and its readiness from two goroutines, in either order.
LISTENING = re.compile(r'msg="Listening on" address=\[?(127\.0\.0\.1\]?:\d+)')
READY = "Server is ready to receive web requests."
POLL_S = 0.2


def prometheus_binary() -> str:
    """The path of prometheus; fails the test, with the fix, when it is missing."""
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail(
            "prometheus is not installed: this test runs the alert rules in it. `make tools` "
            "installs it (Debian: apt-get install prometheus).",
            pytrace=False,
        )
    return path


class Prometheus:
    """A Prometheus server of the test's own, and a client of its HTTP API."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.address = ""
        self._session = aiohttp.ClientSession()
        self._drain: asyncio.Task[None] | None = None

    async def started(self, within: float = 20.0) -> None:
        """Read its log until it has said both where it listens and that it is ready; the log
        is kept for failures."""

        async def read() -> None:
            assert self.proc.stderr is not None
            ready = False
            async for raw in self.proc.stderr:
                line = raw.decode(errors="replace")
                self.lines.append(line)
                if found := LISTENING.search(line):
                    self.address = found.group(1).replace("]", "")
                ready = ready or READY in line
                if ready and self.address:
                    return
            raise AssertionError("prometheus exited:\n" + "".join(self.lines))

        try:
            await asyncio.wait_for(read(), within)
        except TimeoutError:
            log = "".join(self.lines)
            raise AssertionError(
                f"prometheus did not log its address and readiness within {within} s:\n{log}"
            ) from None
        self._drain = asyncio.create_task(self._keep_reading())

    async def _keep_reading(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            self.lines.append(raw.decode(errors="replace"))

    async def api(self, path: str, **params: str) -> Any:
        """The `data` of one answer of its HTTP API."""
        url = f"http://{self.address}/api/v1/{path}"
        async with self._session.get(url, params=params) as resp:
            body = await resp.json()
        assert body["status"] == "success", body
        return body["data"]

    async def until(
        self, what: str, check: Callable[[], Awaitable[Any]], within: float = 30.0
    ) -> Any:
        """Poll `check` until it returns something truthy; fail with Prometheus's log after
        `within` seconds."""
        deadline = asyncio.get_running_loop().time() + within
        while not (found := await check()):
            if asyncio.get_running_loop().time() > deadline:
                log = "".join(self.lines[-20:])
                raise AssertionError(f"{what}: not within {within} s; prometheus log:\n{log}")
            await asyncio.sleep(POLL_S)
        return found

    async def alerts(self, name: str, state: str = "firing") -> list[dict[str, Any]]:
        data = await self.api("alerts")
        return [
            alert
            for alert in data["alerts"]
            if alert["labels"]["alertname"] == name and alert["state"] == state
        ]

    async def stop(self) -> None:
        await self._session.close()
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._drain is not None:
            await self._drain


def fast_rules() -> dict[str, Any]:
    """The production rules with every `for:` cut to one second."""
    rules: dict[str, Any] = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["for"] = "1s"
    return rules


StartPrometheus = Callable[[str], Awaitable[Prometheus]]


@pytest.fixture
async def start_prometheus(tmp_path: Path) -> AsyncIterator[StartPrometheus]:
    """Start Prometheus scraping a broker's TCP listener (`host:port`); it is stopped after
    the test."""
    started: list[Prometheus] = []

    async def start(target: str) -> Prometheus:
        (tmp_path / "rules.yml").write_text(yaml.safe_dump(fast_rules()))
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(tmp_path / "rules.yml")],
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [target]}]}],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        proc = await asyncio.create_subprocess_exec(
            prometheus_binary(),
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            "--web.listen-address=127.0.0.1:0",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        prometheus = Prometheus(proc)
        started.append(prometheus)
        await prometheus.started()
        return prometheus

    yield start
    for prometheus in started:
        await prometheus.stop()


@dataclass
class RunningBroker:
    process: Process
    address: str  # host:port of its TCP listener

    async def state(self, service: str) -> str:
        url = f"http://{self.address}/v1/services/{service}"
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, headers={"Metadata": "true"}) as resp,
        ):
            assert resp.status == 200
            state: str = (await resp.json())["state"]
            return state


@pytest.fixture
async def run_broker(emulator: Emulator, short_dir: Path) -> AsyncIterator[RunningBroker]:
    """A `token-broker run` process serving `fraud` from the emulator, its first token
    fetched; killed after the test if still running."""
    path = short_dir / "broker.toml"
    path.write_text(config_text(emulator, short_dir, services={"fraud": demo.TOKEN_SERVICE}))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker",
        "run",
        "-c",
        str(path),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    process = Process(proc)
    started = await process.event("listeners.started")
    await process.event("token.refreshed")
    yield RunningBroker(process, started["tcp"])
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


@pytest.fixture
def short_tokens(emulator: Emulator) -> None:
    """The emulator's MMS tokens live 4 s, refreshAfter at 2 s."""
    emulator.state.set_token_lifetime(4.0, refresh_after_s=2.0)


@pytest.fixture
def run_broker_with_short_tokens(short_tokens: None, run_broker: RunningBroker) -> RunningBroker:
    """`run_broker`, started after the emulator's tokens were made to live 4 s."""
    return run_broker


async def series_arrived(prometheus: Prometheus) -> bool:
    """Whether Prometheus has the broker up and its service gauges for `fraud`."""
    up = await prometheus.api("query", query=f'up{{job="{JOB}"}} == 1')
    fresh = await prometheus.api(
        "query", query='token_broker_service_state{service="fraud", state="fresh"} == 1'
    )
    expiry = await prometheus.api(
        "query", query='token_broker_credential_expiry_seconds{service="fraud"} > 0'
    )
    return bool(up["result"] and fresh["result"] and expiry["result"])


async def test_a_credential_failing_until_it_expires_fires_the_expired_alert(
    emulator: Emulator,
    run_broker_with_short_tokens: RunningBroker,
    start_prometheus: StartPrometheus,
) -> None:
    """Prometheus sees a running broker's series, then fires TokenBrokerServiceExpired for
    the service whose refreshes the emulator fails until its 4 s token expires."""
    broker = run_broker_with_short_tokens
    prometheus = await start_prometheus(broker.address)
    await prometheus.until("the broker's series", lambda: series_arrived(prometheus))
    assert not await prometheus.alerts("TokenBrokerServiceExpired", state="pending")

    emulator.state.fail("mms.token", status=503)
    [alert] = await prometheus.until(
        "TokenBrokerServiceExpired firing",
        lambda: prometheus.alerts("TokenBrokerServiceExpired"),
    )
    assert alert["labels"]["service"] == "fraud"
    assert alert["labels"]["job"] == JOB
    assert alert["labels"]["instance"] == broker.address
    assert alert["labels"]["severity"] == "critical"
    assert alert["annotations"]["summary"] == "fraud: the cached credential has expired"
    assert await broker.state("fraud") == "expired"
    assert not await prometheus.alerts("TokenBrokerDown")


async def test_a_killed_broker_fires_the_down_alert(
    run_broker: RunningBroker, start_prometheus: StartPrometheus
) -> None:
    """Once the broker process is killed, TokenBrokerDown fires for its instance."""
    prometheus = await start_prometheus(run_broker.address)
    await prometheus.until("the broker's series", lambda: series_arrived(prometheus))
    assert not await prometheus.alerts("TokenBrokerDown")

    run_broker.process.proc.kill()
    await run_broker.process.exit_code()
    [alert] = await prometheus.until(
        "TokenBrokerDown firing", lambda: prometheus.alerts("TokenBrokerDown")
    )
    assert alert["labels"]["instance"] == run_broker.address
    assert alert["labels"]["severity"] == "critical"


def dashboard_queries() -> dict[str, str]:
    """Each panel's first query by panel title, variables filled in as Grafana would."""
    found = {}
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", [])[:1]:
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            found[panel["title"]] = expr
    return found


async def test_dashboard_queries_answer_from_a_live_broker(
    start_broker: StartBroker, start_prometheus: StartPrometheus
) -> None:
    """Every panel's query runs in Prometheus, and the state, expiry, refresh, Azure and
    local-request panels get series from the broker."""
    broker = await start_broker(services={"fraud": demo.TOKEN_SERVICE})
    await broker.settled()
    assert broker.daemon.tcp_address is not None
    host, port = broker.daemon.tcp_address
    prometheus = await start_prometheus(f"{host}:{port}")
    await prometheus.until("the broker's series", lambda: series_arrived(prometheus))
    queries = dashboard_queries()
    must_show = [
        "Service states",
        "Seconds to expiry",
        "Refresh outcomes",
        "Upstream calls by region and status",
        "Local requests by route and status",
    ]

    async def answered(title: str) -> list[Any]:
        data = await prometheus.api("query", query=queries[title])
        result: list[Any] = data["result"]
        return result

    for title in must_show:
        await prometheus.until(title, functools.partial(answered, title))
    [state] = await answered("Service states")
    assert state["metric"]["service"] == "fraud"
    assert state["value"][1] == "1"  # fresh
    for title in queries:
        await answered(title)
