"""Who may reach the broker: `[api_key.NAME]` tables, and users and groups by name or id.

Only the SHA-256 of an API key is ever written in the configuration; `new_api_key` and
`hash_api_key` are what the CLI offers operators to make one and its digest. User and
group names are resolved once, at load time, so the server compares plain numbers.
"""

from __future__ import annotations

import grp
import hashlib
import pwd
import re
import secrets
from collections.abc import Callable, Mapping
from typing import Literal

from broker.config.model import API_KEY_DIGEST_BYTES, ApiKey
from broker.config.reader import KeyPath, Table, dotted, kind_of, quote

API_KEY_PREFIX = "tbk_"  # makes a leaked key recognisable to secret scanners and to people
MAX_ID = 2**32 - 2  # uid_t and gid_t are 32 bits, and -1 (2**32 - 1) means "unchanged"

Account = Literal["user", "group"]
_LOOKUPS: Mapping[Account, Callable[[str], int]] = {
    "user": lambda name: pwd.getpwnam(name).pw_uid,
    "group": lambda name: grp.getgrnam(name).gr_gid,
}
_EXAMPLES: Mapping[Account, tuple[str, int]] = {
    "user": ('"alice"', 1001),
    "group": ('"ml-apps"', 2000),
}
_API_KEY_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_HASH_IT = "store the digest, never the key: `printf %s KEY | sha256sum`"
_API_KEY_HINTS = {
    name: f"the broker never reads an API key from its configuration file; {_HASH_IT}"
    for name in ("key", "api_key", "value", "secret")
}


def new_api_key() -> str:
    """A new random API key for a client: 256 bits, URL-safe, prefixed with `tbk_`."""
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    """The SHA-256 hex digest of `key`, as `[api_key.NAME] sha256` expects it."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def api_keys(root: Table) -> dict[str, ApiKey]:
    """Every `[api_key.NAME]` table of the file, by name, in file order."""
    section = root.table("api_key")
    found = section.tables("API keys are named tables: write [api_key.NAME] above sha256 = …")
    keys: dict[str, ApiKey] = {}
    first_use: dict[bytes, str] = {}
    for name, table in found:
        if not _api_key_name(name, table):
            continue
        digest = _digest(table)
        if digest in first_use:
            table.problem(
                "sha256",
                f"the same digest as [api_key.{first_use[digest]}]",
                "give each client its own key, so that each can be told apart and revoked",
            )
        elif digest is not None:
            first_use[digest] = name
        # a wrong digest is reported already; the name stays known so services may use it
        keys[name] = ApiKey(name, digest or bytes(API_KEY_DIGEST_BYTES))
    return keys


def _api_key_name(name: str, table: Table) -> bool:
    """Whether the table may be read further: not when its name may be a real key."""
    if name.startswith(API_KEY_PREFIX):
        # placed at [api_key], not at its own path, which would show the name
        table.problems.add(
            table.path[:-1],
            "an [api_key.NAME] table is named with what looks like an API key",
            f"name the client instead, e.g. [api_key.scorer], and {_HASH_IT}",
            line=table.problems.lines.line_of(table.path) if table.problems.lines else None,
        )
        return False
    table.known("sha256", hints=_API_KEY_HINTS)
    if not _API_KEY_NAME.fullmatch(name):
        table.problem(
            None,
            f"API key name {quote(name)} is not allowed",
            "use 1 to 64 letters, digits, '.', '_' or '-'",
        )
    return True


def _digest(table: Table) -> bytes | None:
    """The raw digest written as `sha256`; None, with a problem, when it is not one.

    Nothing here quotes the value: an operator may have pasted the key itself.
    """
    value = table.data.get("sha256")
    if value is None:
        table.problem(
            None,
            'missing required key "sha256" (the SHA-256 of the key clients present)',
            f'add sha256 = "…" under {table.where}; {_HASH_IT}',
        )
    elif not isinstance(value, str):
        table.problem(
            "sha256",
            f"expected a string of 64 hex digits, got {kind_of(value, show=False)}",
            _HASH_IT,
        )
    elif _DIGEST.fullmatch(value):
        return bytes.fromhex(value)
    elif _DIGEST.fullmatch(value.lower()):
        table.problem("sha256", "the digest has capital letters", "write it in lowercase")
    elif value.startswith(API_KEY_PREFIX):
        table.problem("sha256", "this is an API key, not its SHA-256 hex digest", _HASH_IT)
    else:
        table.problem(
            "sha256", "this is not a SHA-256 hex digest (64 characters 0-9 a-f)", _HASH_IT
        )
    return None


def account_id(table: Table, key: str | KeyPath, value: object, kind: Account) -> int | None:
    """The uid or gid `value` (a name or a number) stands for; None, with a problem, if none."""
    label = key if isinstance(key, str) else dotted(key)
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value <= MAX_ID:
            return value
        table.problem(
            key,
            f"{label} must be a {kind} id from 0 to {MAX_ID}, got {value}",
            f"give a {kind} name, or the number `id` shows for it",
        )
        return None
    if not isinstance(value, str) or not value:
        got = "an empty string" if value == "" else kind_of(value)
        table.problem(
            key,
            f"expected a {kind} name or a numeric id, got {got}",
            f"write a name in quotes ({_EXAMPLES[kind][0]}) or an id without quotes "
            f"({_EXAMPLES[kind][1]}) for {label}",
        )
        return None
    try:
        return _LOOKUPS[kind](value)
    except (KeyError, ValueError):  # ValueError: a NUL in the name
        fix = (
            f"write it without quotes ({value}) if it is a numeric id"
            if value.isdigit()
            else f"create the {kind} or use a numeric id"
        )
        table.problem(key, f"no {kind} named {quote(value)} on this machine", fix)
        return None


def owner_or_group(table: Table, key: str) -> int | None:
    """The uid (`owner`) or gid (`group`) a file or socket is given; None keeps the
    broker's own."""
    if not table.has(key):
        return None
    return account_id(table, key, table.data[key], "user" if key == "owner" else "group")


def account_ids(table: Table, key: str, kind: Account) -> tuple[int, ...]:
    """Every uid or gid of the array `key`, in order and without repeats."""
    example = "[{}, {}]".format(*_EXAMPLES[kind])
    found: list[int] = []
    for index, value in enumerate(table.array(key, example)):
        number = account_id(table, (key, index), value, kind)
        if number is not None and number not in found:
            found.append(number)
    return tuple(found)


def service_api_keys(table: Table, defined: Mapping[str, ApiKey]) -> tuple[str, ...]:
    """The `api_keys` of a service: names of `[api_key.NAME]` tables, without repeats."""
    known = ", ".join(defined) or "none is defined"
    found: list[str] = []
    for index, name in enumerate(table.array("api_keys", '["scorer"]')):
        if not isinstance(name, str):
            table.problem(
                ("api_keys", index),
                f"expected the name of an [api_key.NAME] table, got {kind_of(name)}",
                f"write the names in quotes; defined API keys: {known}",
            )
        elif name.startswith(API_KEY_PREFIX):
            table.problem(
                ("api_keys", index),
                "this looks like an API key itself, which must never be written here",
                f"list the NAME of its [api_key.NAME] table; defined API keys: {known}",
            )
        elif name not in defined:
            table.problem(
                ("api_keys", index),
                f"no API key named {quote(name)}",
                f"define [api_key.{name}] or use one of the defined API keys: {known}",
            )
        elif name not in found:
            found.append(name)
    return tuple(found)
