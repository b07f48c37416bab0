"""What fetches and keeps credentials for one configuration, built once for every runner.

The daemon (`broker.daemon`) and the one-shot run (`broker.oneshot`) are built from the
same parts, so that a credential fetched by `token-broker once` is fetched exactly as the
daemon would fetch it: the store with the refresh policy and the call budget, the
sign-ins, the Azure client, a provider per service by its kind, the persisted cache and
the file sinks, and the fleet it refreshes through in fleet mode.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import assert_never

from broker import log as logging_setup
from broker.cache import Allowance, CallBudget, PersistedCache, PersistedSync, Policy, Store, Wanted
from broker.config import (
    Config,
    EntraScopeConfig,
    OnlineEndpointConfig,
    RefreshConfig,
    ServiceConfig,
    WebServiceConfig,
)
from broker.credentials import ServicePrincipalCredential
from broker.fleet import Fleet, FleetFacts, FleetObserver, HoldBacks
from broker.models import Clock, Sleep, system_sleep
from broker.providers import (
    EntraProvider,
    Facts,
    OnlineEndpointProvider,
    Throttles,
    TokenProvider,
    Upstream,
    WebServiceProvider,
    Workspaces,
)
from broker.providers.upstream import UpstreamObserver


def new_store(refresh: RefreshConfig, clock: Clock, *, sleep: Sleep = system_sleep) -> Store:
    """An empty store under `[refresh]`'s policy, concurrency bound and call budget."""
    return Store(
        [],
        Policy(refresh),
        clock,
        max_concurrency=refresh.max_concurrency,
        client_refresh_window_s=refresh.client_refresh_window_s,
        sleep=sleep,
        budget=CallBudget(*allowances(refresh), clock=clock, sleep=sleep),
    )


def allowances(refresh: RefreshConfig) -> tuple[Allowance, Allowance]:
    """The call budget of one service, and of one principal and subscription."""
    return (
        Allowance(refresh.service_calls_burst, refresh.service_calls_per_minute),
        Allowance(refresh.principal_calls_burst, refresh.principal_calls_per_minute),
    )


def register_secrets(config: Config) -> None:
    """Make every secret of the configuration known to redaction before it is ever used:
    no log line, error or sink command's environment may then carry it."""
    for identity in config.identities.values():
        for secret in (identity.client_secret, identity.certificate_password):
            if secret is not None:
                logging_setup.register_secret(secret.reveal())
    if config.fleet.password is not None:
        logging_setup.register_secret(config.fleet.password.reveal())


def persisted_sync(
    config: Config,
    store: Store,
    clock: Clock,
    identity: Callable[[str], str | None],
    *,
    saving: bool = True,
) -> PersistedSync | None:
    """The persisted cache kept in step with `store`, when `[cache]` turns it on;
    `identity` says what a service's credential is for (a saved one is restored only
    for the same). With `saving` False it is only read."""
    if not config.cache.enabled or config.cache.key is None:
        return None
    cache = PersistedCache(config.cache.path, config.cache.key.reveal(), clock=clock)
    return PersistedSync(store, cache, identity, saving=saving)


def new_fleet(
    config: Config,
    identity: Callable[[str], str | None],
    *,
    observer: FleetObserver | None = None,
) -> Fleet | None:
    """The fleet `[fleet]` describes (None when fleet mode is off); `identity` says what a
    service's credential is for (a shared one is adopted only for the same)."""
    fleet = config.fleet
    if not fleet.enabled or fleet.encryption_key is None:
        return None
    # Entries sealed with a key being rolled are opened too; new ones are sealed with the
    # current key only.
    current = fleet.encryption_key.reveal()
    older = dict.fromkeys(k.reveal() for k in fleet.previous_keys if k.reveal() != current)
    return Fleet(fleet, identity, observer=observer, older_keys=older)


class Sources:
    """Where every service's credential comes from: the sign-in of each identity, one
    client for Azure's hosts, and a provider per service by its kind."""

    def __init__(
        self,
        config: Config,
        clock: Clock,
        *,
        observer: UpstreamObserver | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.workspaces = Workspaces()
        self.throttles = Throttles(clock)
        self.facts = Facts()
        self.credentials: dict[str, ServicePrincipalCredential] = {}
        self._observer = observer
        self._background: set[asyncio.Task[None]] = set()
        self.upstream = self._upstream()

    def _upstream(self) -> Upstream:
        return Upstream(
            self.config.cloud,
            timeout_s=self.config.refresh.timeout_s,
            observer=self._observer,
            clock=self.clock,
        )

    def credential(self, name: str) -> ServicePrincipalCredential:
        """The sign-in of identity `name`, built when first used."""
        if name not in self.credentials:
            self.credentials[name] = ServicePrincipalCredential(
                self.config.identities[name],
                self.config.cloud,
                timeout_s=self.config.refresh.timeout_s,
                clock=self.clock,
                clock_skew_s=self.config.refresh.clock_skew_s,
            )
        return self.credentials[name]

    def wanted(self, service: ServiceConfig) -> Wanted:
        """The service as the store reconciles it: what it fetches, as whom, on whose budget."""
        identity = self.config.identities[service.identity]
        return Wanted(
            self.provider(service),
            target=service.coordinates,
            signer=(service.identity, identity, self.config.cloud),
            principal=(identity.client_id, _subscription(service).lower()),
        )

    def provider(self, service: ServiceConfig) -> TokenProvider:
        credential = self.credential(service.identity)
        match service:
            case WebServiceConfig():
                return WebServiceProvider(
                    service,
                    self.config.cloud,
                    credential,
                    self.upstream,
                    self.workspaces,
                    self.throttles,
                    self.facts,
                )
            case OnlineEndpointConfig():
                return OnlineEndpointProvider(
                    service,
                    self.config.cloud,
                    credential,
                    self.upstream,
                    self.throttles,
                    self.facts,
                )
            case EntraScopeConfig():
                return EntraProvider(service, credential, self.throttles)
            case _:
                assert_never(service)

    def join(self, fleet: Fleet | None) -> None:
        """Share with `fleet` what the providers keep of Azure beside the credentials: a
        429's hold-back, workspace discovery and describe results (None: keep them to this
        broker again)."""
        self.throttles.share(None if fleet is None else HoldBacks(fleet))
        self.facts.share(None if fleet is None else FleetFacts(fleet))

    def configure(self, refresh: RefreshConfig) -> None:
        """Bound the calls made from now on by a reloaded `[refresh]`."""
        self.upstream.set_timeout(refresh.timeout_s)
        for credential in self.credentials.values():
            credential.configure(refresh.timeout_s, refresh.clock_skew_s)

    def replace(self, config: Config) -> None:
        """Take a reloaded configuration: close the sign-ins of changed identities (they
        are built anew when next used) and, when the cloud changed, every sign-in and the
        Azure client, closed once its calls have ended."""
        old = self.config
        cloud_changed = config.cloud != old.cloud
        changed = {
            name
            for name, identity in old.identities.items()
            if cloud_changed or config.identities.get(name) != identity
        }
        self.config = config
        for name in changed:
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

    async def close(self) -> None:
        await self.upstream.close()
        for credential in self.credentials.values():
            credential.close()


def _subscription(service: ServiceConfig) -> str:
    """The subscription whose calls a service's fetches count against ("" for Entra scopes,
    which are in none)."""
    return "" if isinstance(service, EntraScopeConfig) else service.subscription_id
