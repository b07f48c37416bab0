"""Hypothesis profiles, and one broker (with its emulator) per test module.

Hypothesis drives sync test functions, so the system under test lives in a thread with
its own event loop and the tests speak to it over real sockets, as any local program would.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from broker import log
from broker.config import load_config
from broker.daemon import Daemon
from broker.emulator import Emulator
from broker.emulator import seed as demo
from tests.conftest import config_text
from tests.fuzz.harness import LISTENERS, SERVICES, Target, healthy

IDLE_TIMEOUT_S = 0.5  # the broker closes a silent or incomplete request after this
START_TIMEOUT_S = 60.0

# `still_up` is function-scoped on purpose: it checks once per test, not per example.
_HEALTH = [HealthCheck.function_scoped_fixture]
# No example database: `make test` is derandomized anyway, and a failing example is
# printed (with its reproduction blob) rather than kept in an untracked directory.
settings.register_profile(
    "default",
    max_examples=80,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=_HEALTH,
    print_blob=True,
)
settings.register_profile(
    "long",
    max_examples=4000,
    deadline=None,
    derandomize=False,
    database=None,
    suppress_health_check=_HEALTH,
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


class BrokerThread:
    """The emulator and a daemon on an event loop of their own, in a daemon thread."""

    def __init__(self, directory: Path, front_door: bool = True) -> None:
        self._directory = directory
        self._front_door = front_door
        self._ready: concurrent.futures.Future[Target] = concurrent.futures.Future()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fuzz-broker", daemon=True)

    def start(self) -> Target:
        self._thread.start()
        return self._ready.result(START_TIMEOUT_S)

    def stop(self) -> None:
        """Stop the daemon and the emulator, end the loop, join the thread."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(START_TIMEOUT_S)
        assert not self._thread.is_alive(), "the broker thread did not stop"
        if self._failure is not None:
            raise self._failure

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 — handed to the test thread, which re-raises it
            self._failure = exc
            if not self._ready.done():
                self._ready.set_exception(exc)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        state = demo.demo_state(token_lifetime_s=3600, refresh_after_s=1800)
        async with Emulator(state=state, ca_dir=self._directory) as emulator:
            path = self._directory / "broker.toml"
            text = config_text(emulator, self._directory, services=SERVICES)
            door = "true" if self._front_door else "false"
            listen = (
                f"[listen]\nidle_timeout_s = {IDLE_TIMEOUT_S}\nfront_door = {door}\n\n"
                "[listen.unix]\n"
            )
            path.write_text(text.replace("[listen.unix]\n", listen, 1))
            async with Daemon(load_config(path)) as daemon:
                self._ready.set_result(await _settled(daemon, path))
                await self._stop.wait()


async def _settled(daemon: Daemon, config: Path) -> Target:
    """Wait until every service holds a credential; the broker's addresses and credentials."""
    store = daemon.store
    assert daemon.tcp_address is not None and daemon.unix_path is not None
    target = Target(daemon.tcp_address, daemon.unix_path, config)
    store.on_result(target.record)
    for entry in await asyncio.gather(*(store.credential(name) for name in SERVICES)):
        target.record(entry)
    values = [value for values in target.credentials().values() for value in values]
    assert len(set(values)) == len(SERVICES), "every service must hold its own credential"
    return target


@pytest.fixture(scope="module")
def logs() -> Iterator[io.StringIO]:
    """The broker's log lines (warnings and worse) for the whole module, kept off stdout.

    Overrides the per-test fixture of `tests/conftest.py`: the broker thread outlives
    every test, and Hypothesis refuses function-scoped fixtures.
    """
    stream = io.StringIO()
    log.configure("json", "warning", stream=stream)
    yield stream
    log.reset()


@pytest.fixture(
    scope="module",
    params=[pytest.param(True, id="front_door"), pytest.param(False, id="aiohttp")],
)
def broker(logs: io.StringIO, request: pytest.FixtureRequest) -> Iterator[Target]:
    """A broker serving three services from the emulator, up for the whole module: once
    answering through the front door, once with it turned off (aiohttp answers all)."""
    directory = Path(tempfile.mkdtemp(prefix="tbf-", dir="/tmp"))
    running = BrokerThread(directory, front_door=bool(request.param))
    try:
        yield running.start()
    finally:
        running.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def aiohttp_logs() -> Iterator[io.StringIO]:
    """What aiohttp logs through the standard library, bypassing structlog: among it, the
    handler crashes it reports."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    logger = logging.getLogger("aiohttp")
    logger.addHandler(handler)
    yield stream
    logger.removeHandler(handler)


@pytest.fixture(autouse=True)
def still_up(broker: Target, logs: io.StringIO, aiohttp_logs: io.StringIO) -> Iterator[None]:
    """After every test the broker still answers `/healthz` on both listeners, and what it
    logged during the test holds no crash and no credential."""
    start, aiohttp_start = len(logs.getvalue()), len(aiohttp_logs.getvalue())
    yield
    for listener in LISTENERS:
        healthy(broker, listener)
    text = logs.getvalue()[start:]
    assert "request.crashed" not in text
    for values in broker.credentials().values():
        for value in values:
            assert value not in text
    crashes = aiohttp_logs.getvalue()[aiohttp_start:]
    assert "Unhandled exception" not in crashes and "Missing return" not in crashes
