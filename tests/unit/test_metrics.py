"""Metrics: scrape-time service gauges, refresh counters, regions, request route labels."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from broker.cache import Policy, Store
from broker.config import load_config
from broker.errors import (
    MalformedResponseError,
    NotFoundError,
    PermissionDeniedError,
    SignInError,
    ThrottledError,
    UnavailableError,
    UnsupportedAuthError,
    UpstreamError,
)
from broker.metrics import REASONS, Metrics, reason_of, region_of
from broker.models import AccessToken, AuthKind, State
from broker.server import AccessRules, make_app
from tests.unit.fakes import FakeClock, FakeProvider

pytestmark = pytest.mark.timeout(10)

MINIMAL_CONFIG = """
[identity.main]
tenant_id = "t"
client_id = "c"
client_secret = "unit-test-secret"

[[service]]
name = "fraud"
subscription_id = "sub-1"
resource_group = "rg"
workspace = "ws"
web_service = "fraud-svc"
"""


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_store(clock: FakeClock, *services: str) -> tuple[Store, dict[str, FakeProvider]]:
    providers = {name: FakeProvider(name) for name in services}
    return Store(providers.values(), Policy(), clock), providers


def token(clock: FakeClock, value: str = "tok-secret-1", lifetime: float = 100.0) -> AccessToken:
    return AccessToken(value, AuthKind.TOKEN, clock.now + lifetime, clock.now + lifetime / 2)


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_state_gauge_marks_only_the_current_state(clock: FakeClock) -> None:
    """Each service has exactly one state at 1, the one the store derives, and others at 0."""
    store, _ = make_store(clock, "ready", "broken", "waiting")
    metrics = Metrics(store, version="9.9.9")
    store.restore("ready", token(clock), clock.now)
    store.entry("broken").last_error = UnavailableError("down")
    expected = {"ready": State.FRESH, "broken": State.FAILED, "waiting": State.REFRESHING}
    for service, current in expected.items():
        for state in State:
            gauge = value(metrics, "token_broker_service_state", service=service, state=state)
            assert gauge == (1.0 if state is current else 0.0)


def test_a_removed_service_leaves_the_gauges(clock: FakeClock) -> None:
    """A service dropped from the store by a reload is absent from the next scrape."""
    store, _ = make_store(clock, "kept", "gone")
    metrics = Metrics(store, version="9.9.9")
    store.remove("gone")
    assert value(metrics, "token_broker_service_state", service="kept", state="refreshing") == 1
    assert b'service="gone"' not in metrics.render()


def test_expiry_and_age_are_computed_at_scrape_time(clock: FakeClock) -> None:
    """Expiry counts down and age counts up with the store's clock; a key has no expiry."""
    store, _ = make_store(clock, "tok", "key")
    metrics = Metrics(store, version="9.9.9")
    store.restore("tok", token(clock, lifetime=100), clock.now)
    store.restore("key", AccessToken("key-secret-1", AuthKind.KEY, None), clock.now)
    clock.now += 30
    assert value(metrics, "token_broker_credential_expiry_seconds", service="tok") == 70
    assert value(metrics, "token_broker_last_refresh_age_seconds", service="tok") == 30
    clock.now += 10
    assert value(metrics, "token_broker_credential_expiry_seconds", service="tok") == 60
    assert value(metrics, "token_broker_last_refresh_age_seconds", service="key") == 40
    assert value(metrics, "token_broker_credential_expiry_seconds", service="key") is None


def test_a_service_without_a_credential_has_no_expiry_or_age(clock: FakeClock) -> None:
    """Before a first success a service reports its state only."""
    store, _ = make_store(clock, "cold")
    metrics = Metrics(store, version="9.9.9")
    assert value(metrics, "token_broker_credential_expiry_seconds", service="cold") is None
    assert value(metrics, "token_broker_last_refresh_age_seconds", service="cold") is None


def test_clock_skew_is_the_providers_last_reading(clock: FakeClock) -> None:
    """The skew gauge is what the provider last read from Azure's `Date`, absent before."""
    store, providers = make_store(clock, "seen", "unseen")
    metrics = Metrics(store, version="9.9.9")
    providers["seen"].clock_skew_s = -42.5
    assert value(metrics, "token_broker_clock_skew_seconds", service="seen") == -42.5
    assert value(metrics, "token_broker_clock_skew_seconds", service="unseen") is None


async def test_refreshes_are_counted_by_outcome_and_error_kind(clock: FakeClock) -> None:
    """Every finished fetch counts once: successes as ok, failures by their error kind."""
    store, providers = make_store(clock, "svc")
    metrics = Metrics(store, version="9.9.9")
    providers["svc"].outcomes += [
        token(clock),
        ThrottledError("slow down", status=429),
        ThrottledError("slow down", status=429),
        ZeroDivisionError(),
        token(clock, "tok-secret-2"),
    ]
    for _ in range(5):
        with contextlib.suppress(UpstreamError):
            await store.fetch("svc")
    name = "token_broker_refreshes_total"
    assert value(metrics, name, service="svc", outcome="success", reason="ok") == 2
    assert value(metrics, name, service="svc", outcome="failure", reason="throttled") == 2
    assert value(metrics, name, service="svc", outcome="failure", reason="upstream") == 1


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (None, "ok"),
        (SignInError("AADSTS7000215"), "sign_in"),
        (PermissionDeniedError("403"), "permission_denied"),
        (NotFoundError("404"), "not_found"),
        (UnsupportedAuthError("both on"), "unsupported_auth"),
        (ThrottledError("429"), "throttled"),
        (UnavailableError("503"), "unavailable"),
        (MalformedResponseError("not JSON"), "malformed_response"),
        (UpstreamError("401"), "upstream"),
    ],
)
def test_reason_names_the_error_kind(error: UpstreamError | None, reason: str) -> None:
    """Each error class maps to its fixed snake-case reason, never to its message."""
    assert reason_of(error) == reason
    assert reason in REASONS


@pytest.mark.parametrize(
    ("url", "region"),
    [
        ("https://eastus.api.azureml.ms/modelmanagement/v1.0/subscriptions/s/token", "eastus"),
        ("https://westeurope.modelmanagement.azureml.net/modelmanagement/v1.0/x", "westeurope"),
        ("https://chinaeast2.api.ml.azure.cn/modelmanagement/v1.0/x", "chinaeast2"),
        ("https://0a1b-2c.workspace.northeurope.api.azureml.ms/x", "northeurope"),
        ("https://eastus.api.azureml.ms/discovery", "eastus"),
        ("https://127.0.0.1:8443/regions/eastus/modelmanagement/v1.0/x/token", "eastus"),
        ("https://localhost:8443/regions/westus2/discovery", "westus2"),
        ("https://management.azure.com/subscriptions/s?api-version=2024-04-01", "global"),
        ("https://127.0.0.1:8443/subscriptions/s/resourceGroups/rg", "global"),
        ("https://127.0.0.1:8443/regions/", "global"),
        ("https://127.0.0.1:8443/regions/East_US!/x", "global"),
        ("https://api.azureml.ms/x", "global"),
        ("not a url", "global"),
    ],
)
def test_region_comes_from_regional_urls_only(url: str, region: str) -> None:
    """A regional Azure host or emulator path yields its region; anything else is global."""
    assert region_of(url) == region


def test_upstream_calls_are_timed_by_route_region_and_status(clock: FakeClock) -> None:
    """An answered call is labelled with its status, an unanswered one with `error`."""
    store, _ = make_store(clock)
    metrics = Metrics(store, version="9.9.9")
    url = "https://eastus.api.azureml.ms/modelmanagement/v1.0/x/token"
    metrics.observe_upstream("mms.token", url, 200, 0.02)
    metrics.observe_upstream("mms.token", url, None, 30.0)
    name = "token_broker_upstream_request_duration_seconds_count"
    assert value(metrics, name, route="mms.token", region="eastus", status="200") == 1
    assert value(metrics, name, route="mms.token", region="eastus", status="error") == 1
    bucket = "token_broker_upstream_request_duration_seconds_bucket"
    labels = {"route": "mms.token", "region": "eastus", "status": "200"}
    assert value(metrics, bucket, **labels, le="0.005") == 0
    assert value(metrics, bucket, **labels, le="0.025") == 1


def test_exposition_has_build_info_and_no_created_series(clock: FakeClock) -> None:
    """Build info is 1 with the version given, and no `_created` timestamps are exported."""
    store, _ = make_store(clock)
    metrics = Metrics(store, version="9.9.9")
    metrics.request_count("/healthz", 200).inc()
    body = metrics.render().decode()
    assert 'token_broker_build_info{python="' in body and 'version="9.9.9"} 1.0' in body
    assert "_created" not in body


async def test_requests_are_labelled_by_route_template(clock: FakeClock, tmp_path: Path) -> None:
    """The request counter uses the matched route's template, and `unmatched` for no route."""
    config_path = tmp_path / "broker.toml"
    config_path.write_text(MINIMAL_CONFIG)
    config_path.chmod(0o600)
    store, _ = make_store(clock)
    metrics = Metrics(store, version="9.9.9")
    app = make_app(store, AccessRules(load_config(config_path)), metrics=metrics)
    async with TestClient(TestServer(app)) as client:
        meta = {"Metadata": "true"}
        for path in ("/v1/token/fraud-SECRET-path", "/v1/token/other", "/nope/x1", "/nope/x2"):
            (await client.get(path, headers=meta)).release()
        (await client.post("/v1/services", headers=meta)).release()
        (await client.get("/v1/services", headers=meta)).release()
        (await client.get("/v1/services")).release()
        (await client.get("/healthz")).release()
    name = "token_broker_requests_total"
    assert value(metrics, name, route="/v1/token/{service}", status="404") == 2
    assert value(metrics, name, route="unmatched", status="404") == 2
    assert value(metrics, name, route="unmatched", status="405") == 1
    assert value(metrics, name, route="/v1/services", status="200") == 1
    assert value(metrics, name, route="/v1/services", status="400") == 1
    assert value(metrics, name, route="/healthz", status="200") == 1
    body = metrics.render()
    assert b"SECRET" not in body and b"/nope" not in body
