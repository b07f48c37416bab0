"""With the persisted cache on, a restart during an outage keeps serving valid tokens."""

from __future__ import annotations

import io
import stat
from pathlib import Path

import pytest

from broker.config import load_config
from broker.daemon import Daemon
from broker.emulator import Emulator
from broker.emulator import seed as demo
from tests.conftest import config_text

pytestmark = pytest.mark.timeout(30)

SERVICES = {"fraud": demo.TOKEN_SERVICE, "churn": demo.KEY_SERVICE}


def cached_config(emulator: Emulator, short_dir: Path) -> Path:
    key = short_dir / "cache.key"
    key.write_bytes(bytes(range(48)))
    key.chmod(0o600)
    text = config_text(emulator, short_dir, services=SERVICES)
    text += f'\n[cache]\nenabled = true\npath = "{short_dir / "cache.bin"}"\nkey_file = "{key}"\n'
    path = short_dir / "broker.toml"
    path.write_text(text)
    return path


async def run_once(path: Path) -> dict[str, dict]:
    """Start a broker, read both services' states and tokens, stop it."""
    async with Daemon(load_config(path)) as daemon:
        store = daemon.store
        seen = {}
        for service in SERVICES:
            entry = await store.credential(service)
            assert entry.token is not None
            seen[service] = {"value": entry.token.value, "state": store.state(entry).value}
        return seen


async def test_restart_during_outage_serves_restored_tokens(
    emulator: Emulator, short_dir: Path
) -> None:
    """Tokens saved before a restart are served after it while Azure refuses every call."""
    path = cached_config(emulator, short_dir)
    first = await run_once(path)
    cache = short_dir / "cache.bin"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    assert first["fraud"]["value"].encode() not in cache.read_bytes()

    emulator.state.fail("entra.token", status=503)
    emulator.state.fail("mms.token", status=503)
    emulator.state.fail("mms.listkeys", status=503)
    calls = emulator.state.count("mms.token")
    second = await run_once(path)
    assert second["fraud"]["value"] == first["fraud"]["value"]
    assert second["churn"]["value"] == first["churn"]["value"]
    assert emulator.state.count("mms.token") == calls  # restored tokens are not fetched at start


async def test_corrupt_cache_is_ignored_with_a_warning(
    emulator: Emulator, short_dir: Path, logs: io.StringIO
) -> None:
    """A damaged cache file is never trusted: the broker starts empty and fetches."""
    path = cached_config(emulator, short_dir)
    await run_once(path)
    cache = short_dir / "cache.bin"
    data = bytearray(cache.read_bytes())
    data[-1] ^= 0xFF
    cache.write_bytes(bytes(data))
    calls = emulator.state.count("mms.token")
    await run_once(path)
    assert "cache.ignored" in logs.getvalue()
    assert emulator.state.count("mms.token") == calls + 1
