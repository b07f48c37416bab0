"""The composition root: build every layer, start them in order, stop in reverse.

This is the only module that knows all the layers. Listeners start first so that
`/healthz` answers while the first fetches are still under way (or while Azure is
down); the refresher starts next and fetches every service. `reload` applies a new
configuration to the running daemon without dropping what still holds.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import assert_never

from broker import __version__
from broker import log as logging_setup
from broker.cache import (
    Allowance,
    CallBudget,
    PersistedCache,
    PersistedSync,
    Policy,
    Reconciled,
    Refresher,
    Store,
    Wanted,
)
from broker.config import (
    CompatConfig,
    Config,
    EntraScopeConfig,
    FleetConfig,
    OnlineEndpointConfig,
    RefreshConfig,
    ServiceConfig,
    WebServiceConfig,
)
from broker.credentials import ServicePrincipalCredential
from broker.delivery import FileSinks
from broker.fleet import Fleet
from broker.key_rotation import KeyRotations
from broker.log import get_logger
from broker.metrics import Metrics
from broker.models import Clock, system_clock
from broker.providers import (
    EntraProvider,
    OnlineEndpointProvider,
    Throttles,
    TokenProvider,
    Upstream,
    WebServiceProvider,
    Workspaces,
)
from broker.server import AccessRules, Listeners, make_app
from broker.server.managed_identity_routes import Compat
from broker.server.proxy_routes import Proxy

log = get_logger("broker.daemon")

STOP_GRACE_S = 5.0  # how long requests and fetches under way may take to finish on stop
_SINK_LAST_WORD_S = 0.5  # the least a sink write under way gets on stop


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
        _register_secrets(config)
        self.clock = clock
        self.workspaces = Workspaces()
        self.throttles = Throttles(clock)
        self.credentials: dict[str, ServicePrincipalCredential] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.store = Store(
            [],
            Policy(config.refresh),
            clock,
            max_concurrency=config.refresh.max_concurrency,
            client_refresh_window_s=config.refresh.client_refresh_window_s,
            budget=CallBudget(*_allowances(config.refresh), clock=clock),
        )
        self.metrics = Metrics(self.store, version=__version__)
        self.upstream = self._upstream()
        self.store.reconcile([self._wanted(service) for service in config.services])
        self.refresher = Refresher(self.store)
        self.fleet: Fleet | None = None
        self._join_fleet(config.fleet)
        self.persisted: PersistedSync | None = None
        if config.cache.enabled and config.cache.key is not None:
            cache = PersistedCache(config.cache.path, config.cache.key.reveal(), clock=clock)
            self.persisted = PersistedSync(self.store, cache, self._service_identity)
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

    def _join_fleet(self, config: FleetConfig) -> None:
        """Refresh through the fleet `config` describes, or alone when it is off."""
        self.fleet = None
        if config.enabled and config.encryption_key is not None:
            self.metrics.enable_fleet()
            self.fleet = Fleet(config, self._service_identity, observer=self.metrics)
        self.store.share(self.fleet)

    def _service_identity(self, name: str) -> str | None:
        return self.config.service_identity(name)  # the configuration of now, after a reload

    def _compat(self) -> tuple[CompatConfig, ServicePrincipalCredential | None, str]:
        """What the managed-identity compatible routes serve, and as whom."""
        compat = self.config.compat
        if not compat.enabled:
            return compat, None, ""
        identity = self.config.identities[compat.identity]
        return compat, self._credential(compat.identity), identity.client_id

    def _upstream(self) -> Upstream:
        return Upstream(
            self.config.cloud,
            timeout_s=self.config.refresh.timeout_s,
            observer=self.metrics.observe_upstream,
            clock=self.clock,
        )

    def _credential(self, name: str) -> ServicePrincipalCredential:
        if name not in self.credentials:
            self.credentials[name] = ServicePrincipalCredential(
                self.config.identities[name],
                self.config.cloud,
                timeout_s=self.config.refresh.timeout_s,
                clock=self.clock,
                clock_skew_s=self.config.refresh.clock_skew_s,
            )
        return self.credentials[name]

    def _wanted(self, service: ServiceConfig) -> Wanted:
        """The service as the store reconciles it: what it fetches, as whom, on whose budget."""
        identity = self.config.identities[service.identity]
        return Wanted(
            self._provider(service),
            target=service.coordinates,
            signer=(service.identity, identity, self.config.cloud),
            principal=(identity.client_id, _subscription(service).lower()),
        )

    def _provider(self, service: ServiceConfig) -> TokenProvider:
        credential = self._credential(service.identity)
        match service:
            case WebServiceConfig():
                return WebServiceProvider(
                    service,
                    self.config.cloud,
                    credential,
                    self.upstream,
                    self.workspaces,
                    self.throttles,
                )
            case OnlineEndpointConfig():
                return OnlineEndpointProvider(
                    service, self.config.cloud, credential, self.upstream, self.throttles
                )
            case EntraScopeConfig():
                return EntraProvider(service, credential)
            case _:
                assert_never(service)

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
        await self.upstream.close()
        for credential in self.credentials.values():
            credential.close()
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
        _register_secrets(config)
        if not self.listeners.reconfigure(config.listen):  # its limits apply at once
            log.warning("config.listen_needs_restart", config=str(config.path))
        if config.proxy != old.proxy or config.cloud.ca_bundle != old.cloud.ca_bundle:
            log.warning("config.proxy_needs_restart", config=str(config.path))
        cloud_changed = config.cloud != old.cloud
        changed_identities = {
            name
            for name, identity in old.identities.items()
            if cloud_changed or config.identities.get(name) != identity
        }
        self.config = config
        self._drop_changed_clients(cloud_changed, changed_identities)
        self._apply_refresh(config.refresh)
        if config.fleet != old.fleet:
            self._leave_fleet()
            self._join_fleet(config.fleet)
            log.info("fleet.reconfigured", enabled=self.fleet is not None)
        result = self.refresher.reconcile([self._wanted(s) for s in config.services])
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
            self.store.budget.resize(*_allowances(refresh))
        self.upstream.set_timeout(refresh.timeout_s)
        for credential in self.credentials.values():
            credential.configure(refresh.timeout_s, refresh.clock_skew_s)
        self.compat.clock_skew_s = refresh.clock_skew_s

    def _leave_fleet(self) -> None:
        """Close the fleet's connections once what is under way has ended."""
        if self.fleet is None:
            return
        closing = asyncio.get_running_loop().create_task(self.fleet.close())
        self._background.add(closing)
        closing.add_done_callback(self._background.discard)

    def _drop_changed_clients(self, cloud_changed: bool, identities: set[str]) -> None:
        """Close the sign-ins of changed identities (they are built anew when next used)
        and, when the cloud changed, the Azure client, closed once its calls have ended."""
        for name in identities:
            credential = self.credentials.pop(name, None)
            if credential is not None:
                credential.close()
        if cloud_changed:
            stale = self.upstream
            self.upstream = self._upstream()
            self.workspaces = Workspaces()
            closing = asyncio.get_running_loop().create_task(stale.close())
            self._background.add(closing)
            closing.add_done_callback(self._background.discard)


def _allowances(refresh: RefreshConfig) -> tuple[Allowance, Allowance]:
    """The call budget of one service, and of one principal and subscription."""
    return (
        Allowance(refresh.service_calls_burst, refresh.service_calls_per_minute),
        Allowance(refresh.principal_calls_burst, refresh.principal_calls_per_minute),
    )


def _summary(result: Reconciled) -> dict[str, list[str]]:
    return {
        "added": list(result.added),
        "removed": list(result.removed),
        "changed": list(result.changed),
        "kept": list(result.kept),
    }


def _register_secrets(config: Config) -> None:
    """Make every secret of the configuration known to redaction before it is ever used:
    no log line, error or sink command's environment may then carry it."""
    for identity in config.identities.values():
        for secret in (identity.client_secret, identity.certificate_password):
            if secret is not None:
                logging_setup.register_secret(secret.reveal())
    if config.fleet.password is not None:
        logging_setup.register_secret(config.fleet.password.reveal())


def _subscription(service: ServiceConfig) -> str:
    """The subscription whose calls a service's fetches count against ("" for Entra scopes,
    which are in none)."""
    return "" if isinstance(service, EntraScopeConfig) else service.subscription_id
