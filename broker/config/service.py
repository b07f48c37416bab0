"""The `[[service]]` tables: what local clients ask for, and who may ask.

A service names its identity and, optionally, who may use it: peer users and groups on
the Unix socket (`broker.config.client_access` resolves their names) and `[api_key.NAME]` keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import fields, replace
from typing import TypedDict, cast

from broker.config.client_access import account_ids, service_api_keys
from broker.config.model import (
    ApiKey,
    AuthMode,
    EntraScopeConfig,
    OnlineEndpointConfig,
    ServiceConfig,
    ServiceKind,
    WebServiceConfig,
)
from broker.config.reader import Table, quote
from broker.config.sink import service_sink

# Every key a [[service]] table may hold, of any kind; each kind refuses the others' own.
SERVICE_KEYS = tuple(
    dict.fromkeys(
        f.name
        for kind in (WebServiceConfig, OnlineEndpointConfig, EntraScopeConfig)
        for f in fields(kind)
    )
)

_AZURE_NAMES = ("subscription_id", "resource_group", "workspace", "web_service")
_SERVICE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_URL_SEGMENT = re.compile(r"[^/?#\s]+")  # Azure names travel as URL path segments
_REGION = re.compile(r"[a-z0-9]+")
_SCOPE = re.compile(r"(https://|api://)[^\s/?#]+(/[^\s?#]*)?/\.default")
KINDS = ("azureml-webservice", "entra", "azureml-online-endpoint")


def services(
    root: Table,
    identity_names: list[str],
    keys: Mapping[str, ApiKey],
    environ: Mapping[str, str] | None = None,
) -> tuple[ServiceConfig, ...]:
    """Every `[[service]]` of the file, in file order; names unique, references resolved."""
    tables = root.array_of_tables(
        "service", "write each service as a [[service]] table, with double brackets"
    )
    if "service" not in root.data:
        root.problem(
            "service",
            "no service is defined",
            "add a [[service]] table with name, subscription_id, resource_group, workspace "
            "and web_service",
        )
    found: list[ServiceConfig] = []
    first_use: dict[str, int] = {}
    for index, table in enumerate(tables):
        service = _service(table, identity_names, keys)
        service = replace(service, sink=service_sink(table, environ or {}))
        if service.name in first_use:
            table.problem(
                "name",
                f"service name {quote(service.name)} is already used by "
                f"service[{first_use[service.name] + 1}]",
                "give each service its own name: clients ask for it in /v1/token/NAME",
            )
        elif service.name:
            first_use[service.name] = index
        found.append(service)
    return tuple(found)


def _service(table: Table, identity_names: list[str], keys: Mapping[str, ApiKey]) -> ServiceConfig:
    table.known(*SERVICE_KEYS)
    name = table.required_text("name", "the name clients use in /v1/token/NAME")
    if name and (not _SERVICE_NAME.fullmatch(name) or not name.strip(".")):
        table.problem(
            "name",
            f"service name {quote(name)} cannot be used in a URL",
            "use 1 to 64 letters, digits, '.', '_' or '-' (not only dots)",
        )
    kind = cast(ServiceKind, table.choice("kind", KINDS, "azureml-webservice", "service kind"))
    if kind == "entra":
        return _entra_service(table, name, identity_names, keys)
    if kind == "azureml-online-endpoint":
        return _endpoint_service(table, name, identity_names, keys)
    if table.has("scope"):
        table.problem(
            "scope",
            'scope is only used with kind = "entra"',
            'remove it, or set kind = "entra" for an Entra token of that scope',
        )
    subscription, group, workspace, web_service = (_azure_name(table, key) for key in _AZURE_NAMES)
    region = table.optional_text("region")
    if region is not None and not _REGION.fullmatch(region):
        table.problem(
            "region",
            f"region {quote(region)} is not an Azure region name",
            'write it in lowercase without spaces, like "eastus", or remove it to discover it',
        )
    auth = cast(AuthMode, table.choice("auth", ("auto", "token", "key"), "auto", "auth mode"))
    identity = _service_identity(table, identity_names)
    return WebServiceConfig(
        name=name,
        identity=identity,
        subscription_id=subscription,
        resource_group=group,
        workspace=workspace,
        web_service=web_service,
        region=region or None,
        auth=auth,
        **_who_may_ask(table, keys),
    )


def _entra_service(
    table: Table, name: str, identity_names: list[str], keys: Mapping[str, ApiKey]
) -> EntraScopeConfig:
    for key in (*_AZURE_NAMES, "region", "auth"):
        if table.has(key):
            table.problem(
                key,
                f'{key} is not used with kind = "entra"',
                "remove it: an Entra service is defined by its scope alone",
            )
    scope = table.required_text("scope", "the scope, like https://ml.azure.com/.default")
    if scope and not _SCOPE.fullmatch(scope):
        table.problem(
            "scope",
            f"scope {quote(scope)} is not an application scope",
            "a service principal's token needs a resource's /.default scope, like "
            "https://ml.azure.com/.default or https://management.azure.com/.default",
        )
    return EntraScopeConfig(
        name=name,
        identity=_service_identity(table, identity_names),
        scope=scope,
        **_who_may_ask(table, keys),
    )


def _endpoint_service(
    table: Table, name: str, identity_names: list[str], keys: Mapping[str, ApiKey]
) -> OnlineEndpointConfig:
    for key in ("web_service", "region", "auth", "scope"):
        if table.has(key):
            table.problem(
                key,
                f'{key} is not used with kind = "azureml-online-endpoint"',
                "remove it: the endpoint's auth mode and scoring URI come from Azure",
            )
    subscription, group, workspace = (_azure_name(table, key) for key in _AZURE_NAMES[:3])
    return OnlineEndpointConfig(
        name=name,
        identity=_service_identity(table, identity_names),
        subscription_id=subscription,
        resource_group=group,
        workspace=workspace,
        endpoint=_azure_name(table, "endpoint"),
        **_who_may_ask(table, keys),
    )


class _WhoMayAsk(TypedDict):
    allow_users: tuple[int, ...]
    allow_groups: tuple[int, ...]
    api_keys: tuple[str, ...]


def _who_may_ask(table: Table, keys: Mapping[str, ApiKey]) -> _WhoMayAsk:
    return {
        "allow_users": account_ids(table, "allow_users", "user"),
        "allow_groups": account_ids(table, "allow_groups", "group"),
        "api_keys": service_api_keys(table, keys),
    }


def _azure_name(table: Table, key: str) -> str:
    value = table.required_text(key, f"the {key.replace('_', ' ')} in Azure")
    if value and not _URL_SEGMENT.fullmatch(value):
        table.problem(
            key,
            f"{key} {quote(value)} cannot contain '/', '?', '#' or spaces",
            "copy the name exactly as the Azure portal shows it",
        )
    return value


def _service_identity(table: Table, identity_names: list[str]) -> str:
    known = ", ".join(identity_names)
    name = table.optional_text("identity")
    if name is None and not table.has("identity") and len(identity_names) > 1:
        table.problem(
            "identity",
            "identity is not set and several identities are defined",
            f'add identity = "NAME" with one of: {known}',
        )
    if name is None:
        return identity_names[0] if len(identity_names) == 1 else ""
    if identity_names and name not in identity_names:
        table.problem(
            "identity",
            f"no identity named {quote(name)}",
            f"define [identity.{name}] or use one of: {known}",
        )
    return name
