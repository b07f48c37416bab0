"""`token-broker demo`: the emulator, the broker and a client, end to end.

Everything runs in this process on loopback with a temporary directory: the
emulator (HTTPS, its own CA), the broker configured through a real TOML file,
and a client that fetches over the Unix socket and over TCP, calls the scoring
endpoint with the token and through the broker's proxy, and waits for the broker to
refresh the token before `refreshAfter`.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from broker import log
from broker.config import load_config
from broker.daemon import Daemon
from broker.emulator import Emulator
from broker.emulator import seed as demo
from broker.models import wall_clock

_REFRESH_WAIT_S = 60.0


def _config_text(emu: Emulator, directory: Path) -> str:
    return f"""\
[listen.unix]
path = "{directory / "broker.sock"}"
mode = "0660"

[listen.tcp]
host = "127.0.0.1"
port = 0

[log]
format = "console"
level = "info"

# The demo's tokens live seconds, not an hour: retries may come sooner than the default.
[refresh]
retry_min_s = 0.25

[cloud]
name = "custom"
authority_host = "{emu.authority_host}"
resource_manager = "{emu.resource_manager}"
region_api = "{emu.region_api}"
ca_bundle = "{emu.ca_path}"

[identity.demo]
tenant_id = "{demo.TENANT_ID}"
client_id = "{demo.CLIENT_ID}"
client_secret_file = "{directory / "client-secret"}"

[[service]]
name = "fraud"
subscription_id = "{demo.SUBSCRIPTION_ID}"
resource_group = "{demo.RESOURCE_GROUP}"
workspace = "{demo.WORKSPACE}"
web_service = "{demo.TOKEN_SERVICE}"
auth = "auto"

[[service]]
name = "churn"
subscription_id = "{demo.SUBSCRIPTION_ID}"
resource_group = "{demo.RESOURCE_GROUP}"
workspace = "{demo.WORKSPACE}"
web_service = "{demo.KEY_SERVICE}"
region = "{demo.REGION}"
auth = "auto"
"""


def _say(step: str, text: str) -> None:
    print(f"\n==> {step}: {text}", flush=True)


def _fingerprint(value: str) -> str:
    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:12]


def _clock(epoch: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(epoch))


async def _get(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url, headers={"Metadata": "true"}) as resp:
        body: dict[str, Any] = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"{url} answered {resp.status}: {body.get('message')}")
        return body


async def _proxied(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    """A scoring call through the broker's proxy: the client sends no credential."""
    body = {"data": [[1, 2, 3]]}
    async with session.post(url, json=body, headers={"Metadata": "true"}) as resp:
        result: dict[str, Any] = await resp.json()
        result["status"] = resp.status
        return result


async def _score(emu: Emulator, uri: str, credential: str) -> dict[str, Any]:
    context = ssl.create_default_context(cafile=str(emu.ca_path))
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session,
        session.post(
            uri, json={"data": [[1, 2, 3]]}, headers={"Authorization": f"Bearer {credential}"}
        ) as resp,
    ):
        result: dict[str, Any] = await resp.json()
        result["status"] = resp.status
        return result


async def run_demo(lifetime_s: float = 12.0) -> bool:
    """Run the whole demonstration; True when every step behaved as promised."""
    with tempfile.TemporaryDirectory(prefix="token-broker-demo-") as tmp:
        directory = Path(tmp)
        state = demo.demo_state(token_lifetime_s=lifetime_s, refresh_after_s=lifetime_s / 2)
        async with Emulator(state=state, ca_dir=directory) as emu:
            _say(
                "emulator", f"Entra ID, ARM and Azure ML on {emu.base_url} (CA {emu.ca_path.name})"
            )
            secret_file = directory / "client-secret"
            secret_file.write_text(demo.CLIENT_SECRET + "\n")
            secret_file.chmod(0o600)
            config_file = directory / "broker.toml"
            config_file.write_text(_config_text(emu, directory))
            config = load_config(config_file)
            log.configure(config.log.format, config.log.level)
            async with Daemon(config) as daemon:
                ok = await _walkthrough(emu, daemon)
        leftover = (directory / "broker.sock").exists()
    if leftover:
        print("socket file left behind", flush=True)
    _say("done", "every step passed" if ok and not leftover else "a step FAILED")
    return ok and not leftover


async def _walkthrough(emu: Emulator, daemon: Daemon) -> bool:
    assert daemon.unix_path is not None and daemon.tcp_address is not None
    host, port = daemon.tcp_address
    tcp = f"http://{host}:{port}"
    _say("broker", f"listening on {daemon.unix_path} and {tcp}")
    refreshed = asyncio.Event()
    unix = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(daemon.unix_path)))
    async with unix, aiohttp.ClientSession() as plain:
        first = await _get(unix, "http://localhost/v1/token/fraud")
        _say(
            "token over the Unix socket",
            f"{_fingerprint(first['access_token'])} expires {_clock(first['expires_on'])}, "
            f"refresh by {_clock(first['refresh_by'])}",
        )
        again = await _get(plain, f"{tcp}/v1/token/fraud")
        same = again["access_token"] == first["access_token"]
        _say("same token over loopback HTTP", f"{_fingerprint(again['access_token'])} same={same}")
        described = await _get(unix, "http://localhost/v1/services/fraud")
        scored = await _score(emu, described["scoring_uri"], first["access_token"])
        _say("scoring call with the token", f"HTTP {scored['status']} {scored}")
        key = await _get(unix, "http://localhost/v1/token/churn")
        churn = await _get(unix, "http://localhost/v1/services/churn")
        key_scored = await _score(emu, churn["scoring_uri"], key["access_token"])
        _say("key service", f"{_fingerprint(key['access_token'])} → HTTP {key_scored['status']}")
        proxied = await _proxied(unix, "http://localhost/v1/proxy/fraud/score")
        _say(
            "scoring through the broker (no credential sent)", f"HTTP {proxied['status']} {proxied}"
        )

        daemon.store.on_result(lambda entry: refreshed.set() if entry.service == "fraud" else None)
        _say("waiting", f"for the broker to refresh before {_clock(first['refresh_by'])}")
        await asyncio.wait_for(refreshed.wait(), _REFRESH_WAIT_S)
        second = await _get(unix, "http://localhost/v1/token/fraud")
        before = wall_clock() < first["refresh_by"]
        new = second["access_token"] != first["access_token"]
        _say(
            "refreshed",
            f"{_fingerprint(second['access_token'])} new={new} "
            f"at {_clock(wall_clock())}, before refresh_by={before}",
        )
        rescored = await _score(emu, described["scoring_uri"], second["access_token"])
        _say("scoring call with the new token", f"HTTP {rescored['status']}")
        calls = dict(emu.state.calls)
        _say("upstream calls the emulator counted", str(calls))
    return all(
        [
            same,
            scored["status"] == 200,
            key_scored["status"] == 200,
            proxied["status"] == 200,
            new,
            before,
            rescored["status"] == 200,
        ]
    )
