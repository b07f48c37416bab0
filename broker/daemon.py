"""The composition root: build every layer, start them in order, stop in reverse.

This is the only module that knows all the layers; what fetches and keeps credentials
is built by `broker.assembly`, as for `token-broker once`. Listeners start first so that
`/healthz` answers while the first fetches are still under way (or while Azure is
down); the refresher starts next and fetches every service. `reload` applies a new
configuration to the running daemon without dropping what still holds.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from dataclasses import Field, fields
from pathlib import Path
from typing import Any

from broker import __version__
from broker import log as logging_setup
from broker.assembly import (
    Sources,
    allowances,
    new_fleet,
    new_store,
    persisted_sync,
    register_secrets,
)
from broker.cache import PersistedSync, Policy, Reconciled, Refresher
from broker.config import CompatConfig, Config, FleetConfig, RefreshConfig
from broker.credentials import ServicePrincipalCredential
from broker.delivery import FileSinks
from broker.fleet import Fleet
from broker.key_rotation import KeyRotations
from broker.log import get_logger
from broker.metrics import Metrics
from broker.models import Clock, system_clock
from broker.server import AccessRules, Listeners, make_app
from broker.server.managed_identity_routes import Compat
from broker.server.proxy_routes import Proxy

log = get_logger("broker.daemon")

STOP_GRACE_S = 5.0  # how long requests and fetches under way may take to finish on stop
_SINK_LAST_WORD_S = 0.5  # the least a sink write under way gets on stop
_LEASE_WAITS = 2  # a fetch waits at most this many lease_s on another's lease (the store's)


class Daemon:
    """The running broker for one configuration."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock = system_clock,
        inherited: Sequence[socket.socket] = (),
    ) -> None:
        self.config = config
        register_secrets(config)
        self.clock = clock
        self.store = new_store(config.refresh, clock)
        self.metrics = Metrics(self.store, version=__version__)
        self.sources = Sources(config, clock, observer=self.metrics.observe_upstream)
        self.store.reconcile([self.sources.wanted(service) for service in config.services])
        self.refresher = Refresher(self.store)
        self._background: set[asyncio.Task[None]] = set()
        self.fleet: Fleet | None = None
        self._join_fleet(config)
        self.persisted: PersistedSync | None = persisted_sync(
            config, self.store, clock, self._service_identity
        )
        self.sinks = FileSinks(self.store, config.services)
        self.access = AccessRules(config)
        self.rotations = KeyRotations(self.store)
        self.compat = Compat(*self._compat(), clock=clock, clock_skew_s=config.refresh.clock_skew_s)
        app = make_app(
            self.store,
            self.access,
            config.listen.max_body_bytes,
            rotations=self.rotations,
            metrics=self.metrics,
            compat=self.compat,
            proxy=Proxy(config.proxy, config.cloud, observer=self.metrics.observe_proxy),
        )
        self.listeners = Listeners(app, config.listen, STOP_GRACE_S, inherited)

    def _join_fleet(self, config: Config) -> None:
        """Refresh through the fleet `config` describes, or alone when it is off."""
        if config.fleet.enabled:
            self.metrics.enable_fleet()
        else:
            self.metrics.disable_fleet()
        self.fleet = new_fleet(config, self._service_identity, observer=self.metrics)
        self.store.share(self.fleet)
        self.sources.join(self.fleet)

    def _service_identity(self, name: str) -> str | None:
        return self.config.service_identity(name)  # the configuration of now, after a reload

    def _compat(self) -> tuple[CompatConfig, ServicePrincipalCredential | None, str]:
        """What the managed-identity compatible routes serve, and as whom."""
        compat = self.config.compat
        if not compat.enabled:
            return compat, None, ""
        identity = self.config.identities[compat.identity]
        return compat, self.sources.credential(compat.identity), identity.client_id

    @property
    def credentials(self) -> dict[str, ServicePrincipalCredential]:
        """The sign-in of each identity used so far, by name."""
        return self.sources.credentials

    @property
    def unix_path(self) -> Path | None:
        return self.listeners.unix_path

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        return self.listeners.tcp_address

    async def start(self) -> None:
        if self.persisted is not None:
            self.persisted.restore()
        self.sinks.start()  # writes restored credentials at once, the rest as they come
        await self.listeners.start()
        if self.fleet is not None:
            self.fleet.watch(s.name for s in self.config.services)
        self.refresher.start()  # a service the fleet holds is adopted, not fetched
        log.info(
            "broker.started",
            config=str(self.config.path),
            services=len(self.config.services),
            identities=len(self.config.identities),
        )

    async def stop(self) -> None:
        """Stop accepting, let what is under way finish within a grace period, release all."""
        await self.listeners.stop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_GRACE_S  # one grace period for fetches and sinks
        await self.refresher.stop(STOP_GRACE_S)
        # A fetch that ended during the stop may have started a write: give it what is
        # left of the grace period (and a moment, however little is left).
        await self.sinks.close(max(_SINK_LAST_WORD_S, deadline - loop.time()))
        if self.persisted is not None:
            await self.persisted.close()
        if self.fleet is not None:
            await self.fleet.close()
        if self._background:  # a fleet a reload left, closing once its fetches ended
            await asyncio.wait(self._background, timeout=max(0.1, deadline - loop.time()))
        await self.sources.close()
        log.info("broker.stopped")

    async def __aenter__(self) -> Daemon:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def reload(self, config: Config) -> None:
        """Apply a new configuration: fetch new services, forget removed ones, keep the rest.

        A service whose definition is unchanged keeps its credential and its schedule.
        One whose identity changed keeps serving its credential while it signs in again
        at once. One whose Azure coordinates changed starts from nothing. `[compat]`
        applies at once. Listener changes need a restart and are reported, not applied.
        """
        old = self.config
        register_secrets(config)
        if not self.listeners.reconfigure(config.listen):  # its limits apply at once
            log.warning("config.listen_needs_restart", config=str(config.path))
        if config.proxy != old.proxy or config.cloud.ca_bundle != old.cloud.ca_bundle:
            log.warning("config.proxy_needs_restart", config=str(config.path))
        self.config = config
        self.sources.replace(config)
        self._apply_refresh(config.refresh)
        if config.fleet != old.fleet:
            self._leave_fleet(old.fleet)
            self._join_fleet(config)
            log.info(
                "fleet.reconfigured",
                enabled=self.fleet is not None,
                changed=[
                    f.name for f in fields(FleetConfig) if _differs(old.fleet, config.fleet, f)
                ],
            )
        result = self.refresher.reconcile([self.sources.wanted(s) for s in config.services])
        if self.fleet is not None:
            self.fleet.watch(s.name for s in config.services)
        self.sinks.update(config.services)
        self.access.update(config)
        self.compat.update(*self._compat())  # after the swap: its identity may be new
        if config.log != old.log:
            logging_setup.configure(config.log.format, config.log.level)
        log.info("config.reloaded", config=str(config.path), **_summary(result))

    def _apply_refresh(self, refresh: RefreshConfig) -> None:
        """Every key of `[refresh]` applies to what is fetched from now on."""
        self.store.configure(
            Policy(refresh), refresh.max_concurrency, refresh.client_refresh_window_s
        )
        if self.store.budget is not None:
            self.store.budget.resize(*allowances(refresh))
        self.sources.configure(refresh)
        self.compat.clock_skew_s = refresh.clock_skew_s

    def _leave_fleet(self, old: FleetConfig) -> None:
        """Close the fleet's connections once the fetches under way through it have ended
        (each is bounded: its lease waits and its Azure call)."""
        if self.fleet is None:
            return
        under_way = [e.inflight for e in self.store.entries if e.inflight is not None]
        within = _LEASE_WAITS * old.lease_s + self.config.refresh.timeout_s
        closing = asyncio.get_running_loop().create_task(
            _close_after(self.fleet, under_way, within)
        )
        self._background.add(closing)
        closing.add_done_callback(self._background.discard)


async def _close_after(fleet: Fleet, under_way: list[asyncio.Task[Any]], within: float) -> None:
    if under_way:
        await asyncio.wait(under_way, timeout=within)
    await fleet.close()


def _differs(old: FleetConfig, new: FleetConfig, key: Field[Any]) -> bool:
    """Whether a key of `[fleet]` changed (by name in the log, never by value)."""
    return bool(getattr(old, key.name) != getattr(new, key.name))


def _summary(result: Reconciled) -> dict[str, list[str]]:
    return {
        "added": list(result.added),
        "removed": list(result.removed),
        "changed": list(result.changed),
        "kept": list(result.kept),
    }
