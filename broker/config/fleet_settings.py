"""The `[fleet]` table: the Redis that brokers on many hosts share one refresh through.

Off by default; while `enabled` is false the other keys wait unchecked, as the cache's do.
The Redis password is a secret like the client secret (a file, an environment variable or
a systemd credential; inline only in a private file) and never part of `redis_url`; the
encryption key is a key like the cache's (a file or a systemd credential, 32 bytes or
more, readable by its owner alone), the same on every broker of the fleet. Keys being
rolled (`previous_encryption_key_files` / `_credentials`) are read under the same rules:
entries sealed with them are opened, and nothing is sealed with them.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import SplitResult, urlsplit

from broker.config.identity import SecretKeys, read_secret, refuse_exposed_inline
from broker.config.key_files import KeyKeys, read_key, read_key_arrays
from broker.config.model import FleetConfig, Secret
from broker.config.reader import Sources, Table, quote

SCHEMES = ("redis", "rediss", "unix")
PASSWORD_KEYS = ("password_file", "password_env", "password_credential", "password")
_KEY_PREFIX = re.compile(r"[!-~]{1,64}")  # printable ASCII, no space
_DATABASE = re.compile(r"/?|/\d{1,2}")
_EXAMPLE_URL = 'redis_url = "rediss://redis.internal:6380/0"'
_PASSWORD = SecretKeys(
    "password", "Redis password", "password_file, password_env or password_credential"
)
_ENCRYPTION_KEY = KeyKeys(
    "encryption_key_file",
    "encryption_key_credential",
    missing="fleet mode is enabled but has no encryption key "
    "(encryption_key_file or encryption_key_credential)",
    what="a fleet encryption key",
    exposes="decrypt the credentials the fleet shares in Redis",
    make="create one with: head -c 32 /dev/urandom > /etc/token-broker/fleet.key && "
    "chmod 600 /etc/token-broker/fleet.key, give every broker of the fleet the same file, "
    'then set encryption_key_file = "/etc/token-broker/fleet.key"',
)
_PREVIOUS_KEYS = KeyKeys(
    "previous_encryption_key_files",
    "previous_encryption_key_credentials",
    missing="",  # the arrays are optional
    what="a fleet encryption key",
    exposes="decrypt the credentials the fleet shares in Redis",
    make="a previous key is the fleet's key being rolled, as its own file of 32 bytes or "
    "more: point at that file, or remove the element",
)
_HINTS = {
    "encryption_key": "the broker never reads the fleet's encryption key from its "
    "configuration file: put it in a file (encryption_key_file) or a systemd credential "
    "(encryption_key_credential)",
}


def fleet(root: Table, sources: Sources) -> FleetConfig:
    table = root.table("fleet")
    table.known(
        "enabled",
        "redis_url",
        "ca_file",
        "username",
        *PASSWORD_KEYS,
        "key_prefix",
        *_ENCRYPTION_KEY.keys,
        *_PREVIOUS_KEYS.keys,
        "lease_s",
        "connect_timeout_s",
        "command_timeout_s",
        hints=_HINTS,
    )
    if not table.flag("enabled", False):
        return FleetConfig()
    url = _redis_url(table)
    password, password_source = _password(table, sources)
    key, key_source = read_key(table, sources, _ENCRYPTION_KEY)
    previous, previous_sources = read_key_arrays(table, sources, _PREVIOUS_KEYS)
    lease, command = _timeouts(table)
    defaults = FleetConfig()
    return FleetConfig(
        True,
        url,
        _ca_file(table, sources, url),
        _username(table),
        password,
        password_source,
        _key_prefix(table),
        key,
        key_source,
        lease,
        table.positive("connect_timeout_s", defaults.connect_timeout_s),
        command,
        previous,
        previous_sources,
    )


def _redis_url(table: Table) -> str:
    url = table.required_text("redis_url", "where the fleet's Redis is, e.g. redis://host:6379")
    if not url:
        return url
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 — raises ValueError for a port that is not a number
    except ValueError:
        table.problem("redis_url", f"{quote(url)} is not a URL", f"write {_EXAMPLE_URL}")
        return ""
    problem = _url_problem(parts)
    if problem is None:
        return url
    message, fix = problem
    table.problem("redis_url", message, fix)
    return ""


def _url_problem(parts: SplitResult) -> tuple[str, str] | None:
    """What is wrong with a Redis URL, and the fix; never quoting a password it holds."""
    if parts.scheme not in SCHEMES:
        return (
            f"redis_url must start with redis://, rediss:// (TLS) or unix://, "
            f"not {quote(parts.scheme + '://') if parts.scheme else 'without a scheme'}",
            f"write {_EXAMPLE_URL}",
        )
    if parts.password is not None:
        return (
            "redis_url holds a password; the broker reads the Redis password only from "
            "where secrets are kept",
            "remove it from the URL and put it in a file (password_file), an environment "
            "variable (password_env) or a systemd credential (password_credential)",
        )
    if parts.username:
        return (
            "redis_url holds a user name",
            f'remove it from the URL and write username = "{parts.username}" under [fleet]',
        )
    if parts.query or parts.fragment:
        return (
            "redis_url has options after ? or #; the broker takes none from the URL",
            "remove them: TLS, the user, the password and the timeouts are [fleet] keys",
        )
    if parts.scheme == "unix":
        if not parts.path.startswith("/") or parts.netloc:
            return (
                "a unix:// redis_url needs the socket's absolute path, e.g. "
                "unix:///run/redis/redis.sock",
                "write three slashes before the path: unix:///run/redis/redis.sock",
            )
        return None
    if not parts.hostname:
        return ("redis_url has no host", f"write {_EXAMPLE_URL}")
    if not _DATABASE.fullmatch(parts.path):
        return (
            f"the path of redis_url must be a database number such as /0, not {quote(parts.path)}",
            f"write {_EXAMPLE_URL}",
        )
    return None


def _ca_file(table: Table, sources: Sources, url: str) -> Path | None:
    path = table.file_path("ca_file", sources.base)
    if path is None:
        return None
    if url and not url.startswith("rediss://"):
        table.problem(
            "ca_file",
            "ca_file is only used with a rediss:// redis_url (TLS)",
            'write redis_url = "rediss://…" to speak TLS to Redis, or remove ca_file',
        )
        return None
    table.readable("ca_file", path)
    return path


def _username(table: Table) -> str | None:
    name = table.optional_text("username")
    if name is None:
        return None
    if not name or any(c.isspace() for c in name):
        table.problem(
            "username",
            "username must be a Redis ACL user name without spaces",
            'write the user of an ACL SETUSER rule, e.g. username = "token-broker", '
            "or remove it for Redis's default user",
        )
        return None
    return name


def _password(table: Table, sources: Sources) -> tuple[Secret | None, str]:
    if table.has("password"):
        refuse_exposed_inline(table, _PASSWORD, sources)
    given = [key for key in PASSWORD_KEYS if table.has(key)]
    if not given:
        return None, ""
    if len(given) > 1:
        table.problem(given[1], f"{given[0]} and {given[1]} are both set", "keep one of them")
        return None, ""
    return read_secret(table, given[0], sources, _PASSWORD)


def _key_prefix(table: Table) -> str:
    default = FleetConfig().key_prefix
    prefix = table.text("key_prefix", default)
    if not _KEY_PREFIX.fullmatch(prefix) or "{" in prefix or "}" in prefix:
        table.problem(
            "key_prefix",
            "key_prefix must be 1 to 64 printable ASCII characters without spaces or braces "
            "(the broker puts each service's keys in a {hash tag} of its own)",
            f'write e.g. key_prefix = "{default}", or one per deployment sharing the Redis',
        )
        return default
    return prefix


def _timeouts(table: Table) -> tuple[float, float]:
    """`lease_s` and `command_timeout_s`, the second shorter than the first."""
    defaults = FleetConfig()
    lease = table.positive("lease_s", defaults.lease_s)
    command = table.positive("command_timeout_s", defaults.command_timeout_s)
    if command >= lease:
        table.problem(
            "command_timeout_s",
            f"command_timeout_s ({command:g}) must be less than lease_s ({lease:g}): a "
            "lease could lapse while the broker still waits to renew it",
            f"lower command_timeout_s (default {defaults.command_timeout_s:g}) or raise "
            f"lease_s (default {defaults.lease_s:g})",
        )
        return defaults.lease_s, defaults.command_timeout_s
    return lease, command
