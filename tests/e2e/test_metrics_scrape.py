"""`GET /metrics` on both listeners: a pinned schema, live values, and no secret anywhere."""

from __future__ import annotations

import asyncio
import json
import platform
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from broker import __version__
from broker.emulator import Emulator
from broker.emulator import seed as demo
from tests.conftest import CLIENT_SECRET, RedisServer, config_text
from tests.e2e.conftest import LISTENERS, Broker, StartBroker

pytestmark = pytest.mark.timeout(30)

# Renaming a metric or changing its labels breaks dashboards and alerts: this test says so.
SCHEMA: dict[str, tuple[str, frozenset[str]]] = {
    "token_broker_service_state": ("gauge", frozenset({"service", "state"})),
    "token_broker_credential_expiry_seconds": ("gauge", frozenset({"service"})),
    "token_broker_last_refresh_age_seconds": ("gauge", frozenset({"service"})),
    "token_broker_upstream_budget_waits": ("counter", frozenset({"service"})),
    "token_broker_clock_skew_seconds": ("gauge", frozenset({"service"})),
    "token_broker_refreshes": ("counter", frozenset({"service", "outcome", "reason"})),
    "token_broker_upstream_request_duration_seconds": (
        "histogram",
        frozenset({"route", "region", "status"}),
    ),
    "token_broker_requests": ("counter", frozenset({"route", "status"})),
    "token_broker_proxy_requests": ("counter", frozenset({"service", "status"})),
    "token_broker_connections_refused": ("counter", frozenset({"listener", "reason"})),
    "token_broker_connections_cut": ("counter", frozenset({"listener", "reason"})),
    "token_broker_streams_open": ("gauge", frozenset({"listener"})),
    "token_broker_streams_closed": ("counter", frozenset({"listener", "reason"})),
    "token_broker_build_info": ("gauge", frozenset({"version", "python"})),
}
# Registered only while fleet mode is on: a broker without a fleet exports none of them.
FLEET_SCHEMA: dict[str, tuple[str, frozenset[str]]] = {
    "token_broker_fleet_credentials": ("counter", frozenset({"service", "origin"})),
    "token_broker_fleet_leases": ("counter", frozenset({"service", "outcome"})),
    "token_broker_fleet_redis_duration_seconds": ("histogram", frozenset({"operation"})),
    "token_broker_fleet_redis_errors": ("counter", frozenset({"operation"})),
    "token_broker_fleet_up": ("gauge", frozenset()),
}
SAMPLE_SUFFIXES = {"counter": {"_total"}, "gauge": {""}, "histogram": {"_bucket", "_count", "_sum"}}


async def scrape(broker: Broker, listener: str) -> str:
    """The body of `GET /metrics` over `listener`, asked without a Metadata header."""
    daemon = broker.daemon
    connector: aiohttp.BaseConnector
    if listener == "unix":
        connector, url = aiohttp.UnixConnector(path=str(daemon.unix_path)), "http://localhost"
    else:
        assert daemon.tcp_address is not None
        host, port = daemon.tcp_address
        connector, url = aiohttp.TCPConnector(), f"http://{host}:{port}"
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(url + "/metrics") as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"] == CONTENT_TYPE_LATEST
        return await resp.text()


def samples(text: str) -> Iterator[Sample]:
    for family in text_string_to_metric_families(text):
        yield from family.samples


def value(text: str, name: str, **labels: str) -> float | None:
    """The value of the one sample named `name` with exactly `labels`, or None."""
    found = [s.value for s in samples(text) if s.name == name and s.labels == labels]
    assert len(found) <= 1
    return found[0] if found else None


async def fetch_credentials(broker: Broker) -> list[str]:
    """Every credential the broker serves, asked for over both listeners."""
    values = []
    for listener in LISTENERS:
        for service in ("fraud", "churn"):
            reply = await broker.client(listener).get(f"/v1/token/{service}")
            assert reply.status == 200
            values.append(reply.json()["access_token"])
    return values


async def fail_one_refresh(broker: Broker, emulator: Emulator, body: str | None = None) -> None:
    emulator.state.fail("mms.token", status=503, times=1, body=body)
    await asyncio.wait([broker.daemon.store.fetch("fraud")])


@pytest.mark.parametrize("listener", LISTENERS)
async def test_scrape_schema_is_pinned(
    start_broker: StartBroker, emulator: Emulator, listener: str
) -> None:
    """Every metric's name, type and label names are exactly the pinned ones."""
    broker = await start_broker()
    await broker.settled()
    await fetch_credentials(broker)
    await fail_one_refresh(broker, emulator)
    await broker.client().get("/v1/proxy/churn")  # one proxied call, for a sample
    assert_schema(await scrape(broker, listener), SCHEMA)


def assert_schema(text: str, schema: dict[str, tuple[str, frozenset[str]]]) -> None:
    """The scrape has exactly `schema`'s families, each with a sample, its type and labels."""
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert set(families) == set(schema)
    for name, (kind, labels) in schema.items():
        family = families[name]
        assert family.type == kind, name
        assert family.samples, name
        for sample in family.samples:
            assert sample.name.removeprefix(name) in SAMPLE_SUFFIXES[kind], sample.name
            names = set(sample.labels) - ({"le"} if sample.name.endswith("_bucket") else set())
            assert names == labels, sample.name


async def test_fleet_mode_adds_its_pinned_series(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, redis: RedisServer
) -> None:
    """With [fleet] on, the scrape is the pinned schema plus fleet mode's five families,
    each with its labels: what the fleet alert and the dashboard's fleet row read."""
    key_file = short_dir / "fleet.key"
    key_file.write_bytes(b"k" * 32)
    key_file.chmod(0o600)
    text = config_text(emulator, short_dir) + (
        f'\n[fleet]\nenabled = true\nredis_url = "{redis.unix_url}"\n'
        f'encryption_key_file = "{key_file}"\n'
    )
    broker = await start_broker(text)
    await broker.settled()
    await fetch_credentials(broker)
    await fail_one_refresh(broker, emulator)
    await broker.client().get("/v1/proxy/churn")
    redis.stop()  # a refresh without Redis: an error sample, fleet_up 0
    await asyncio.wait([broker.daemon.store.fetch("fraud")])
    assert_schema(await scrape(broker, "unix"), SCHEMA | FLEET_SCHEMA)


async def test_values_follow_tokens_and_an_injected_failure(
    start_broker: StartBroker, emulator: Emulator
) -> None:
    """States, refresh counters, upstream timings and request counts track what happened."""
    broker = await start_broker()
    await broker.settled()
    await fetch_credentials(broker)
    for listener in LISTENERS:
        text = await scrape(broker, listener)
        for service in ("fraud", "churn"):
            assert value(text, "token_broker_service_state", service=service, state="fresh") == 1
            states = [
                s.value
                for s in samples(text)
                if s.name == "token_broker_service_state" and s.labels["service"] == service
            ]
            assert sorted(states) == [0, 0, 0, 0, 1]
        expiry = value(text, "token_broker_credential_expiry_seconds", service="fraud")
        assert expiry is not None and 0 < expiry <= 61
        assert value(text, "token_broker_credential_expiry_seconds", service="churn") is None
        age = value(text, "token_broker_last_refresh_age_seconds", service="churn")
        assert age is not None and 0 <= age < 30
        python = platform.python_version()
        assert value(text, "token_broker_build_info", version=__version__, python=python) == 1

    await fail_one_refresh(broker, emulator)
    text = await scrape(broker, "tcp")
    assert value(text, "token_broker_service_state", service="fraud", state="stale") == 1
    assert value(text, "token_broker_service_state", service="churn", state="fresh") == 1
    refreshes = "token_broker_refreshes_total"
    assert value(text, refreshes, service="fraud", outcome="success", reason="ok") == 1
    assert value(text, refreshes, service="churn", outcome="success", reason="ok") == 1
    assert value(text, refreshes, service="fraud", outcome="failure", reason="unavailable") == 1
    timings = "token_broker_upstream_request_duration_seconds_count"
    mms_token = {"route": "mms.token", "region": "eastus"}
    assert value(text, timings, **mms_token, status="200") == 1
    assert value(text, timings, **mms_token, status="503") == 1
    assert value(text, timings, route="arm.workspace", region="global", status="200") == 1
    requests = "token_broker_requests_total"
    assert value(text, requests, route="/v1/token/{service}", status="200") == 4
    assert value(text, requests, route="/metrics", status="200") == 2


async def test_scrape_holds_no_secret(start_broker: StartBroker, emulator: Emulator) -> None:
    """No token, key, ARM token or client secret appears in a scrape, even after a failure
    whose error body echoes a credential."""
    broker = await start_broker()
    await broker.settled()
    secrets = [CLIENT_SECRET, *await fetch_credentials(broker)]
    secrets += emulator.state.current_keys(
        demo.SUBSCRIPTION_ID, demo.RESOURCE_GROUP, demo.WORKSPACE, demo.KEY_SERVICE
    )
    credential = broker.daemon.credentials["main"]
    secrets.append((await credential.get_token(broker.daemon.config.cloud.arm_scope)).value)
    await fail_one_refresh(broker, emulator, body=json.dumps({"message": secrets[1]}))
    await broker.client().get(f"/v1/token/{secrets[1]}")  # a secret in a client's path
    for listener in LISTENERS:
        text = await scrape(broker, listener)
        assert "token_broker_refreshes_total" in text
        for secret in secrets:
            assert secret not in text
