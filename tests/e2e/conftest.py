"""Whole-daemon fixtures: a running broker against the emulator, clients on both listeners."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.cache import Entry
from broker.config import load_config
from broker.daemon import Daemon
from broker.emulator import Emulator
from tests.conftest import OffsetClock, config_text

LISTENERS = ["unix", "tcp"]


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


class Client:
    """A local client of the broker over one listener."""

    def __init__(self, daemon: Daemon, listener: str) -> None:
        if listener == "unix":
            assert daemon.unix_path is not None
            self._connector: aiohttp.BaseConnector = aiohttp.UnixConnector(
                path=str(daemon.unix_path)
            )
            self._base = "http://localhost"
        else:
            assert daemon.tcp_address is not None
            host, port = daemon.tcp_address
            self._connector = aiohttp.TCPConnector()
            self._base = f"http://{host}:{port}"
        self._session = aiohttp.ClientSession(connector=self._connector)

    async def get(self, path: str, **kwargs: Any) -> Reply:
        headers = {"Metadata": "true", **kwargs.pop("headers", {})}
        async with self._session.get(self._base + path, headers=headers, **kwargs) as resp:
            return Reply(resp.status, dict(resp.headers), await resp.text())

    async def close(self) -> None:
        await self._session.close()


@dataclass
class Broker:
    daemon: Daemon
    clock: OffsetClock
    clients: dict[str, Client]

    def client(self, listener: str = "unix") -> Client:
        return self.clients[listener]

    async def next_result(self, service: str, within: float = 20.0) -> Entry:
        """Wait for the next fetch of `service` to finish, successfully or not."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Entry] = loop.create_future()

        def listener(entry: Entry) -> None:
            if entry.service == service and not done.done():
                done.set_result(entry)

        self.daemon.store.on_result(listener)
        return await asyncio.wait_for(done, within)

    async def settled(self, within: float = 20.0) -> None:
        """Wait until every service's first fetch has finished."""
        store = self.daemon.store

        async def wait() -> None:
            while any(
                e.inflight is not None or (e.token is None and e.last_error is None)
                for e in store.entries
            ):
                await asyncio.sleep(0)  # yield to the fetches; the timeout bounds the wait
                tasks = [e.inflight for e in store.entries if e.inflight is not None]
                if tasks:
                    await asyncio.wait(tasks)

        await asyncio.wait_for(wait(), within)


StartBroker = Callable[..., Awaitable[Broker]]


@pytest.fixture
def front_door() -> bool:
    """Whether brokers from `start_broker` answer through the front door, as configured by
    default; a module overrides this fixture to run its tests on both paths."""
    return True


PATHS = [pytest.param(True, id="front_door"), pytest.param(False, id="aiohttp")]


@pytest.fixture
async def start_broker(
    emulator: Emulator, short_dir: Path, front_door: bool
) -> AsyncIterator[StartBroker]:
    """Start a broker against the emulator; it and its clients stop after the test."""
    started: list[Broker] = []

    async def start(text: str | None = None, **config_kwargs: Any) -> Broker:
        path = short_dir / "broker.toml"
        path.write_text(text or config_text(emulator, short_dir, **config_kwargs))
        clock = OffsetClock()
        config = load_config(path)
        if config.listen.front_door != front_door:
            listen = dataclasses.replace(config.listen, front_door=front_door)
            config = dataclasses.replace(config, listen=listen)
        daemon = Daemon(config, clock=clock)
        await daemon.start()
        clients = {}
        if daemon.unix_path is not None:
            clients["unix"] = Client(daemon, "unix")
        if daemon.tcp_address is not None:
            clients["tcp"] = Client(daemon, "tcp")
        broker = Broker(daemon, clock, clients)
        started.append(broker)
        return broker

    yield start
    for broker in started:
        for client in broker.clients.values():
            await client.close()
        await broker.daemon.stop()
