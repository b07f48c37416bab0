"""`make bench`: measure the broker as a real process against the in-process emulator.

Writes bench/results/latest.json (every figure with its unit, the machine, the targets
met or missed); bench/report.py renders it into docs/benchmarks.md and a plot.

Layout on a 2-CPU machine: the broker and the reference servers run on CPU 1; this
process (the emulator) and the load generator (bench/loadgen.py) on CPU 0. Comparisons
are interleaved (A B A B …) and reported as medians of rounds.

Knobs: BENCH_QUICK=1 (short runs, for trying the script), BENCH_ROUNDS, BENCH_DURATION_S,
BENCH_IDLE_S (idle CPU window, default 60), BENCH_HAMMER_S, BENCH_INSTALL=1 (apt-get
install nginx when missing, for the static-file reference, and redis-server, for the fleet
section), BENCH_FLEET_PROCESSES (real brokers sharing one Redis, default "1,5,10"),
BENCH_FLEET_SWARMS (light in-process brokers, default "100,1000"), BENCH_FLEET_CYCLES
(refresh cycles measured at each size, default 3).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib.util
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import scoring
from generators import Target, ensure_tools, measure, proc_cpu_s

from broker.emulator import Emulator
from broker.emulator import mms as emulator_mms
from broker.emulator import seed as demo

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "latest.json"
QUICK = os.environ.get("BENCH_QUICK") == "1"
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "1" if QUICK else "3"))
DURATION_S = float(os.environ.get("BENCH_DURATION_S", "2" if QUICK else "5"))
IDLE_S = float(os.environ.get("BENCH_IDLE_S", "10" if QUICK else "60"))
HAMMER_S = float(os.environ.get("BENCH_HAMMER_S", "12" if QUICK else "25"))
READY_TIMEOUT_S = float(os.environ.get("BENCH_READY_TIMEOUT_S", "15" if QUICK else "45"))
STORM_WINDOW_S = float(os.environ.get("BENCH_STORM_S", "5" if QUICK else "10"))
INSTALL = os.environ.get("BENCH_INSTALL") == "1"
TOOLS = ensure_tools(INSTALL)
CONNECTIONS = (16, 64)
CPUS_USABLE = len(os.sched_getaffinity(0))  # before this process pins itself
TWO_CPUS = CPUS_USABLE >= 2
SERVER_CPU, CLIENT_CPU = (1, 0) if TWO_CPUS else (None, None)

BIG = int(os.environ.get("BENCH_BIG", "10000"))  # services in the largest configuration
STORM = int(os.environ.get("BENCH_STORM", "1000"))  # services refreshing together
# Long-lived: once the start-up storm is over, nothing refreshes during the idle window.
STORM_LIFETIME_S, STORM_REFRESH_AFTER_S = 3600.0, 1800.0
HAMMER_SERVICES, HAMMER_CLIENTS = 10, 100
HAMMER_LIFETIME_S, HAMMER_REFRESH_AFTER_S, HAMMER_MARGIN_S = 12.0, 11.0, 1.0
METADATA = "Metadata: true"


def _sizes(name: str, default: str) -> tuple[int, ...]:
    return tuple(int(x) for x in os.environ.get(name, default).split(",") if x)


# Fleet mode: brokers of one configuration sharing one Redis. Tokens live 12 s and are
# refreshed about every 8 s (refreshAfter 11 s in whole seconds, a margin of 2 s and a
# jitter up to 2 s: the most a lead of 10 s allows, a fifth each).
FLEET_SERVICES = 3
FLEET_LIFETIME_S, FLEET_REFRESH_AFTER_S, FLEET_PERIOD_S = 12.0, 11.0, 8.0
FLEET_PROCESSES = _sizes("BENCH_FLEET_PROCESSES", "1,3" if QUICK else "1,5,10")
FLEET_SWARMS = _sizes("BENCH_FLEET_SWARMS", "100" if QUICK else "100,1000")
FLEET_CYCLES = int(os.environ.get("BENCH_FLEET_CYCLES", "1" if QUICK else "3"))
FLEET_LEASE_S = 10  # its waiters look again every second (lease_s / 10), as at the default
FLEET_RAMP_S = 10.0  # light brokers start over this long, as a rolling update brings pods up
FLEET_REFRESH = (
    "margin_s = 2\njitter_s = 2\nclock_skew_s = 0.5\n"
    "service_calls_burst = 100000\nservice_calls_per_minute = 600000\n"
)


def bench_name(i: int) -> str:
    return f"bench-{i:05d}"


def fleet_name(i: int) -> str:
    return f"fleet-{i:02d}"


def log(*parts: object) -> None:
    print("[bench]", *parts, file=sys.stderr, flush=True)


def pin(cpu: int | None) -> Any:
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_children(pid: int) -> list[int]:
    """A process and its children (nginx's master and its worker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *(int(c) for c in children)]


def proc_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


# -- the emulator's cloud -------------------------------------------------------------------


def build_state() -> Any:
    state = demo.demo_state(token_lifetime_s=3600.0, refresh_after_s=1800.0)
    ws = (demo.SUBSCRIPTION_ID, demo.RESOURCE_GROUP, demo.WORKSPACE)
    for i in range(FLEET_SERVICES):
        state.add_web_service(
            *ws,
            fleet_name(i),
            token_lifetime_s=FLEET_LIFETIME_S,
            refresh_after_s=FLEET_REFRESH_AFTER_S,
        )
    for i in range(BIG):
        state.add_web_service(*ws, bench_name(i), token_lifetime_s=3600.0)
    for i in range(STORM):
        state.add_web_service(
            *ws,
            f"storm-{i:04d}",
            token_lifetime_s=STORM_LIFETIME_S,
            refresh_after_s=STORM_REFRESH_AFTER_S,
        )
    state.add_web_service(*ws, PROXY_SERVICE, token_lifetime_s=3600.0)
    for i in range(HAMMER_SERVICES):
        state.add_web_service(
            *ws,
            f"hammer-{i:02d}",
            token_lifetime_s=HAMMER_LIFETIME_S,
            refresh_after_s=HAMMER_REFRESH_AFTER_S,
        )
    return state


_SERVICE = """
[[service]]
name = "{0}"
subscription_id = "{1}"
resource_group = "{2}"
workspace = "{3}"
web_service = "{0}"
"""


def config_text(
    emu: Emulator, directory: Path, services: list[str], refresh: str, extra: str = ""
) -> str:
    secret = directory / "client-secret"
    secret.write_text(demo.CLIENT_SECRET + "\n")
    secret.chmod(0o600)
    head = f"""\
{extra}
[listen.unix]
path = "{directory / "broker.sock"}"

[listen.tcp]
host = "127.0.0.1"
port = {free_port()}

{emu.cloud_profile_toml()}
[refresh]
{refresh}

[identity.main]
tenant_id = "{demo.TENANT_ID}"
client_id = "{demo.CLIENT_ID}"
client_secret_file = "{secret}"
"""
    ws = (demo.SUBSCRIPTION_ID, demo.RESOURCE_GROUP, demo.WORKSPACE)
    return head + "".join(_SERVICE.format(name, *ws) for name in services)


# -- processes under test ------------------------------------------------------------------


async def http_get(unix: str, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_unix_connection(unix)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{METADATA}\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


class Broker:
    """`python -m broker run -c FILE` on the server CPU, timed from exec."""

    def __init__(
        self,
        emu: Emulator,
        services: list[str],
        refresh: str,
        env: dict[str, str] | None = None,
        extra: str = "",
    ) -> None:
        """`extra`: TOML ahead of the listeners, e.g. `[listen]` keys or `[proxy]`."""
        self.env = None if env is None else {**os.environ, **env}
        self.dir = Path(tempfile.mkdtemp(prefix="tbb-", dir="/tmp"))
        self.config = self.dir / "broker.toml"
        self.config.write_text(config_text(emu, self.dir, services, refresh, extra))
        self.sock = str(self.dir / "broker.sock")
        self.port = int(self.config.read_text().split("port = ")[1].split()[0])
        self.proc: asyncio.subprocess.Process | None = None
        self.listening_s = self.ready_s = float("nan")
        self.ready_at = 0.0  # epoch
        self.t0 = 0.0
        self.waiting_at_timeout: int | None = None

    async def start(
        self, ready_poll_s: float = 0.02, timeout: float = READY_TIMEOUT_S, wait_ready: bool = True
    ) -> Broker:
        stderr = (self.dir / "broker.log").open("wb")
        t0 = time.perf_counter()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "broker",
            "run",
            "-c",
            str(self.config),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
            preexec_fn=pin(SERVER_CPU),
            env=self.env,
        )
        while True:
            with contextlib.suppress(OSError):
                _, w = await asyncio.open_unix_connection(self.sock)
                w.close()
                break
            if self.proc.returncode is not None:
                raise RuntimeError(f"broker exited: see {self.dir / 'broker.log'}")
            await asyncio.sleep(0.002)
        self.listening_s = time.perf_counter() - t0
        self.t0 = t0
        if wait_ready:
            await self.wait_ready(ready_poll_s, timeout)
        return self

    async def wait_ready(self, poll_s: float = 0.02, timeout: float = READY_TIMEOUT_S) -> bool:
        """Wait for /readyz; past `timeout`, record how many services were still waiting."""
        deadline = self.t0 + timeout
        while True:
            status, body = await http_get(self.sock, "/readyz")
            if status == 200:
                self.ready_s = time.perf_counter() - self.t0
                self.ready_at = time.time()
                return True
            if time.perf_counter() > deadline:
                self.waiting_at_timeout = len(json.loads(body)["waiting_for"])
                self.ready_at = time.time()
                return False
            await asyncio.sleep(poll_s)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def pids(self) -> list[int]:
        return [self.pid]

    def events(self, name: str) -> list[dict[str, Any]]:
        """The broker's log events called `name` so far (it logs JSON to broker.log)."""
        found = []
        for line in (self.dir / "broker.log").read_text().splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == name:
                    found.append(event)
        return found

    @property
    def event_loop(self) -> str:
        """Which event loop the process runs: uvloop when its library is mapped."""
        return "uvloop" if "uvloop" in Path(f"/proc/{self.pid}/maps").read_text() else "asyncio"

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class Reference:
    """A reference server (bare aiohttp, nginx) on the server CPU, TCP + Unix."""

    def __init__(self, name: str, argv: list[str], port: int, sock: str) -> None:
        self.name, self.argv, self.port, self.sock = name, argv, port, sock
        self.proc: asyncio.subprocess.Process | None = None

    async def start_tcp(self) -> Reference:
        """Start a server that has only its TCP port (the scoring host)."""
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdout=asyncio.subprocess.DEVNULL, preexec_fn=pin(SERVER_CPU)
        )
        for _ in range(500):
            with contextlib.suppress(OSError):
                _, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.close()
                return self
            await asyncio.sleep(0.01)
        raise RuntimeError(f"{self.name} did not start")

    async def start(self) -> Reference:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdout=asyncio.subprocess.DEVNULL, preexec_fn=pin(SERVER_CPU)
        )
        for _ in range(500):
            with contextlib.suppress(OSError):
                _, w = await asyncio.open_unix_connection(self.sock)
                w.close()
                return self
            await asyncio.sleep(0.01)
        raise RuntimeError(f"{self.name} did not start")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def pids(self) -> list[int]:
        return with_children(self.pid)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()


def nginx_reference(binary: str, directory: Path, body: bytes) -> Reference:
    (directory / "token.json").write_bytes(body)
    port, sock = free_port(), str(directory / "nginx.sock")
    user = "user root;" if os.geteuid() == 0 else ""
    (directory / "nginx.conf").write_text(f"""\
{user}
worker_processes 1;
daemon off;
master_process on;
pid {directory}/nginx.pid;
error_log {directory}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  keepalive_requests 100000000;
  server {{
    listen 127.0.0.1:{port};
    listen unix:{sock};
    location / {{ root {directory}; default_type application/json;
                 rewrite ^ /token.json break; }}
  }}
}}
""")
    argv = [binary, "-p", str(directory), "-c", str(directory / "nginx.conf")]
    return Reference("nginx", argv, port, sock)


# -- load ----------------------------------------------------------------------------------


async def load(
    target: tuple[str, str],
    connections: int,
    duration: float,
    paths: list[str],
    server_pid: int | None = None,
    timeline: Path | None = None,
    warmup: float = 0.5,
) -> dict[str, Any]:
    kind, address = target
    argv = [
        sys.executable,
        str(ROOT / "bench" / "loadgen.py"),
        f"--{kind}",
        address,
        "-c",
        str(connections),
        "-d",
        str(duration),
        "--warmup",
        str(warmup),
        "--header",
        METADATA,
    ]
    if CLIENT_CPU is not None:
        argv += ["--cpu", str(CLIENT_CPU)]
    if len(paths) > 50:
        paths_file = Path(tempfile.mkstemp(prefix="tbb-paths-", dir="/tmp")[1])
        paths_file.write_text("\n".join(paths))
        argv += ["--paths-file", str(paths_file)]
    else:
        paths_file = None
        for p in paths:
            argv += ["--path", p]
    if timeline is not None:
        argv += ["--timeline", str(timeline)]
    cpu0, t0 = (proc_cpu_s(server_pid) if server_pid else 0.0), time.perf_counter()
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    wall = time.perf_counter() - t0
    if paths_file is not None:
        paths_file.unlink()
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen failed: {argv}")
    result: dict[str, Any] = json.loads(out)
    if server_pid:
        result["server_cpu_pct"] = 100 * (proc_cpu_s(server_pid) - cpu0) / wall
    return result


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "rps": median_of(runs, "rps"),
        "p50_ms": median_of(runs, "p50_ms"),
        "p99_ms": median_of(runs, "p99_ms"),
        "errors": sum(r["errors"] for r in runs),
        "server_cpu_pct": median_of(runs, "server_cpu_pct")
        if "server_cpu_pct" in runs[0]
        else None,
        "generator_cpu_pct": median_of(runs, "generator_cpu_pct")
        if "generator_cpu_pct" in runs[0]
        else None,
        "server_cpu_us_per_request": median_of(runs, "server_cpu_us_per_request")
        if "server_cpu_us_per_request" in runs[0]
        else None,
        "rounds_rps": [round(r["rps"], 1) for r in runs],
    }


# -- the phases ----------------------------------------------------------------------------


LONG_REFRESH = "max_concurrency = 64"
OPEN_PRINCIPAL = "\nprincipal_calls_burst = 100000\nprincipal_calls_per_minute = 6000000"


FRONT_DOOR_OFF = "broker-aiohttp"
ROUTES = {"token": "", "header": "?format=header", "healthz": None, "varied": ""}
# A token request different from the last each time (a counting X-Request-Id): what a
# client gets that never sends the same bytes twice, from the front door's full path
# (it sends an answer again only for the same bytes). wrk only: TCP.
VARIED = "varied"


def route_path(route: str) -> str:
    if route == "healthz":
        return "/healthz"
    return f"/v1/token/{bench_name(0)}{ROUTES[route]}"


def measured(route: str, transport: str) -> bool:
    return route != VARIED or transport == "tcp"


async def throughput(emu: Emulator, work: Path) -> dict[str, Any]:
    """The token route, `?format=header` and /healthz against bare aiohttp and nginx,
    TCP (wrk) and Unix (h2load), 16 and 64 connections, interleaved rounds.

    `broker` is the front door on (the default); `broker-aiohttp` the same broker with
    `[listen] front_door = false`, every request through aiohttp. The references answer
    every path with the token route's body; the bare aiohttp one runs on the broker's
    event loop."""
    broker = await Broker(emu, [bench_name(0)], LONG_REFRESH).start()
    status, body = await http_get(broker.sock, route_path("token"))
    assert status == 200, body
    (work / "body.json").write_bytes(body)
    servers: dict[str, Any] = {"broker": broker}
    loop = broker.event_loop
    off = Broker(emu, [bench_name(0)], LONG_REFRESH, extra="[listen]\nfront_door = false\n")
    servers[FRONT_DOOR_OFF] = await off.start()
    ref_sock = str(work / "ref.sock")
    ref_port = free_port()
    bare = Reference(
        "aiohttp",
        [
            sys.executable,
            str(ROOT / "bench" / "refserver.py"),
            str(work / "body.json"),
            str(ref_port),
            ref_sock,
            loop,
        ],
        ref_port,
        ref_sock,
    )
    servers["aiohttp"] = await bare.start()
    nginx, nginx_note = TOOLS["nginx"], None
    if nginx:
        ndir = work / "nginx"
        ndir.mkdir()
        servers["nginx"] = await nginx_reference(nginx, ndir, body).start()
    else:
        nginx_note = "nginx not installed (apt-get install nginx, or BENCH_INSTALL=1)"
        log(nginx_note)
    # (server, route) pairs: every route on the broker, the token route elsewhere.
    plan = (
        [("broker", route) for route in ROUTES]
        + [(name, "token") for name in servers if name != "broker"]
        + [(name, VARIED) for name in servers if name not in ("broker", FRONT_DOOR_OFF)]
    )
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        for transport in ("tcp", "unix"):
            for conns in CONNECTIONS:
                for rnd in range(ROUNDS):
                    order = plan[rnd % len(plan) :] + plan[: rnd % len(plan)]
                    for name, route in order:
                        if not measured(route, transport):
                            continue
                        srv = servers[name]
                        target = Target(
                            transport,
                            f"127.0.0.1:{srv.port}" if transport == "tcp" else srv.sock,
                            route_path(route),
                            (METADATA,),
                            varied=route == VARIED,
                        )
                        r = await measure(target, conns, DURATION_S, srv.pids, CLIENT_CPU)
                        key = f"{name}/{route}/{transport}/{conns}"
                        runs.setdefault(key, []).append(r)
                        log(
                            f"{name:15} {route:8} {transport:4} c={conns:<3} {r['rps']:9.0f} req/s "
                            f"p99 {r['p99_ms']:.2f} ms {r['server_cpu_us_per_request']:.1f} µs/req"
                        )
    finally:
        for srv in servers.values():
            await srv.stop()
    table = {key: summary(v) for key, v in runs.items()}
    ratios: dict[str, Any] = {}
    for route in ROUTES:
        for transport in ("tcp", "unix"):
            if not measured(route, transport):
                continue
            for conns in CONNECTIONS:
                cell = f"{transport}/{conns}"
                b = table[f"broker/{route}/{cell}"]["rps"]
                reference = VARIED if route == VARIED else "token"
                ngx = table.get(f"nginx/{reference}/{cell}")
                ratios[f"{route}/{cell}"] = {
                    "vs_aiohttp": b / table[f"aiohttp/{reference}/{cell}"]["rps"],
                    "vs_nginx": b / ngx["rps"] if ngx else None,
                    "vs_front_door_off": (
                        b / table[f"{FRONT_DOOR_OFF}/token/{cell}"]["rps"]
                        if route == "token"
                        else None
                    ),
                }
    return {
        "servers": list(servers),
        "routes": {route: route_path(route) for route in ROUTES},
        "event_loop": loop,
        "body_bytes": len(body),
        "nginx_note": nginx_note,
        "generators": {"tcp": "wrk -t1", "unix": "h2load --h1 -t1 -B unix:…"},
        "results": table,
        "ratios": ratios,
    }


PROXY_SERVICE = "proxy-target"
PROXY_CONNECTIONS = (1, 16)


async def proxy_overhead(emu: Emulator, work: Path) -> dict[str, Any]:
    """`POST /v1/proxy/{service}` to nginx over HTTPS against the same POSTs sent straight
    to nginx (wrk, keep-alive both ways): added p50/p99 and the req/s ratio.

    The service's scoring URI is nginx's: the emulator's MMS description of that one
    service is pointed at it (bench/scoring.py says why nginx), and the broker's
    `[cloud] ca_bundle` holds the emulator's CA and the test CA nginx's certificate is
    signed by."""
    nginx = TOOLS["nginx"]
    if nginx is None:
        return {"note": "nginx not installed (apt-get install nginx, or BENCH_INSTALL=1)"}
    pdir = work / "scoring"
    pdir.mkdir()
    ca, leaf, key = scoring.test_certificates(pdir)
    port = free_port()
    score_url = f"https://127.0.0.1:{port}/api/v1/service/{PROXY_SERVICE}/score"
    conf = scoring.nginx_scoring_conf(pdir, port, leaf, key)
    bundle = pdir / "bundle.pem"
    bundle.write_bytes(emu.ca_path.read_bytes() + ca.read_bytes())
    original = emulator_mms.scoring_uri

    def scoring_uri(request: Any, service: Any) -> str:
        return score_url if service.name == PROXY_SERVICE else original(request, service)

    emulator_mms.scoring_uri = scoring_uri
    host = Reference("nginx-scoring", [nginx, "-p", str(pdir), "-c", str(conf)], port, "")
    broker = Broker(emu, [PROXY_SERVICE], LONG_REFRESH)
    broker.config.write_text(broker.config.read_text().replace(str(emu.ca_path), str(bundle)))
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        await host.start_tcp()
        await broker.start()
        direct = Target(
            "https",
            f"127.0.0.1:{port}",
            f"/api/v1/service/{PROXY_SERVICE}/score",
            ("Content-Type: application/json",),
            "POST",
            scoring.REQUEST_BODY,
        )
        proxied = Target(
            "tcp",
            f"127.0.0.1:{broker.port}",
            f"/v1/proxy/{PROXY_SERVICE}",
            (METADATA, "Content-Type: application/json"),
            "POST",
            scoring.REQUEST_BODY,
        )
        for conns in PROXY_CONNECTIONS:
            for rnd in range(ROUNDS):
                pair = [("direct", direct, host.pids), ("proxied", proxied, broker.pids)]
                for name, target, pids in pair if rnd % 2 == 0 else pair[::-1]:
                    r = await measure(target, conns, DURATION_S, pids, CLIENT_CPU)
                    runs.setdefault(f"{name}/{conns}", []).append(r)
                    log(
                        f"proxy {name:8} c={conns:<3} {r['rps']:8.0f} req/s "
                        f"p50 {r['p50_ms']:.3f} p99 {r['p99_ms']:.3f} ms "
                        f"{r['server_cpu_us_per_request']:.1f} µs/req"
                    )
    finally:
        emulator_mms.scoring_uri = original
        await broker.stop()
        await host.stop()
    table = {k: summary(v) for k, v in runs.items()}
    added = {
        str(c): {
            "p50_ms": table[f"proxied/{c}"]["p50_ms"] - table[f"direct/{c}"]["p50_ms"],
            "p99_ms": table[f"proxied/{c}"]["p99_ms"] - table[f"direct/{c}"]["p99_ms"],
            "rps_ratio": table[f"proxied/{c}"]["rps"] / table[f"direct/{c}"]["rps"],
        }
        for c in PROXY_CONNECTIONS
    }
    return {
        "scoring_host": "nginx 1 worker, HTTPS (TLS 1.3, P-256 test certificate), fixed body",
        "request": f"POST, {len(scoring.REQUEST_BODY)}-byte JSON body; "
        f"answer {len(scoring.SCORE_BODY)} bytes",
        "client": "wrk, keep-alive; the broker keeps its own connections to nginx",
        "results": table,
        "added": added,
    }


async def refresh_storm(emu: Emulator, work: Path) -> dict[str, Any]:
    """p99 of one ready service while 1,000 others fetch their tokens at once, against its
    p99 in the same broker once they all have theirs: each round a new broker, its storm
    window and then its idle window; medians over the rounds.

    The broker's start-up fetch of every service is the storm: it is the same refresh
    code path, all services at once, bounded by `max_concurrency`.
    """
    names = [f"storm-{i:04d}" for i in range(STORM)]
    refresh = "max_concurrency = 64\nmargin_s = 0\njitter_s = 0\nclock_skew_s = 1"
    state = emu.state
    path = f"/v1/token/{bench_name(0)}"
    rounds = []
    for _ in range(ROUNDS):
        base = state.count("mms.token")
        broker = Broker(emu, [bench_name(0), *names], refresh)
        await broker.start(wait_ready=False)
        try:
            while (await http_get(broker.sock, path))[0] != 200:
                await asyncio.sleep(0.01)
            at_load = state.count("mms.token") - base
            target = ("unix", broker.sock)
            storm = await load(target, 16, STORM_WINDOW_S, [path], broker.pid, warmup=0.0)
            during = state.count("mms.token") - base - at_load
            ready = await broker.wait_ready(0.5)
            idle = await load(target, 16, STORM_WINDOW_S, [path], broker.pid, warmup=0.0)
            after = state.count("mms.token") - base - at_load - during
        finally:
            await broker.stop()
        rounds.append(
            {
                "upstream_fetches_before_load": at_load,
                "upstream_fetches_during_load": during,
                "upstream_fetches_during_idle": after,
                "all_ready_after_storm": ready,
                "storm": _window(storm),
                "idle": _window(idle),
                "p99_ratio": storm["p99_ms"] / idle["p99_ms"],
            }
        )
    during = statistics.median(r["upstream_fetches_during_load"] for r in rounds)
    return {
        "services": STORM,
        "max_concurrency": 64,
        "connections": 16,
        "transport": "unix",
        "window_s": STORM_WINDOW_S,
        "rounds": rounds,
        "upstream_fetches_during_load": during,
        "fetch_rate_per_s": during / STORM_WINDOW_S,
        "all_ready_by_end": all(r["all_ready_after_storm"] for r in rounds),
        "storm": _median_window([r["storm"] for r in rounds]),
        "idle": _median_window([r["idle"] for r in rounds]),
        "idle_p99_ms": statistics.median(r["idle"]["p99_ms"] for r in rounds),
        "p99_ratio": statistics.median(r["p99_ratio"] for r in rounds),
    }


def _window(r: dict[str, Any]) -> dict[str, Any]:
    return {k: r[k] for k in ("rps", "p50_ms", "p99_ms", "max_ms", "errors", "server_cpu_pct")}


def _median_window(windows: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: statistics.median(w[k] for w in windows) for k in windows[0]}


async def scale(emu: Emulator, work: Path) -> dict[str, Any]:
    """Start-up times and RSS for 10/1,000/10,000 services; req/s 10,000 vs 1 service."""
    startup: dict[str, Any] = {}
    big: Broker | None = None
    one: Broker | None = None
    try:
        for n in (10, 1_000, BIG):
            starts: list[dict[str, Any]] = []
            for _ in range(ROUNDS if n == 10 else 1):
                b = Broker(emu, [bench_name(i) for i in range(n)], LONG_REFRESH)
                await b.start(ready_poll_s=0.02 if n <= 1000 else 0.1)
                log(
                    f"{n} services: listening {b.listening_s:.3f} s, ready {b.ready_s:.2f} s, "
                    f"waiting {b.waiting_at_timeout}"
                )
                await asyncio.sleep(2.0)
                starts.append(
                    {
                        "listening_s": b.listening_s,
                        "ready_s": b.ready_s,
                        "rss_mib": proc_rss_mib(b.pid),
                        "waiting_at_timeout": b.waiting_at_timeout,
                    }
                )
                if n == BIG:
                    big = b
                else:
                    await b.stop()
            startup[str(n)] = {
                "listening_s": statistics.median(s["listening_s"] for s in starts),
                "ready_s": statistics.median(s["ready_s"] for s in starts),
                "rss_mib": statistics.median(s["rss_mib"] for s in starts),
                "runs": len(starts),
                "ready_timeout_s": READY_TIMEOUT_S,
                "services_waiting_at_timeout": starts[-1]["waiting_at_timeout"],
            }
        # Req/s is compared once the 10,000-service broker holds every credential: under
        # the default call budget its start-up takes minutes (that broker's start is the
        # figure above), so this one has the principal's budget opened.
        assert big is not None
        await big.stop()
        big = Broker(emu, [bench_name(i) for i in range(BIG)], LONG_REFRESH + OPEN_PRINCIPAL)
        await big.start(ready_poll_s=0.1)
        log(f"{BIG} services, principal's budget open: ready {big.ready_s:.2f} s")
        one = Broker(emu, [bench_name(0)], LONG_REFRESH)
        await one.start()
        # One path, so wrk (TCP) measures it like the throughput phase.
        paths_big = [f"/v1/token/{bench_name(0)}"]
        runs: dict[str, list[dict[str, Any]]] = {"1": [], str(BIG): []}
        for rnd in range(ROUNDS):
            pair = [("1", one, [f"/v1/token/{bench_name(0)}"]), (str(BIG), big, paths_big)]
            for key, b, paths in pair if rnd % 2 == 0 else pair[::-1]:
                target = Target("tcp", f"127.0.0.1:{b.port}", paths[0], (METADATA,))
                r = await measure(target, 16, DURATION_S, b.pids, CLIENT_CPU)
                runs[key].append(r)
                log(f"{key:>5} services: {r['rps']:.0f} req/s")
        scaling: dict[str, Any] = {k: summary(v) for k, v in runs.items()}
        scaling["ratio"] = scaling[str(BIG)]["rps"] / scaling["1"]["rps"]
        scaling["transport"], scaling["connections"] = "tcp", 16
        scaling["ready_s"] = big.ready_s
        scaling["note"] = f"both are asked for {bench_name(0)}; the {BIG}-service broker " + (
            f"(the principal's call budget opened) was ready after {big.ready_s:.1f} s"
            if big.waiting_at_timeout is None
            else f"still fetching ({big.waiting_at_timeout} services waiting at "
            f"{READY_TIMEOUT_S:g} s), so its start-up work competes with the requests"
        )
    finally:
        for left in (big, one):
            if left is not None:
                await left.stop()
    return {"startup": startup, "scaling": scaling}


async def hammer(emu: Emulator, work: Path) -> dict[str, Any]:
    """Upstream token calls per service while 100 local clients ask continuously."""
    names = [f"hammer-{i:02d}" for i in range(HAMMER_SERVICES)]
    refresh = f"margin_s = {HAMMER_MARGIN_S}\njitter_s = 0\nclock_skew_s = 0.5"
    before = {n: emu.state.count("mms.token", service=n) for n in names}
    broker = await Broker(emu, names, refresh).start()
    period = HAMMER_REFRESH_AFTER_S - HAMMER_MARGIN_S
    paths = [f"/v1/token/{n}" for n in names]
    try:
        r = await load(("unix", broker.sock), HAMMER_CLIENTS, HAMMER_S, paths, broker.pid)
        elapsed = time.time() - broker.ready_at
    finally:
        await broker.stop()
    calls = {n: emu.state.count("mms.token", service=n) - before[n] for n in names}
    # Tokens the schedule needs: the first plus one per refresh period elapsed.
    scheduled = 1 + int(elapsed // period)
    lifetimes = elapsed / HAMMER_LIFETIME_S
    return {
        "services": HAMMER_SERVICES,
        "clients": HAMMER_CLIENTS,
        "transport": "unix",
        "token_lifetime_s": HAMMER_LIFETIME_S,
        "refresh_period_s": period,
        "elapsed_s": elapsed,
        "calls_per_service": calls,
        "scheduled_calls_per_service": scheduled,
        "max_extra_calls": max(c - scheduled for c in calls.values()),
        "calls_per_service_per_lifetime": max(calls.values()) / max(lifetimes, 1.0),
        "calls_per_service_per_refresh_period": max(calls.values()) / scheduled,
        "load": {k: r[k] for k in ("rps", "p50_ms", "p99_ms", "errors")},
    }


# -- fleet mode ----------------------------------------------------------------------------


class Redis:
    """A redis-server of the bench's own on a Unix socket, persisting nothing."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary, self.directory = binary, directory
        self.socket = directory / "redis.sock"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> Redis:
        self.proc = await asyncio.create_subprocess_exec(
            self.binary,
            *("--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700"),
            *("--save", "", "--appendonly", "no", "--dir", str(self.directory)),
            *("--maxclients", "15000", "--logfile", str(self.directory / "redis.log")),
            stdout=asyncio.subprocess.DEVNULL,
            preexec_fn=pin(CLIENT_CPU),
        )
        for _ in range(500):
            with contextlib.suppress(OSError):
                if self.cli("PING").strip() == "PONG":
                    return self
            await asyncio.sleep(0.01)
        raise RuntimeError("redis-server did not start")

    def cli(self, *args: str) -> str:
        """One command's answer (a status or a bulk string), over the socket."""
        command = b"*%d\r\n" % len(args) + b"".join(
            b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args
        )
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(10)
            conn.connect(str(self.socket))
            conn.sendall(command)
            answer = b""
            while not answer.endswith(b"\r\n") or (
                answer.startswith(b"$") and len(answer) < _bulk_length(answer)
            ):
                chunk = conn.recv(1 << 16)
                if not chunk:
                    break
                answer += chunk
        if answer.startswith(b"-"):
            raise RuntimeError(f"redis: {answer.decode().strip()}")
        head, _, body = answer.partition(b"\r\n")
        return (body if head.startswith(b"$") else head[1:]).decode()

    def clients(self) -> int:
        for line in self.cli("INFO", "clients").splitlines():
            if line.startswith("connected_clients:"):
                return int(line.split(":")[1])
        return 0

    def commands(self) -> dict[str, int]:
        """Commands Redis has run, by name (`INFO commandstats`), the bench's own left out."""
        counts = {}
        for line in self.cli("INFO", "commandstats").splitlines():
            if line.startswith("cmdstat_"):
                name, _, stats = line.removeprefix("cmdstat_").partition(":")
                if name not in ("info", "flushall", "ping"):
                    counts[name] = int(stats.split("calls=")[1].split(",")[0])
        return counts

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()


def _bulk_length(answer: bytes) -> int:
    """The whole length of a RESP bulk string answer, from its header."""
    head = answer.split(b"\r\n", 1)[0]
    return len(head) + 2 + int(head[1:]) + 2


def redis_binary() -> str | None:
    found = shutil.which("redis-server")
    if found is None and INSTALL:
        log("installing redis-server (BENCH_INSTALL=1)")
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "redis-server"],
            check=False,
            stdout=subprocess.DEVNULL,
        )
        found = shutil.which("redis-server")
    return found


def fleet_table(redis: Redis, key_file: Path, *, light: bool = False) -> str:
    """`[fleet]` on the bench's Redis. Light brokers share one event loop, whose lag counts
    against every command's bound: theirs are raised, or a loaded machine makes them give
    up on a Redis that answers."""
    timeouts = "connect_timeout_s = 10\ncommand_timeout_s = 5\n" if light else ""
    return (
        f'\n[fleet]\nenabled = true\nredis_url = "unix://{redis.socket}"\n'
        f'encryption_key_file = "{key_file}"\nlease_s = {FLEET_LEASE_S}\n{timeouts}'
    )


class Swarm:
    """`bench/swarm.py`: many light in-process brokers in one process on the server CPU."""

    def __init__(self, emu: Emulator, services: list[str], extra: str, count: int) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tbb-swarm-", dir="/tmp"))
        self.config = self.dir / "broker.toml"
        self.config.write_text(config_text(emu, self.dir, services, FLEET_REFRESH) + extra)
        self.count = count
        self.proc: asyncio.subprocess.Process | None = None
        self.ready_s = float("nan")
        self.waiting = 0
        self.seen: dict[str, int] = {}  # what the swarm saw while running (see swarm.py)

    async def start(self) -> Swarm:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(ROOT / "bench" / "swarm.py"),
            *(str(self.config), str(self.count), "--ramp-s", str(FLEET_RAMP_S)),
            *("--ready-timeout", str(READY_TIMEOUT_S * 4)),
            stdout=asyncio.subprocess.PIPE,
            stderr=(self.dir / "swarm.log").open("wb"),
            preexec_fn=pin(SERVER_CPU),
        )
        assert self.proc.stdout is not None
        line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the swarm exited: see {self.dir / 'swarm.log'}")
        report = json.loads(line)
        self.ready_s, self.waiting = report["ready_s"], report["waiting"]
        return self

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            assert self.proc.stdout is not None
            with contextlib.suppress(TimeoutError, ValueError):
                self.seen = json.loads(await asyncio.wait_for(self.proc.stdout.readline(), 60))
            try:
                await asyncio.wait_for(self.proc.wait(), 60)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class TokenCalls:
    """When the emulator was asked for each fleet service's token (its own listener)."""

    def __init__(self, state: Any, services: list[str]) -> None:
        self.state, self.services = state, services
        self.times: dict[str, list[float]] = {name: [] for name in services}
        self._seen = {name: state.count("mms.token", name) for name in services}
        self.close = state.listen(self._heard)

    def _heard(self, what: str, route: str) -> None:
        if what != "called" or route != "mms.token":
            return
        now = time.monotonic()
        for name in self.services:
            count = self.state.count("mms.token", name)
            self.times[name] += [now] * (count - self._seen[name])
            self._seen[name] = count

    def in_window(self, since: float, until: float) -> dict[str, int]:
        """Calls in [since, until), and how many of them came within half a refresh period
        of the call before them for the same service: a second call for one token."""
        calls = again = 0
        for times in self.times.values():
            previous = None
            for when in times:
                if since <= when < until:
                    calls += 1
                    again += previous is not None and when - previous <= FLEET_PERIOD_S / 2
                previous = when
        return {"calls": calls, "second_calls": again}


UPSTREAM_ROUTES = ("entra.token", "arm.workspace", "discovery", "mms.describe", "mms.token")


def route_counts(state: Any) -> dict[str, int]:
    return {route: state.count(route) for route in UPSTREAM_ROUTES}


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after}


async def fleet_size(
    emu: Emulator, redis: Redis, key_file: Path, brokers: int, shared: bool
) -> dict[str, Any]:
    """`brokers` brokers of one configuration started at once (a rollout), then
    FLEET_CYCLES refresh cycles of steady state, then one broker more joining."""
    redis.cli("FLUSHALL")
    names = [fleet_name(i) for i in range(FLEET_SERVICES)]
    real = brokers <= max(FLEET_PROCESSES)
    extra = fleet_table(redis, key_file, light=not real) if shared else ""
    calls = TokenCalls(emu.state, names)
    before = route_counts(emu.state)
    started = time.perf_counter()
    running: list[Broker] | Swarm
    if real:
        running = [Broker(emu, names, FLEET_REFRESH, extra=extra) for _ in range(brokers)]
        await asyncio.gather(*(b.start() for b in running))
        waiting = sum(b.waiting_at_timeout or 0 for b in running)
    else:
        running = await Swarm(emu, names, extra, brokers).start()
        waiting = running.waiting
    ready_s = time.perf_counter() - started
    try:
        startup = delta(route_counts(emu.state), before)
        window_s = FLEET_CYCLES * FLEET_PERIOD_S
        commands0, counts0, t0 = redis.commands(), route_counts(emu.state), time.monotonic()
        await asyncio.sleep(window_s)
        commands1, counts1, t1 = redis.commands(), route_counts(emu.state), time.monotonic()
        clients = redis.clients()
        joining = await join(emu, names, fleet_table(redis, key_file) if shared else "")
    finally:
        calls.close()
        for broker in running if isinstance(running, list) else [running]:
            await broker.stop()
    tokens = calls.in_window(t0, t1)
    per_minute = tokens["calls"] / FLEET_SERVICES / ((t1 - t0) / 60)
    steady = delta(counts1, counts0)
    seen = running.seen if isinstance(running, Swarm) else {}
    log(
        f"{'fleet' if shared else 'alone'} {brokers:5} brokers: ready {ready_s:.1f} s, "
        f"{per_minute:.1f} token calls per service per minute "
        f"({tokens['second_calls']} of {tokens['calls']} a second for one token), "
        f"{sum(delta(commands1, commands0).values()) / (t1 - t0):.0f} Redis commands/s"
        + (
            f", unready in {seen['unready_samples']} of {seen['samples']} looks "
            f"(loop lag up to {seen.get('most_lag_s', 0):.2f} s, "
            f"{seen.get('lag_when_unready_s', 0):.2f} s when unready)"
            if seen
            else ""
        )
    )
    return {
        "brokers": brokers,
        "fleet": shared,
        "kind": "processes" if real else "in-process",
        "ready_s": ready_s,
        "not_ready": waiting,
        "startup_calls": startup,
        "window_s": t1 - t0,
        "steady_calls": steady,
        "token_calls": tokens["calls"],
        "second_calls": tokens["second_calls"],
        "calls_per_token": tokens["calls"] / max(tokens["calls"] - tokens["second_calls"], 1),
        "token_calls_per_service_per_minute": per_minute,
        "unready": seen or None,
        "redis_commands_per_s": sum(delta(commands1, commands0).values()) / (t1 - t0),
        "redis_commands": delta(commands1, commands0),
        "redis_clients": clients,
        "joining": joining,
    }


async def join(emu: Emulator, names: list[str], extra: str) -> dict[str, Any]:
    """One `token-broker run` more, started beside the running ones: time to ready, and
    what it took from Azure and from the fleet (its own log)."""
    broker = Broker(emu, names, FLEET_REFRESH, extra=extra)
    try:
        await broker.start()
        refreshed = broker.events("token.refreshed")
        described = broker.events("service.described")
    finally:
        await broker.stop()
    return {
        "ready_s": broker.ready_s,
        "fetched_from_azure": sum(e.get("source") == "azure" for e in refreshed),
        "adopted_from_fleet": sum(e.get("source") == "fleet" for e in refreshed),
        "described_by_azure": sum(e.get("source") == "azure" for e in described),
    }


async def route_speed(emu: Emulator, redis: Redis, key_file: Path) -> dict[str, Any]:
    """The token route of a broker in fleet mode against one without: twice the usual
    rounds, each an A/B pair in alternating order; the ratios (req/s, and the server's CPU
    time per request, which other load on a shared machine moves less) are the medians of
    the pairs'."""
    servers = {
        "fleet": await Broker(
            emu, [bench_name(0)], LONG_REFRESH, extra=fleet_table(redis, key_file)
        ).start(),
        "alone": await Broker(emu, [bench_name(0)], LONG_REFRESH).start(),
    }
    path = f"/v1/token/{bench_name(0)}"
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        for transport in ("tcp", "unix"):
            for rnd in range(2 * ROUNDS):
                order = list(servers) if rnd % 2 == 0 else list(servers)[::-1]
                for name in order:
                    srv = servers[name]
                    target = (
                        ("tcp", f"127.0.0.1:{srv.port}")
                        if transport == "tcp"
                        else ("unix", srv.sock)
                    )
                    r = await load(target, 16, DURATION_S, [path], srv.pid)
                    runs.setdefault(f"{name}/{transport}/16", []).append(r)
                    log(f"fleet route {name:5} {transport:4} {r['rps']:9.0f} req/s")
    finally:
        for srv in servers.values():
            await srv.stop()
    table = {key: summary(v) for key, v in runs.items()}
    for key, v in runs.items():
        table[key]["cpu_us_per_request"] = statistics.median(cpu_us_per_request(r) for r in v)

    def paired(measure: Any) -> dict[str, list[float]]:
        return {
            f"{t}/16": [
                measure(on) / measure(off)
                for on, off in zip(runs[f"fleet/{t}/16"], runs[f"alone/{t}/16"], strict=True)
            ]
            for t in ("tcp", "unix")
        }

    pairs, cpu_pairs = paired(lambda r: r["rps"]), paired(cpu_us_per_request)
    return {
        "results": table,
        "ratios": {key: statistics.median(v) for key, v in pairs.items()},
        "pair_ratios": {key: [round(x, 3) for x in v] for key, v in pairs.items()},
        "cpu_ratios": {key: statistics.median(v) for key, v in cpu_pairs.items()},
        "cpu_pair_ratios": {key: [round(x, 3) for x in v] for key, v in cpu_pairs.items()},
        "connections": 16,
    }


def cpu_us_per_request(r: dict[str, Any]) -> float:
    """The server's CPU time per request answered, in µs."""
    return float(r["server_cpu_pct"]) / 100 / float(r["rps"]) * 1e6


async def fleet(emu: Emulator, work: Path) -> dict[str, Any]:
    """Brokers sharing one Redis against brokers alone: Azure calls per token at each size,
    Redis commands per second, a joining broker's time to ready, the token route's speed."""
    binary = redis_binary()
    if binary is None:
        note = "redis-server not installed; run with BENCH_INSTALL=1 (or make tools)"
        log(note)
        return {"skipped": note}
    directory = work / "fleet"
    directory.mkdir()
    key_file = directory / "fleet.key"
    key_file.write_bytes(os.urandom(32))
    key_file.chmod(0o600)
    redis = await Redis(binary, directory).start()
    sizes = []
    try:
        for brokers in (*FLEET_PROCESSES, *FLEET_SWARMS):
            for shared in (True, False):
                sizes.append(await fleet_size(emu, redis, key_file, brokers, shared))
        speed = await route_speed(emu, redis, key_file)
    finally:
        await redis.stop()
    largest = max(x["brokers"] for x in sizes)
    at_largest = {x["fleet"]: x["token_calls"] for x in sizes if x["brokers"] == largest}
    biggest_shared = next(x for x in sizes if x["brokers"] == largest and x["fleet"])
    return {
        "services": FLEET_SERVICES,
        "token_lifetime_s": FLEET_LIFETIME_S,
        "refresh_period_s": FLEET_PERIOD_S,
        "cycles": FLEET_CYCLES,
        "lease_s": FLEET_LEASE_S,
        "processes": list(FLEET_PROCESSES),
        "swarms": list(FLEET_SWARMS),
        "ramp_s": FLEET_RAMP_S,
        "rounds": 2 * ROUNDS,
        "duration_s": DURATION_S,
        "sizes": sizes,
        "fewer_calls_at_largest": at_largest[False] / max(at_largest[True], 1),
        "joining": {
            "brokers": largest,
            "fleet": biggest_shared["joining"],
            "alone": next(x for x in sizes if x["brokers"] == largest and not x["fleet"])[
                "joining"
            ],
        },
        "route_speed": speed,
    }


# -- machine and targets -------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    tools: dict[str, str | None] = {
        "load generators": "wrk (TCP, HTTPS), h2load (Unix socket); "
        "bench/loadgen.py for the storm, the hammer and the scaling check"
    }
    try:
        import uvloop

        tools["uvloop (generator; broker when installed)"] = getattr(uvloop, "__version__", "?")
    except ImportError:
        tools["uvloop (generator; broker when installed)"] = None
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if nginx:
        v = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=False)
        tools["nginx"] = v.stderr.strip().split("/")[-1]
    for tool in ("wrk", "h2load"):
        found = TOOLS[tool]
        if found:
            v = subprocess.run([found, "--version"], capture_output=True, text=True, check=False)
            tools[tool] = (
                (v.stdout or v.stderr).strip().splitlines()[0] if (v.stdout or v.stderr) else "?"
            )
        else:
            tools[tool] = None
    return {
        "cpu_model": cpu,
        "cpus": os.cpu_count(),
        "cpus_usable": CPUS_USABLE,
        "pinning": (
            f"broker/references on CPU {SERVER_CPU}, generator + emulator on CPU {CLIENT_CPU}"
            if TWO_CPUS
            else "none (one CPU)"
        ),
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "tools": tools,
    }


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of issue 15, met/missed/None (not measured in this file's runs)."""
    out: list[dict[str, Any]] = []

    def add(name: str, goal: str, value: Any, met: bool | None, unit: str = "") -> None:
        rounded = round(value, 3) if isinstance(value, float) else value
        out.append({"target": name, "goal": goal, "measured": rounded, "unit": unit, "met": met})

    ratios = r.get("throughput", {}).get("ratios", {})
    for route in ("token", "healthz", VARIED):
        for cell in ("tcp/16", "tcp/64", "unix/16", "unix/64"):
            if not measured(route, cell.split("/")[0]):
                continue
            x = ratios.get(f"{route}/{cell}", {})
            v = x.get("vs_nginx")
            label = "token, each request different," if route == VARIED else route
            add(
                f"{label} vs nginx, {cell} conns",
                ">= 0.5x (stretch 0.8x)",
                v,
                None if v is None else v >= 0.5,
                "x",
            )
            v = x.get("vs_aiohttp")
            add(
                f"{label} vs bare aiohttp, {cell} conns",
                ">= 3x",
                v,
                None if v is None else v >= 3.0,
                "x",
            )
    v = r.get("storm", {}).get("p99_ratio")
    add(
        "p99 during 1,000-service refresh storm vs idle p99",
        "<= 2x",
        v,
        None if v is None else v <= 2.0,
        "x",
    )
    proxy = r.get("proxy", {}).get("added", {})
    for conns in ("1", "16"):
        x = proxy.get(conns, {})
        v = x.get("p50_ms")
        add(
            f"proxy added latency p50, {conns} conn",
            "<= 0.3 ms",
            v,
            None if v is None else v <= 0.3,
            "ms",
        )
        v = x.get("p99_ms")
        # Below zero the direct calls' own stalls (this machine's) outweigh the proxy:
        # not a measurement of it.
        add(
            f"proxy added latency p99, {conns} conn"
            + (" (direct p99 noisier)" if v is not None and v < 0 else ""),
            "<= 1 ms",
            v,
            None if v is None or v < 0 else v <= 1.0,
            "ms",
        )
    idle = r.get("idle", {})
    v = idle.get("rss_mib")
    add("RSS idle, 10 services", "<= 50 MiB", v, None if v is None else v <= 50, "MiB")
    v = idle.get("rss_mib_without_dev_tools")
    add(
        "RSS idle, 10 services, without the dev tools' rich (a plain install)",
        "<= 50 MiB",
        v,
        None if v is None else v <= 50,
        "MiB",
    )
    st = r.get("scale", {}).get("startup", {})
    v = st.get("10", {}).get("listening_s", idle.get("listening_s"))
    add("listening after exec (10 services)", "<= 0.5 s", v, None if v is None else v <= 0.5, "s")
    if "10" in st:
        big = st[str(BIG)]
        ready = big["services_waiting_at_timeout"] is None
        add(
            f"RSS idle, {BIG} services" + ("" if ready else " (start-up unfinished)"),
            "<= 120 MiB",
            big["rss_mib"],
            (big["rss_mib"] <= 120) if ready else None,
            "MiB",
        )
        ratio = r["scale"]["scaling"]["ratio"]
        add(f"req/s with {BIG} services vs 1", "within 10 %", ratio, ratio >= 0.9, "x")
    if "cpu_pct" in idle:
        add("idle CPU (10 services)", "<= 0.5 %", idle["cpu_pct"], idle["cpu_pct"] <= 0.5, "%")
    h = r.get("hammer")
    if h:
        add(
            "upstream token calls per service per token under 100 clients",
            "exactly 1",
            h["calls_per_service_per_refresh_period"],
            h["max_extra_calls"] == 0
            and min(h["calls_per_service"].values()) >= h["scheduled_calls_per_service"] - 1,
            "calls",
        )
    if r.get("fleet"):
        _fleet_targets(r["fleet"], add)
    return out


Add = Any  # the `add` of `targets`


def _fleet_targets(f: dict[str, Any], add: Add) -> None:
    if f.get("skipped"):
        add("fleet: upstream token calls per service per token", "exactly 1", None, None)
        return
    shared = [x for x in f["sizes"] if x["fleet"]]
    worst = max(x["calls_per_token"] for x in shared)
    largest = max(x["brokers"] for x in shared)
    add(
        f"fleet: upstream token calls per service per token, every N up to {largest:,}",
        "exactly 1",
        worst,
        worst == 1.0,
        "calls",
    )
    fewer = f.get("fewer_calls_at_largest")
    add(
        f"fleet: fewer Azure token calls than alone at {largest:,} brokers",
        ">= 100x" if largest >= 1000 else f">= {largest // 2}x",
        fewer,
        None if fewer is None else fewer >= (100 if largest >= 1000 else largest // 2),
        "x",
    )
    looked = [x["unready"] for x in shared if x.get("unready")]
    if looked:
        unready = sum(x["unready_samples"] for x in looked)
        add(
            "fleet: looks at the light brokers finding one without a usable credential",
            "0",
            unready,
            unready == 0,
            "looks",
        )
    joining = f["joining"]
    add(
        "fleet: upstream calls by a joining broker",
        "0",
        joining["fleet"]["fetched_from_azure"],
        joining["fleet"]["fetched_from_azure"] == 0,
        "fetches",
    )
    speed = f["route_speed"]
    for key, v in speed.get("cpu_ratios", {}).items():
        add(
            f"fleet: token route's CPU per request, fleet mode on vs off, {key} conns",
            "within 10 %",
            v,
            abs(v - 1.0) <= 0.1,
            "x",
        )


async def plain_install_broker(emu: Emulator, work: Path) -> Broker | None:
    """The idle broker as `pip install token-broker` has it: without `rich`, which the
    development tools bring into this environment and structlog imports whenever it can
    (about 5 MiB). A `rich` that cannot be imported stands in for its absence."""
    if importlib.util.find_spec("rich") is None:
        return None
    stub = work / "without-rich"
    (stub / "rich").mkdir(parents=True, exist_ok=True)
    (stub / "rich" / "__init__.py").write_text('raise ImportError("not in a plain install")\n')
    names = [bench_name(i) for i in range(10)]
    return await Broker(emu, names, LONG_REFRESH, {"PYTHONPATH": str(stub)}).start()


SECTIONS = ("throughput", "proxy", "storm", "scale", "hammer", "idle", "fleet")


def chosen_sections(argv: list[str]) -> list[str]:
    """`--only a,b` or SECTIONS=a,b (the Makefile's); all of them by default."""
    raw = os.environ.get("SECTIONS", "")
    if "--only" in argv:
        raw = argv[argv.index("--only") + 1]
    chosen = [x.strip() for x in raw.split(",") if x.strip()] or list(SECTIONS)
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}: choose from {', '.join(SECTIONS)}")
    return chosen


PHASES = {
    "throughput": throughput,
    "proxy": proxy_overhead,
    "storm": refresh_storm,
    "scale": scale,
    "hammer": hammer,
    "fleet": fleet,
}


async def main() -> None:
    chosen = chosen_sections(sys.argv[1:])
    if CLIENT_CPU is not None:
        os.sched_setaffinity(0, {CLIENT_CPU})
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="tbb-", dir="/tmp"))
    # A partial run keeps the other sections of the last file, each with its own date.
    results: dict[str, Any] = (
        json.loads(RESULTS.read_text()) if len(chosen) < len(SECTIONS) and RESULTS.exists() else {}
    )
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    results.update(
        {
            "date": now,
            "machine": machine(),
            "settings": {
                "rounds": ROUNDS,
                "duration_s": DURATION_S,
                "idle_s": IDLE_S,
                "hammer_s": HAMMER_S,
                "quick": QUICK,
                "connections": list(CONNECTIONS),
                "sections_run": chosen,
            },
        }
    )
    dates = results.setdefault("section_dates", {})
    log("building the emulator's cloud")
    state = build_state()
    try:
        async with Emulator(state=state, ca_dir=work) as emu:
            idle: Broker | None = None
            plain: Broker | None = None
            if "idle" in chosen:
                # The idle broker waits through the other phases; its CPU time is its own.
                idle = await Broker(emu, [bench_name(i) for i in range(10)], LONG_REFRESH).start()
                plain = await plain_install_broker(emu, work)
                await asyncio.sleep(1.0)
                idle_cpu0, idle_t0 = proc_cpu_s(idle.pid), time.perf_counter()
            for name in chosen:
                if name in PHASES:
                    log(name)
                    results[name] = await PHASES[name](emu, work)
                    dates[name] = now
            if idle is not None:
                remaining = IDLE_S - (time.perf_counter() - idle_t0)
                if remaining > 0:
                    log(f"idle broker: {remaining:.0f} s more")
                    await asyncio.sleep(remaining)
                idle_wall = time.perf_counter() - idle_t0
                results["idle"] = {
                    "services": 10,
                    "window_s": idle_wall,
                    "cpu_s": proc_cpu_s(idle.pid) - idle_cpu0,
                    "cpu_pct": 100 * (proc_cpu_s(idle.pid) - idle_cpu0) / idle_wall,
                    "rss_mib": proc_rss_mib(idle.pid),
                    "listening_s": idle.listening_s,
                    "rss_mib_without_dev_tools": (
                        proc_rss_mib(plain.pid) if plain is not None else None
                    ),
                }
                dates["idle"] = now
                await idle.stop()
                if plain is not None:
                    await plain.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["elapsed_s"] = time.time() - started
    results["targets"] = targets(results)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {RESULTS.relative_to(ROOT)} in {results['elapsed_s']:.0f} s")


if __name__ == "__main__":
    asyncio.run(main())
