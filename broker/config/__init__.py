"""The configuration: one TOML file, parsed once into frozen objects.

`load_config` reads and validates the whole file and raises `ConfigError` with every
problem it found, each naming the file, the line, the key and the fix.

    model.py     the frozen value objects and the built-in cloud profiles
    reader.py    typed reads of TOML values that record problems with their lines
    schema.py    the sections: listen, log, cloud, refresh, cache
    identity.py  identities and their secret sources
    access.py    API keys, users and groups: who may reach the broker
    service.py   the services, and who may ask for each
    compat.py    the managed-identity compatible routes
    proxy.py     how requests are forwarded to scoring URIs
    fleet_settings.py  fleet mode: the Redis the brokers share, its password and key
    key_files.py the encryption keys of the cache and the fleet
    sink.py      a service's file sink: where its credential is copied, and the command
    render.py    the effective configuration with secrets masked
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from broker.config.client_access import hash_api_key, new_api_key
from broker.config.model import (
    CLOUDS,
    DEFAULT_CACHE_PATH,
    DEFAULT_CONFIG_PATH,
    DEFAULT_SOCKET_PATH,
    DEFAULT_TCP_HOST,
    DEFAULT_TCP_PORT,
    ApiKey,
    AuthMode,
    CacheConfig,
    CloudProfile,
    CompatConfig,
    Config,
    EntraScopeConfig,
    FleetConfig,
    IdentityConfig,
    IdentityKind,
    ListenConfig,
    LogConfig,
    LogFormat,
    OnlineEndpointConfig,
    ProxyConfig,
    RefreshConfig,
    Secret,
    SecretBytes,
    ServiceConfig,
    SinkConfig,
    SinkFormat,
    TcpListener,
    UnixListener,
    WebServiceConfig,
)
from broker.config.render import render_effective
from broker.config.schema import parse


def load_config(path: Path, *, environ: Mapping[str, str] | None = None) -> Config:
    """Read, validate and freeze the configuration at `path`.

    Raises `ConfigError` with every problem found, in file order, and nothing else for a
    bad file. Relative paths in the file are taken from the file's own directory.
    """
    return parse(path, os.environ if environ is None else environ)


__all__ = [
    "CLOUDS",
    "DEFAULT_CACHE_PATH",
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_SOCKET_PATH",
    "DEFAULT_TCP_HOST",
    "DEFAULT_TCP_PORT",
    "ApiKey",
    "AuthMode",
    "CacheConfig",
    "CloudProfile",
    "CompatConfig",
    "Config",
    "EntraScopeConfig",
    "FleetConfig",
    "IdentityConfig",
    "IdentityKind",
    "ListenConfig",
    "LogConfig",
    "LogFormat",
    "OnlineEndpointConfig",
    "ProxyConfig",
    "RefreshConfig",
    "Secret",
    "SecretBytes",
    "ServiceConfig",
    "SinkConfig",
    "SinkFormat",
    "TcpListener",
    "UnixListener",
    "WebServiceConfig",
    "hash_api_key",
    "load_config",
    "new_api_key",
    "render_effective",
]
