"""Prometheus metrics of the broker, in a registry of its own.

    token_broker_service_state{service, state}             gauge, computed at scrape time
    token_broker_credential_expiry_seconds{service}        gauge, computed at scrape time
    token_broker_last_refresh_age_seconds{service}         gauge, computed at scrape time
    token_broker_upstream_budget_waits_total{service}      counter, computed at scrape time
    token_broker_clock_skew_seconds{service}               gauge, computed at scrape time
    token_broker_refreshes_total{service, outcome, reason} counter, from `Store.on_result`
    token_broker_upstream_request_duration_seconds{route, region, status}
                                                           histogram, from `Upstream`'s observer
    token_broker_requests_total{route, status}             counter, from the server's middleware
    token_broker_proxy_requests_total{service, status}     counter, from the proxy: the scoring
                                                           host's status, or error (no answer)
    token_broker_connections_refused_total{listener, reason}
                                                           counter, from the listeners and the
                                                           watch route: the limit that was full
    token_broker_connections_cut_total{listener, reason}   counter, from the listeners: a body
                                                           stalled, or a newer one took the place
    token_broker_streams_open{listener}                    gauge, from the watch route
    token_broker_streams_closed_total{listener, reason}    counter, from the watch route
    token_broker_build_info{version, python}               gauge, always 1

and in fleet mode (registered when a configuration first enables it):

    token_broker_fleet_credentials_total{service, origin}  counter: credentials put in place,
                                                           adopted from the fleet or fetched
                                                           from Azure
    token_broker_fleet_leases_total{service, outcome}      counter: refresh leases taken,
                                                           busy (held by another), lost
    token_broker_fleet_redis_duration_seconds{operation}   histogram of Redis commands
    token_broker_fleet_redis_errors_total{operation}       counter of Redis commands failed
    token_broker_fleet_up                                  gauge: 1 while Redis answers

Every label value comes from the configuration (service names), our own names (routes,
states, outcomes, error kinds), Azure region names or HTTP status codes; never from a
credential, an error message or a client's path, so no label can carry a secret and
the number of series stays bounded by the configuration.
"""

from __future__ import annotations

import platform
import re
from collections.abc import Iterable, Iterator
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from broker.cache import Entry, Store
from broker.errors import (
    MalformedResponseError,
    NotFoundError,
    PermissionDeniedError,
    SignInError,
    ThrottledError,
    UnavailableError,
    UnsupportedAuthError,
    UnusableCredentialError,
    UpstreamError,
)
from broker.models import State

LISTENERS = ("unix", "tcp")
# Our own names, repeated here as metrics sits below the server: `connections.REFUSALS`,
# `connections.CUTS`, `streams.END_REASONS` (a test holds them equal).
CONNECTION_REFUSALS = ("max_connections", "max_streams", "listener_share", "uid_share")
CONNECTION_CUTS = ("stalled_body", "evicted")
STREAM_ENDINGS = ("access_revoked", "max_age", "service_removed", "client_gone", "shutdown")

FLEET_ORIGINS = ("fleet", "azure")  # `broker.cache.store.ORIGINS`, repeated (a test holds them)
FLEET_LEASE_OUTCOMES = ("taken", "busy", "lost")
# Redis answers in well under a millisecond on a good day, and fails at command_timeout_s.
REDIS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# Azure ML calls take milliseconds on a good day and up to the 30 s timeout on a bad one.
UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
GLOBAL = "global"
UNMATCHED = "unmatched"
TRANSPORT_ERROR = "error"

# Most specific first: the first class an error is an instance of names its reason.
_REASONS: tuple[tuple[type[UpstreamError], str], ...] = (
    (SignInError, "sign_in"),
    (PermissionDeniedError, "permission_denied"),
    (NotFoundError, "not_found"),
    (UnsupportedAuthError, "unsupported_auth"),
    (ThrottledError, "throttled"),
    (UnavailableError, "unavailable"),
    (MalformedResponseError, "malformed_response"),
    (UnusableCredentialError, "unusable_credential"),
)
REASONS = frozenset({"ok", "upstream", *(name for _, name in _REASONS)})

_REGION = re.compile(r"[a-z0-9]{1,40}")
# `eastus.api.azureml.ms`, `eastus.modelmanagement.azureml.net`, and private-link hosts
# such as `<id>.workspace.eastus.api.azureml.ms`: the region is the label before the API's.
_REGIONAL_HOST = re.compile(r"(?:^|\.)([a-z0-9]{1,40})\.(?:api|modelmanagement)\.")


def reason_of(error: UpstreamError | None) -> str:
    """The refresh counter's `reason`: `ok` for a success, else the error's kind."""
    if error is None:
        return "ok"
    for kind, name in _REASONS:
        if isinstance(error, kind):
            return name
    return "upstream"


def region_of(url: str) -> str:
    """The Azure region a regional URL is served by (Azure's host or the emulator's
    `/regions/{region}/` path), else `global`; remembered per URL (each service calls
    the same few), since every Azure call is labelled with it."""
    region = _regions.get(url)
    if region is None:
        if len(_regions) >= _REGIONS_KEPT:
            _regions.clear()
        region = _regions[url] = _region_of(url)
    return region


_REGIONS_KEPT = 8192
_regions: dict[str, str] = {}


def _region_of(url: str) -> str:
    parts = urlsplit(url)
    found = _REGIONAL_HOST.search(parts.hostname or "")
    if found is not None:
        return found.group(1)
    segments = parts.path.split("/", 3)
    if len(segments) >= 3 and segments[1] == "regions" and _REGION.fullmatch(segments[2]):
        return segments[2]
    return GLOBAL


class StoreCollector:
    """Each service's state, expiry, refresh age and Azure's clock skew, read from the store
    at scrape time."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterator[Metric]:
        store = self._store
        now = store.clock()
        state, expiry, age, skew, waits = families = self._families()
        for entry in store.entries:
            waits.add_metric([entry.service], entry.budget_waits)
            current = store.state(entry)
            for each in State:
                state.add_metric([entry.service, each.value], 1.0 if each is current else 0.0)
            if entry.token is not None and entry.token.expires_on is not None:
                expiry.add_metric([entry.service], entry.token.expires_on - now)
            if entry.last_success_at is not None:
                age.add_metric([entry.service], now - entry.last_success_at)
            if entry.provider.clock_skew_s is not None:
                skew.add_metric([entry.service], entry.provider.clock_skew_s)
        yield from families

    @staticmethod
    def _families() -> tuple[
        GaugeMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
        CounterMetricFamily,
    ]:
        return (
            GaugeMetricFamily(
                "token_broker_service_state",
                "1 for the state the service's cached credential is in, 0 for the others.",
                labels=["service", "state"],
            ),
            GaugeMetricFamily(
                "token_broker_credential_expiry_seconds",
                "Seconds until the served credential expires; absent for keys and "
                "services without a credential.",
                labels=["service"],
            ),
            GaugeMetricFamily(
                "token_broker_last_refresh_age_seconds",
                "Seconds since the service's last successful refresh; absent before the first.",
                labels=["service"],
            ),
            GaugeMetricFamily(
                "token_broker_clock_skew_seconds",
                "Azure's clock minus the broker's, from the Date of the service's last Azure "
                "answer; absent before the first and for Entra ID services.",
                labels=["service"],
            ),
            CounterMetricFamily(
                "token_broker_upstream_budget_waits",
                "Fetches that waited because the service's or its principal's call budget "
                "([refresh] *_calls_burst, *_calls_per_minute) was spent.",
                labels=["service"],
            ),
        )


class _Registry(CollectorRegistry):
    """A registry that leaves out the `_created` series prometheus-client adds by default.

    They would double the series of every counter and histogram for a timestamp that
    Prometheus's text format does not use; turning them off globally would reach
    beyond this registry.
    """

    def collect(self) -> Iterator[Metric]:
        for metric in super().collect():
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


class Metrics:
    """Every metric of one broker; `render` is the body of `GET /metrics`."""

    def __init__(self, store: Store, *, version: str) -> None:
        self.registry: CollectorRegistry = _Registry()
        self.registry.register(StoreCollector(store))
        self._refreshes = Counter(
            "token_broker_refreshes",
            "Fetches of a service's credential by outcome; reason is the error kind of a "
            "failure, ok for a success.",
            ["service", "outcome", "reason"],
            registry=self.registry,
        )
        self._upstream = Histogram(
            "token_broker_upstream_request_duration_seconds",
            "Duration of Azure Resource Manager and Azure ML calls by route, region and HTTP "
            "status (error: no answer). Entra ID sign-ins go through MSAL and are not included.",
            ["route", "region", "status"],
            buckets=UPSTREAM_BUCKETS,
            registry=self.registry,
        )
        self._requests = Counter(
            "token_broker_requests",
            "Local API requests by route template (unmatched: no route) and HTTP status.",
            ["route", "status"],
            registry=self.registry,
        )
        self._proxied = Counter(
            "token_broker_proxy_requests",
            "Requests forwarded to scoring URIs by service and the scoring host's HTTP "
            "status (error: no answer).",
            ["service", "status"],
            registry=self.registry,
        )
        self._refused = Counter(
            "token_broker_connections_refused",
            "Connections and watch streams refused by listener and the limit that was full "
            "([listen] max_connections, max_streams, tcp_share as listener_share, uid_share).",
            ["listener", "reason"],
            registry=self.registry,
        )
        self._cut = Counter(
            "token_broker_connections_cut",
            "Connections the broker closed by listener and reason: stalled_body (no body "
            "bytes for idle_timeout_s), evicted (a quiet one, for a new connection).",
            ["listener", "reason"],
            registry=self.registry,
        )
        self._streams_open = Gauge(
            "token_broker_streams_open",
            "Watch streams open now, by listener.",
            ["listener"],
            registry=self.registry,
        )
        self._streams_closed = Counter(
            "token_broker_streams_closed",
            "Watch streams ended by listener and reason: access_revoked, max_age, "
            "service_removed, client_gone, shutdown.",
            ["listener", "reason"],
            registry=self.registry,
        )
        for listener in LISTENERS:  # every series from the start: rates need a zero
            self._streams_open.labels(listener)
            for reason in CONNECTION_REFUSALS:
                self._refused.labels(listener, reason)
            for reason in CONNECTION_CUTS:
                self._cut.labels(listener, reason)
            for reason in STREAM_ENDINGS:
                self._streams_closed.labels(listener, reason)
        Gauge(
            "token_broker_build_info",
            "Always 1; the labels say which broker and Python are running.",
            ["version", "python"],
            registry=self.registry,
        ).labels(version, platform.python_version()).set(1)
        # Children by label values: the request path then skips `labels()`'s validation.
        self._request_counts: dict[tuple[str, int], Counter] = {}
        self._proxied_counts: dict[tuple[str, int | None], Counter] = {}
        self._fleet: _FleetMetrics | None = None
        store.on_result(self.observe_refresh)

    def enable_fleet(self) -> None:
        """Register the fleet's series (once: a reload may enable fleet mode later)."""
        if self._fleet is None:
            self._fleet = _FleetMetrics(self.registry)

    def disable_fleet(self) -> None:
        """Drop the fleet's series: a broker a reload took out of fleet mode exports none,
        as one never in it (a `token_broker_fleet_up` left at 0 would raise an alert)."""
        if self._fleet is not None:
            self._fleet.unregister(self.registry)
            self._fleet = None

    def observe_refresh(self, entry: Entry) -> None:
        """Count a finished fetch; the store calls this after every one."""
        outcome = "success" if entry.last_error is None else "failure"
        self._refreshes.labels(entry.service, outcome, reason_of(entry.last_error)).inc()
        if self._fleet is not None and entry.last_error is None and entry.origin in FLEET_ORIGINS:
            self._fleet.credentials.labels(entry.service, entry.origin).inc()

    def fleet_command(self, operation: str, seconds: float, ok: bool) -> None:
        """Time one Redis command; count it when it failed."""
        if self._fleet is not None:
            self._fleet.duration.labels(operation).observe(seconds)
            if not ok:
                self._fleet.errors.labels(operation).inc()

    def fleet_lease(self, service: str, outcome: str) -> None:
        if self._fleet is not None:
            self._fleet.leases.labels(service, outcome).inc()

    def fleet_health(self, up: bool) -> None:
        if self._fleet is not None:
            self._fleet.up.set(1 if up else 0)

    def observe_upstream(self, route: str, url: str, status: int | None, seconds: float) -> None:
        """Time one Azure call; `Upstream` calls this with `status` None when no answer came."""
        label = TRANSPORT_ERROR if status is None else str(status)
        self._upstream.labels(route, region_of(url), label).observe(seconds)

    def request_count(self, route: str, status: int) -> Counter:
        """The counter of requests to `route` answered with `status`, for callers that keep
        it (the server's middleware, per matched route)."""
        child = self._request_counts.get((route, status))
        if child is None:
            child = self._request_counts[(route, status)] = self._requests.labels(
                route, str(status)
            )
        return child

    def observe_proxy(self, service: str, status: int | None) -> None:
        """Count one proxied call; `status` None when the scoring host gave no answer."""
        child = self._proxied_counts.get((service, status))
        if child is None:
            label = TRANSPORT_ERROR if status is None else str(status)
            child = self._proxied_counts[(service, status)] = self._proxied.labels(service, label)
        child.inc()

    def connection_refused(self, listener: str, reason: str) -> None:
        self._refused.labels(listener, reason).inc()

    def connection_cut(self, listener: str, reason: str) -> None:
        self._cut.labels(listener, reason).inc()

    def stream_opened(self, listener: str) -> None:
        self._streams_open.labels(listener).inc()

    def stream_closed(self, listener: str, reason: str) -> None:
        self._streams_open.labels(listener).dec()
        self._streams_closed.labels(listener, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _FleetMetrics:
    """The series of fleet mode."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.credentials = Counter(
            "token_broker_fleet_credentials",
            "Credentials put in place by service and origin: adopted from the fleet (no "
            "Azure call) or fetched from Azure.",
            ["service", "origin"],
            registry=registry,
        )
        self.leases = Counter(
            "token_broker_fleet_leases",
            "Refresh leases by service and outcome: taken, busy (another broker held it), "
            "lost (it lapsed or was taken while held).",
            ["service", "outcome"],
            registry=registry,
        )
        self.duration = Histogram(
            "token_broker_fleet_redis_duration_seconds",
            "Duration of Redis commands by operation (read, lease, extend, release, write, "
            "subscribe, …), failed ones included.",
            ["operation"],
            buckets=REDIS_BUCKETS,
            registry=registry,
        )
        self.errors = Counter(
            "token_broker_fleet_redis_errors",
            "Redis commands that failed (no answer in time, refused, failed script), by operation.",
            ["operation"],
            registry=registry,
        )
        self.up = Gauge(
            "token_broker_fleet_up",
            "1 while Redis answers the broker, 0 while it refreshes alone; 0 before Redis "
            "first answered.",
            registry=registry,
        )

    def unregister(self, registry: CollectorRegistry) -> None:
        for series in (self.credentials, self.leases, self.duration, self.errors, self.up):
            registry.unregister(series)
