"""The emulator's lifecycle, TLS, control API and command line."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import sys
from pathlib import Path

import aiohttp
import pytest

from broker.emulator import Emulator, EmulatorState, demo_state, run_emulator, seed
from tests.emulator.conftest import FakeClock

pytestmark = pytest.mark.timeout(15)


def _trusting(ca_path: Path) -> aiohttp.TCPConnector:
    return aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=str(ca_path)))


async def test_hosts_are_the_bound_base_url(tmp_path: Path) -> None:
    """Port 0 binds a real port; every cloud-profile host is the base URL."""
    async with Emulator(ca_dir=tmp_path) as emu:
        port = int(emu.base_url.rsplit(":", 1)[1])
        assert port > 0
        assert emu.base_url == f"https://127.0.0.1:{port}"
        assert emu.authority_host == emu.resource_manager == emu.base_url
        assert emu.region_api.format(region="eastus") == f"{emu.base_url}/regions/eastus"
        assert emu.ca_path == tmp_path / "emulator-ca.pem"
    assert (tmp_path / "emulator-ca.pem").exists()  # the caller's directory is kept


async def test_temporary_ca_is_removed_on_stop() -> None:
    """Without ca_dir the CA lives in a temporary directory that stop() removes."""
    emu = Emulator()
    await emu.start()
    ca_path = emu.ca_path
    assert ca_path.exists()
    await emu.stop()
    assert not ca_path.parent.exists()


def _request_and_keep_open(port: int, ca_path: Path) -> ssl.SSLSocket:
    """A keep-alive HTTPS exchange by a blocking client that then goes idle."""
    context = ssl.create_default_context(cafile=str(ca_path))
    tls = context.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=5), server_hostname="127.0.0.1"
    )
    tls.sendall(b"GET /_emulator/info HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    received = b""
    while not received.endswith(b"}"):
        received += tls.recv(4096)
    return tls


def _tcp_closed_by_peer(tls: ssl.SSLSocket) -> bool:
    """Whether the raw TCP stream under `tls` reaches EOF (the server closed it)."""
    with socket.socket(fileno=os.dup(tls.fileno())) as raw:
        raw.settimeout(5)
        try:
            while raw.recv(4096):
                pass
        except TimeoutError:
            return False
    return True


async def test_stop_closes_connections_of_idle_clients(tmp_path: Path) -> None:
    """stop() closes TLS connections even of a client that never answers close_notify."""
    emu = Emulator(ca_dir=tmp_path)
    await emu.start()
    port = int(emu.base_url.rsplit(":", 1)[1])
    tls = await asyncio.to_thread(_request_and_keep_open, port, emu.ca_path)
    try:
        await emu.stop()
        assert await asyncio.to_thread(_tcp_closed_by_peer, tls)
    finally:
        tls.close()


async def test_unstarted_emulator_has_no_address() -> None:
    """Reading the address before start() is a clear error, not an empty string."""
    with pytest.raises(RuntimeError, match="not been started"):
        _ = Emulator().base_url


async def test_certificate_is_valid_for_localhost(tmp_path: Path) -> None:
    """The server certificate also covers the name localhost."""
    async with Emulator(ca_dir=tmp_path) as emu:
        port = emu.base_url.rsplit(":", 1)[1]
        async with (
            aiohttp.ClientSession(connector=_trusting(emu.ca_path)) as http,
            http.get(f"https://localhost:{port}/_emulator/info") as resp,
        ):
            assert resp.status == 200


async def test_clock_argument_becomes_the_state_clock(tmp_path: Path) -> None:
    """Emulator(clock=…) drives the state's time."""
    clock = FakeClock()
    async with Emulator(clock=clock, ca_dir=tmp_path) as emu:
        assert emu.state.clock() == clock.now


async def test_info_and_unknown_routes_answer_json(
    http: aiohttp.ClientSession, emu: Emulator
) -> None:
    """The info route names the hosts; unknown paths and methods get JSON errors."""
    async with http.get("/_emulator/info") as resp:
        info = await resp.json()
    assert info["base_url"] == emu.base_url
    assert info["ca_path"] == str(emu.ca_path)
    assert info["hosts"]["region_api"] == emu.region_api
    async with http.get("/no/such/route") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "NotFound"
    async with http.delete("/_emulator/info") as resp:
        assert resp.status == 405
        assert (await resp.json())["error"]["code"] == "MethodNotAllowed"


async def test_control_api_mints_federated_tokens(
    http: aiohttp.ClientSession, state: EmulatorState
) -> None:
    """Other languages' tests get a workload-identity token from the control API."""
    state.add_client("t-fed", "c-fed", federated_subject="sa:one")
    async with http.post("/_emulator/federated-token", json={"subject": "sa:one"}) as resp:
        token = (await resp.json())["token"]
    form = {
        "grant_type": "client_credentials",
        "client_id": "c-fed",
        "scope": "https://example/.default",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": token,
    }
    async with http.post("/t-fed/oauth2/v2.0/token", data=form) as resp:
        assert resp.status == 200


async def test_run_emulator_serves_until_cancelled(tmp_path: Path) -> None:
    """run_emulator calls back once bound and stops cleanly when its task is cancelled."""
    ready: asyncio.Future[Emulator] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        run_emulator("127.0.0.1", 0, tmp_path, demo_state(), ready_callback=ready.set_result)
    )
    emu = await ready
    async with (
        aiohttp.ClientSession(connector=_trusting(emu.ca_path)) as http,
        http.get(f"{emu.base_url}/{seed.TENANT_ID}/v2.0/.well-known/openid-configuration") as resp,
    ):
        assert resp.status == 200
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert emu.state.count("entra.openid") == 1


def test_demo_state_holds_the_documented_cloud() -> None:
    """The demo cloud has the documented client, workspace role and two services."""
    state = demo_state(token_lifetime_s=20.0, refresh_after_s=8.0)
    ws = state.workspace(seed.SUBSCRIPTION_ID, seed.RESOURCE_GROUP, seed.WORKSPACE)
    assert ws is not None and ws.region == "eastus"
    assert state.may_read(seed.CLIENT_ID, ws)
    token_svc = state.web_service(*ws.key, seed.TOKEN_SERVICE)
    key_svc = state.web_service(*ws.key, seed.KEY_SERVICE)
    assert token_svc is not None and token_svc.supports_token
    assert (token_svc.token_lifetime_s, token_svc.refresh_after_s) == (20.0, 8.0)
    assert key_svc is not None and key_svc.auth_enabled and not key_svc.supports_token


async def test_module_entry_point_announces_and_stops_on_sigterm(tmp_path: Path) -> None:
    """`python -m broker.emulator` prints the base URL, armed faults and TOML, and exits 0
    on SIGTERM."""
    args = ["-m", "broker.emulator", "--port", "0", "--ca-dir", str(tmp_path)]
    args += ["--fault", "mms.token=hang@fraud-aks", "--region-down", "westus"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *args, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    lines: list[str] = []
    while not (lines and lines[-1].startswith("# demo workspace")):
        line = (await proc.stdout.readline()).decode()
        assert line, "the emulator exited before announcing itself: " + "".join(lines)
        lines.append(line)
    output = "".join(lines)
    assert "emulator listening on https://127.0.0.1:" in output
    assert "[cloud]" in output
    assert 'fault armed: {"route": "mms.token"' in output
    assert 'region down: {"region": "westus", "kind": "reset", "status": 503}' in output
    assert f'ca_bundle = "{tmp_path / "emulator-ca.pem"}"' in output
    proc.send_signal(signal.SIGTERM)
    rest = await proc.stdout.read()
    assert await proc.wait() == 0
    assert b"emulator stopped" in rest
