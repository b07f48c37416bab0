"""`check-config`'s output: the effective configuration as TOML, every secret masked."""

from __future__ import annotations

import re
from dataclasses import fields

from broker.config.model import (
    CacheConfig,
    Config,
    FleetConfig,
    IdentityConfig,
    ListenConfig,
    ProxyConfig,
    RefreshConfig,
    ServiceConfig,
    SinkConfig,
    UnixListener,
)
from broker.config.reader import quote

_MASK = "********"
_Value = str | bool | int | float | tuple[int, ...] | tuple[str, ...]


def render_effective(config: Config) -> str:
    """The effective configuration as TOML, every secret masked."""
    unix, tcp, cloud = config.listen.unix, config.listen.tcp, config.cloud
    hosts = ("name", "authority_host", "resource_manager", "region_api")
    cloud_values: dict[str, _Value] = {key: getattr(cloud, key) for key in hosts}
    if cloud.ca_bundle is not None:
        cloud_values["ca_bundle"] = str(cloud.ca_bundle)
    blocks: list[tuple[str, dict[str, _Value]]] = [
        ("[listen]", _limit_values(config.listen)),
        ("[listen.unix]", _unix_values(unix)),
        ("[listen.tcp]", {"enabled": tcp.enabled, "host": tcp.host, "port": tcp.port}),
        ("[log]", {"format": config.log.format, "level": config.log.level}),
        ("[cloud]", cloud_values),
        ("[refresh]", {f.name: getattr(config.refresh, f.name) for f in fields(RefreshConfig)}),
        ("[cache]", _cache_values(config.cache)),
    ]
    blocks += [
        (f"[identity.{_key(name)}]", _identity_values(i)) for name, i in config.identities.items()
    ]
    blocks += [(f"[api_key.{_key(name)}]", {"sha256": _MASK}) for name in config.api_keys]
    for service in config.services:
        blocks.append(("[[service]]", _service_values(service)))
        if service.sink is not None:
            blocks.append(("[service.sink]", _sink_values(service.sink)))
    if config.compat.enabled:
        compat = config.compat
        values: dict[str, _Value] = {"imds": compat.imds, "resources": compat.resources}
        if compat.app_service_header is not None:
            values["app_service_header_file"] = compat.header_source
        values["identity"] = compat.identity
        blocks.append(("[compat]", values))
    blocks.append(("[proxy]", {f.name: getattr(config.proxy, f.name) for f in fields(ProxyConfig)}))
    if config.fleet.enabled:
        blocks.append(("[fleet]", _fleet_values(config.fleet)))
    lines = [f"# Effective configuration of {config.path}; secrets are never shown."]
    for header, values in blocks:
        lines += ["", header, *(f"{_key(k)} = {_literal(v)}" for k, v in values.items())]
    return "\n".join(lines) + "\n"


def _limit_values(listen: ListenConfig) -> dict[str, _Value]:
    listeners = ("unix", "tcp")  # rendered as tables of their own
    return {
        f.name: getattr(listen, f.name) for f in fields(ListenConfig) if f.name not in listeners
    }


def _unix_values(unix: UnixListener) -> dict[str, _Value]:
    values: dict[str, _Value] = {
        "enabled": unix.enabled,
        "path": str(unix.path),
        "mode": f"{unix.mode:04o}",
    }
    for key in ("owner", "group"):  # absent: the socket keeps the broker's own
        if getattr(unix, key) is not None:
            values[key] = getattr(unix, key)
    return values


def _identity_values(identity: IdentityConfig) -> dict[str, _Value]:
    values: dict[str, _Value] = {
        "tenant_id": identity.tenant_id,
        "client_id": identity.client_id,
        "kind": identity.kind,
        "credential": identity.secret_source,
    }
    if identity.client_secret is not None:
        values["client_secret"] = _MASK
    if identity.certificate_file is not None:
        values["certificate_file"] = str(identity.certificate_file)
    if identity.certificate_password is not None:
        values["certificate_password"] = _MASK
    if identity.federated_token_file is not None:
        values["federated_token_file"] = str(identity.federated_token_file)
    return values


def _cache_values(cache: CacheConfig) -> dict[str, _Value]:
    values: dict[str, _Value] = {"enabled": cache.enabled, "path": str(cache.path)}
    if cache.key_source:
        values["key"] = cache.key_source  # where the key is, never the key
    return values


def _fleet_values(fleet: FleetConfig) -> dict[str, _Value]:
    values: dict[str, _Value] = {"enabled": True, "redis_url": fleet.redis_url}
    if fleet.ca_file is not None:
        values["ca_file"] = str(fleet.ca_file)
    if fleet.username is not None:
        values["username"] = fleet.username
    if fleet.password_source:
        values["password"] = fleet.password_source  # where it is, never the password
    values["key_prefix"] = fleet.key_prefix
    values["encryption_key"] = fleet.key_source
    if fleet.previous_key_sources:
        values["previous_encryption_keys"] = fleet.previous_key_sources  # where, never what
    for key in ("lease_s", "connect_timeout_s", "command_timeout_s"):
        values[key] = getattr(fleet, key)
    return values


# The order check-config writes a service's keys in, whatever its kind.
_SERVICE_ORDER = (
    "name",
    "identity",
    "subscription_id",
    "resource_group",
    "workspace",
    "web_service",
    "region",
    "auth",
    "allow_users",
    "allow_groups",
    "api_keys",
    "kind",
    "scope",
    "endpoint",
)


def _service_values(service: ServiceConfig) -> dict[str, _Value]:
    own = {f.name for f in fields(service)}
    values: dict[str, _Value] = {}
    for name in _SERVICE_ORDER:
        value = getattr(service, name) if name in own else None
        if value is not None:  # region None means discovered from the workspace
            values[name] = value
    return values


def _sink_values(sink: SinkConfig) -> dict[str, _Value]:
    values: dict[str, _Value] = {
        "path": str(sink.path),
        "format": sink.format,
        "mode": f"{sink.mode:04o}",
    }
    for key in ("owner", "group"):  # absent: the file keeps the broker's own
        if getattr(sink, key) is not None:
            values[key] = getattr(sink, key)
    if sink.command:
        values["command"] = sink.command
        values["command_timeout_s"] = sink.command_timeout_s
    return values


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else quote(key)


def _literal(value: _Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_literal(item) for item in value) + "]"
    return quote(value)
