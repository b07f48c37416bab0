"""What the configuration file may say: every section, its keys, and what makes them valid.

`parse` is the body of `broker.config.load_config`; it reads with `broker.config.reader`,
collects every problem, and raises one `ConfigError` at the end.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from string import Formatter
from types import MappingProxyType
from typing import cast
from urllib.parse import urlsplit

from broker.config.client_access import api_keys, owner_or_group
from broker.config.fleet_settings import fleet
from broker.config.identity import identities
from broker.config.key_files import KeyKeys, read_key
from broker.config.managed_identity import compat
from broker.config.model import (
    CLOUDS,
    DEFAULT_SOCKET_PATH,
    DEFAULT_TCP_HOST,
    DEFAULT_TCP_PORT,
    CacheConfig,
    CloudProfile,
    Config,
    ListenConfig,
    LogConfig,
    LogFormat,
    RefreshConfig,
    TcpListener,
    UnixListener,
)
from broker.config.proxy_settings import proxy
from broker.config.reader import (
    LineIndex,
    Problems,
    Sources,
    Table,
    Unreadable,
    permission_bits,
    permission_mode,
    quote,
    read_text,
)
from broker.config.service import services
from broker.config.sink import sink_conflicts
from broker.errors import ConfigError

TOP_KEYS = (
    "listen",
    "log",
    "cloud",
    "refresh",
    "cache",
    "identity",
    "api_key",
    "service",
    "compat",
    "proxy",
    "fleet",
)
LISTEN_LIMITS = (
    "max_connections",
    "idle_timeout_s",
    "max_header_bytes",
    "max_body_bytes",
    "max_streams",
    "stream_max_age_s",
    "watch_heartbeat_s",
    "tcp_share",
    "uid_share",
    "front_door",
)
CUSTOM_HOSTS = ("authority_host", "resource_manager", "region_api")
LOG_LEVELS = ("debug", "info", "warning", "error")

_ZERO_ALLOWED = frozenset({"margin_s", "jitter_s", "clock_skew_s", "client_refresh_window_s"})
_CACHE_KEY = KeyKeys(
    "key_file",
    "key_credential",
    missing="the cache is enabled but has no key (key_file or key_credential)",
    what="a cache key",
    exposes="decrypt the cached credentials",
    make="create one with: head -c 32 /dev/urandom > /etc/token-broker/cache.key && "
    'chmod 600 /etc/token-broker/cache.key, then set key_file = "/etc/token-broker/cache.key"',
)
_CACHE_HINTS = {
    "key": "the broker never reads the cache key from its configuration file: put it in a "
    "file (key_file) or a systemd credential (key_credential)"
}
_TOML_AT = re.compile(r"\s*\(at (?:line (\d+), column (\d+)|end of document)\)")
_HOST_MEANINGS = {
    "authority_host": "the Entra ID sign-in host, e.g. https://login.microsoftonline.com",
    "resource_manager": "the Azure Resource Manager host, e.g. https://management.azure.com",
    "region_api": "the regional Azure ML API, e.g. https://{region}.api.azureml.ms",
}


def parse(path: Path, environ: Mapping[str, str]) -> Config:
    """Read and validate the file at `path`; raise `ConfigError` with every problem."""
    problems = Problems(str(path))
    document = _read_document(path, problems)
    if document is None:
        raise ConfigError(problems.items)
    root = Table(document, (), problems)
    root.known(*TOP_KEYS)
    sources = Sources(path.parent, environ, path, permission_bits(path))
    listen = _listen(root.table("listen"), sources)
    log = _log(root.table("log"))
    cloud = _cloud(root.table("cloud"), sources)
    refresh = _refresh(root.table("refresh"))
    cache = _cache(root.table("cache"), sources)
    by_name = identities(root, sources)
    keys = api_keys(root)
    served = services(root, list(by_name), keys, sources.environ)
    compatible = compat(root, sources, list(by_name))
    shared = fleet(root, sources)
    sink_conflicts(problems, served, listen, cache, path)  # after every file is read
    proxying = proxy(root)
    if problems.items:
        raise ConfigError(problems.in_file_order())
    return Config(
        path,
        cloud,
        MappingProxyType(by_name),
        served,
        listen,
        log,
        refresh,
        cache,
        MappingProxyType(keys),
        compatible,
        proxy=proxying,
        fleet=shared,
    )


def _read_document(path: Path, problems: Problems) -> dict[str, object] | None:
    try:
        text = read_text(path)
    except Unreadable as exc:
        fix = (
            "create it, or pass another file with -c PATH"
            if exc.missing
            else "make it a UTF-8 file the broker's user can read, or pass another with -c PATH"
        )
        problems.add((), exc.message, fix)
        return None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        at = _TOML_AT.search(str(exc))
        line = int(at.group(1)) if at and at.group(1) else max(len(text.splitlines()), 1)
        column = f" (column {at.group(2)})" if at and at.group(2) else ""
        problems.add(
            (),
            f"TOML syntax error: {_TOML_AT.sub('', str(exc))}{column}",
            'fix the TOML on that line: strings need quotes ("…"), tables are [name], '
            "and each key is written key = value",
            line=line,
        )
        return None
    problems.lines = LineIndex(text)
    return document


def _listen(table: Table, sources: Sources) -> ListenConfig:
    table.known("unix", "tcp", *LISTEN_LIMITS)
    unix_table, tcp_table = table.table("unix"), table.table("tcp")
    unix_table.known("enabled", "path", "mode", "owner", "group")
    tcp_table.known("enabled", "host", "port")
    unix = UnixListener(
        unix_table.flag("enabled", True),
        unix_table.file_path("path", sources.base) or DEFAULT_SOCKET_PATH,
        permission_mode(
            unix_table,
            UnixListener().mode,
            example="0660",
            others=lambda _: "lets other users use the socket, which serves live credentials",
            execute="which mean nothing on a socket",
            fix='use read and write bits for owner and group only: "0660"',
        ),
        owner_or_group(unix_table, "owner"),
        owner_or_group(unix_table, "group"),
    )
    tcp = TcpListener(
        tcp_table.flag("enabled", True),
        _loopback_host(tcp_table),
        tcp_table.integer("port", DEFAULT_TCP_PORT, 0, 65535),
    )
    if not unix.enabled and not tcp.enabled:
        table.problem(
            None,
            "both listeners are disabled, so no client could reach the broker",
            "set enabled = true under [listen.unix] or [listen.tcp]",
        )
    defaults = ListenConfig()
    connections = _at_least(table, "max_connections", defaults.max_connections, 1)
    return ListenConfig(
        unix,
        tcp,
        connections,
        _seconds(table, "idle_timeout_s", defaults.idle_timeout_s),
        table.integer("max_header_bytes", defaults.max_header_bytes, 1024, 65536),
        _at_least(table, "max_body_bytes", defaults.max_body_bytes, 0),
        _max_streams(table, connections, defaults.max_streams),
        _seconds(table, "stream_max_age_s", defaults.stream_max_age_s),
        _share(table, "tcp_share", defaults.tcp_share, "the TCP listener's clients together"),
        _share(table, "uid_share", defaults.uid_share, "one user on the Unix socket"),
        watch_heartbeat_s=_seconds(table, "watch_heartbeat_s", defaults.watch_heartbeat_s),
        front_door=table.flag("front_door", defaults.front_door),
    )


def _max_streams(table: Table, connections: int, default: int) -> int:
    """Fewer streams than connections: the places left over are the plain requests'."""
    if not table.has("max_streams"):
        return min(default, max(1, connections // 2))
    value = _at_least(table, "max_streams", default, 1)
    if value >= connections and connections > 1:
        table.problem(
            "max_streams",
            f"max_streams ({value}) must be less than max_connections ({connections}): "
            "watch streams would leave no place for plain requests",
            f"use a number from 1 to {connections - 1}, e.g. max_streams = {connections // 2}",
        )
        return max(1, connections // 2)
    return value


def _share(table: Table, key: str, default: float, whose: str) -> float:
    value = table.number(key, default)
    if not 0 < value < 1:
        table.problem(
            key,
            f"{key} must be more than 0 and less than 1, got {value:g}",
            f"give the fraction of max_connections and max_streams {whose} may hold, "
            f"e.g. {key} = {default:g}, or remove it for the default",
        )
        return default
    return value


def _loopback_host(table: Table) -> str:
    host = table.text("host", DEFAULT_TCP_HOST)
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        table.problem(
            "host",
            f"{quote(host)} is not a loopback address; the broker serves live credentials "
            "and must never listen beyond this machine",
            'use host = "127.0.0.1", "::1" or "localhost"; containers can share the pod '
            "network or mount the Unix socket instead",
        )
    return host if loopback else DEFAULT_TCP_HOST


def _log(table: Table) -> LogConfig:
    table.known("format", "level")
    log_format = cast(
        LogFormat, table.choice("format", ("auto", "json", "console"), "auto", "log format")
    )
    return LogConfig(log_format, table.choice("level", LOG_LEVELS, "info", "log level"))


def _cloud(table: Table, sources: Sources) -> CloudProfile:
    table.known("name", *CUSTOM_HOSTS, "ca_bundle")
    name = table.choice("name", (*CLOUDS, "custom"), "AzureCloud", "cloud")
    if name == "custom":
        authority, manager, region_api = (_https_url(table, key) for key in CUSTOM_HOSTS)
        ca_bundle = table.file_path("ca_bundle", sources.base)
        if ca_bundle is not None:
            table.readable("ca_bundle", ca_bundle)
        return CloudProfile("custom", authority, manager, region_api, ca_bundle)
    if table.data.get("name", name) == name:  # else the bad name was reported already
        for key in (k for k in (*CUSTOM_HOSTS, "ca_bundle") if table.has(k)):
            table.problem(
                key,
                f'{key} is only used with name = "custom"',
                f'remove it to use the hosts of {name}, or set name = "custom" and give '
                "authority_host, resource_manager and region_api",
            )
    return CLOUDS[name]


def _https_url(table: Table, key: str) -> str:
    url = table.required_text(key, _HOST_MEANINGS[key])
    if not url:
        return url
    if key == "region_api" and not _is_region_template(url):
        table.problem(
            key,
            f'region_api must contain "{{region}}" and no other braces, got {quote(url)}',
            f"write {_HOST_MEANINGS[key]}",
        )
    elif not _is_https_url(url.replace("{region}", "eastus")):
        table.problem(
            key,
            f"{key} must be an https:// URL, got {quote(url)}",
            f"write {_HOST_MEANINGS[key]}",
        )
    return url


def _is_region_template(url: str) -> bool:
    try:
        found = [(name, spec, conv) for _, name, spec, conv in Formatter().parse(url)]
    except ValueError:  # unbalanced braces
        return False
    placeholders = [field for field in found if field[0] is not None]
    return bool(placeholders) and all(field == ("region", "", None) for field in placeholders)


def _is_https_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        return parts.scheme == "https" and bool(parts.hostname)
    except ValueError:  # e.g. an unclosed [IPv6 literal
        return False


def _refresh(table: Table) -> RefreshConfig:
    names = [f.name for f in fields(RefreshConfig)]
    table.known(*names)
    defaults = RefreshConfig()
    seconds: dict[str, float] = {}
    for name in names:
        default = getattr(defaults, name)
        if name.endswith("_per_minute"):
            seconds[name] = _rate(table, name, default)
        elif not isinstance(default, int):
            seconds[name] = _seconds(table, name, default)
    fraction, low, high = (
        seconds["lifetime_fraction"],
        seconds["retry_min_s"],
        seconds["retry_max_s"],
    )
    if not 0 < fraction < 1:
        table.problem(
            "lifetime_fraction",
            f"lifetime_fraction must be between 0 and 1, got {fraction:g}",
            "use a fraction such as 0.5, to refresh halfway through a token's life",
        )
    if high < low:
        table.problem(
            "retry_max_s",
            f"retry_max_s ({high:g}) is less than retry_min_s ({low:g})",
            "raise retry_max_s or lower retry_min_s",
        )
    whole = {
        name: _at_least(table, name, getattr(defaults, name), 1)
        for name in ("max_concurrency", "service_calls_burst", "principal_calls_burst")
    }
    # Each name lands on its own field: the float ones in seconds, the whole ones in whole.
    return RefreshConfig(**seconds, **whole)  # type: ignore[arg-type]


def _rate(table: Table, name: str, default: float) -> float:
    return table.positive(name, default, "calls per minute")


def _seconds(table: Table, name: str, default: float) -> float:
    return table.positive(name, default, zero=name in _ZERO_ALLOWED)


def _at_least(table: Table, name: str, default: int, low: int) -> int:
    value = table.typed(name, "an integer")
    if not isinstance(value, int):
        return default
    if value < low:
        table.problem(
            name,
            f"{name} must be {low} or more, got {value}",
            f"use a whole number from {low}, or remove it for the default ({default})",
        )
        return default
    return value


def _cache(table: Table, sources: Sources) -> CacheConfig:
    table.known("enabled", "path", *_CACHE_KEY.keys, hints=_CACHE_HINTS)
    enabled = table.flag("enabled", False)
    path = table.file_path("path", sources.base, CacheConfig().path) or CacheConfig().path
    if not enabled:  # the other keys may wait there, unchecked, until the cache is enabled
        return CacheConfig(False, path)
    _cache_directory(table, path)
    key, source = read_key(table, sources, _CACHE_KEY)
    return CacheConfig(True, path, key, source)


def _cache_directory(table: Table, path: Path) -> None:
    if path.is_dir():
        table.problem(
            "path",
            f"{path} is a directory",
            "give the path of the cache file itself, e.g. /var/lib/token-broker/cache.bin",
        )
    elif not path.parent.is_dir():
        table.problem(
            "path",
            f"the cache's directory {path.parent} does not exist",
            "create it, owned by the broker's user and mode 0700 (systemd: "
            "StateDirectory=token-broker makes /var/lib/token-broker), or change path",
        )
