"""The composition root: build every layer, start them in order, stop in reverse.

This is the only module that knows all the layers. Listeners start first so that
`/healthz` answers while the first fetches are still under way (or while Azure is
down); the refresher starts next and fetches every service at once.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from broker.cache import Policy, Refresher, Store
from broker.config import Config
from broker.credentials import ServicePrincipalCredential
from broker.log import get_logger
from broker.models import Clock, system_clock
from broker.providers import Upstream, WebServiceProvider, Workspaces
from broker.server import Listeners, make_app

log = get_logger("broker.daemon")


class Daemon:
    """The running broker for one configuration."""

    def __init__(self, config: Config, *, clock: Clock = system_clock) -> None:
        self.config = config
        self.upstream = Upstream(config.cloud, timeout_s=config.refresh.timeout_s)
        self.credentials = credentials = {
            name: ServicePrincipalCredential(
                identity, config.cloud, timeout_s=config.refresh.timeout_s
            )
            for name, identity in config.identities.items()
        }
        workspaces = Workspaces()
        self.providers = {
            s.name: WebServiceProvider(
                s, config.cloud, credentials[s.identity], self.upstream, workspaces
            )
            for s in config.services
        }
        self.store = Store(self.providers.values(), Policy(config.refresh), clock)
        self.refresher = Refresher(self.store)
        self.listeners = Listeners(make_app(self.store), config.listen)

    @property
    def unix_path(self) -> Path | None:
        return self.listeners.unix_path

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        return self.listeners.tcp_address

    async def start(self) -> None:
        await self.listeners.start()
        self.refresher.start()
        log.info(
            "broker.started",
            config=str(self.config.path),
            services=len(self.config.services),
            identities=len(self.config.identities),
        )

    async def stop(self) -> None:
        """Stop serving, then stop refreshing; safe to call more than once."""
        await self.listeners.stop()
        await self.refresher.stop()
        await self.upstream.close()
        for credential in self.credentials.values():
            credential.close()
        log.info("broker.stopped")

    async def __aenter__(self) -> Daemon:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def serve(config: Config) -> None:
    """Run the broker until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with Daemon(config):
            await stop.wait()
            log.info("broker.stopping")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
