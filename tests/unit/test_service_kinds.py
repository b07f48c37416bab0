"""Each kind of service is its own configuration type, and what identifies it keeps the shape
persisted caches were saved with."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.config import EntraScopeConfig, OnlineEndpointConfig, WebServiceConfig
from broker.config.model import CLOUDS, Config, IdentityConfig, Secret
from broker.models import fingerprint

pytestmark = pytest.mark.timeout(10)

WEB = WebServiceConfig(
    name="fraud",
    identity="main",
    subscription_id="sub",
    resource_group="rg",
    workspace="ws",
    web_service="fraud-svc",
    region="eastus",
    auth="token",
)
ENDPOINT = OnlineEndpointConfig(
    name="churn",
    identity="main",
    subscription_id="sub",
    resource_group="rg",
    workspace="ws",
    endpoint="churn-ep",
)
ENTRA = EntraScopeConfig(name="arm", identity="main", scope="https://management.azure.com/.default")


def test_coordinates_keep_the_persisted_caches_shape() -> None:
    """subscription, resource group, workspace, web service, region, auth, kind, scope,
    endpoint: the parts earlier versions fingerprinted, absent ones empty and auth "auto"."""
    assert WEB.coordinates == (
        "sub",
        "rg",
        "ws",
        "fraud-svc",
        "eastus",
        "token",
        "azureml-webservice",
        "",
        "",
    )
    assert ENDPOINT.coordinates == (
        *("sub", "rg", "ws", "", "", "auto"),
        *("azureml-online-endpoint", "", "churn-ep"),
    )
    assert ENTRA.coordinates == (
        *("", "", "", "", "", "auto"),
        *("entra", "https://management.azure.com/.default", ""),
    )


def test_a_fingerprint_from_an_earlier_version_still_matches() -> None:
    """The digest a web service's saved credential carries is the one computed before the
    service kinds had their own types (pinned), so an upgrade restores the cache."""
    parts = ("https://management.azure.com/", "tenant", "client", *WEB.coordinates)
    assert fingerprint(*parts) == (
        "d2a111f2cbdb22684ae8afb02639cfa8953d93b0de82bc9703b87987bd4fa0c7"
    )


def test_a_services_identity_is_its_cloud_principal_and_coordinates() -> None:
    """`Config.service_identity` digests the cloud's Resource Manager, the tenant, the
    client id and the coordinates, in the order saved caches were made with; another
    principal is another identity, and a service not configured has none."""
    identity = IdentityConfig("main", "tenant", "client", "secret", Secret("s"))
    config = Config(Path("/b.toml"), CLOUDS["AzureCloud"], {"main": identity}, (WEB,))
    parts = ("https://management.azure.com", "tenant", "client", *WEB.coordinates)
    assert config.service_identity("fraud") == fingerprint(*parts)
    other = IdentityConfig("main", "tenant", "other-client", "secret", Secret("s"))
    moved = Config(Path("/b.toml"), CLOUDS["AzureCloud"], {"main": other}, (WEB,))
    assert moved.service_identity("fraud") != config.service_identity("fraud")
    assert config.service_identity("absent") is None


def test_a_discovered_region_is_empty_in_the_coordinates() -> None:
    web = WebServiceConfig(
        name="w",
        identity="main",
        subscription_id="s",
        resource_group="g",
        workspace="w",
        web_service="x",
    )
    assert web.region is None
    assert web.coordinates[4] == ""
    assert web.coordinates[5] == "auto"
