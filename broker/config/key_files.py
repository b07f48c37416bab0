"""Encryption keys: read from a file of their own or a systemd credential, never from the
configuration file, at least 32 bytes, readable by their owner alone.

The persisted cache's key (`[cache] key_file` / `key_credential`) and the fleet's shared
key (`[fleet] encryption_key_file` / `encryption_key_credential`) are both read here, and
the fleet's keys being rolled (`previous_encryption_key_files` /
`previous_encryption_key_credentials`: arrays of the same), under the same rules.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from broker.config.model import SecretBytes
from broker.config.reader import KeyPath, Sources, Table, quote, systemd_credential

KEY_BYTES = 32


@dataclass(frozen=True, slots=True)
class KeyKeys:
    """How one table names its key, and how messages speak of it."""

    file_key: str  # "key_file"
    credential_key: str  # "key_credential"
    missing: str  # the problem when neither is given
    what: str  # "a cache key", in "a cache key needs at least 32 bytes"
    exposes: str  # what another user who read it could do
    make: str  # how to make one, and what to write

    @property
    def keys(self) -> tuple[str, str]:
        return (self.file_key, self.credential_key)


def read_key(table: Table, sources: Sources, keys: KeyKeys) -> tuple[SecretBytes | None, str]:
    """The key `table` points at, and where it came from ("file /x", "systemd credential
    NAME"); None, with a problem recorded, when it is missing, short or exposed."""
    given = [key for key in keys.keys if table.has(key)]
    if len(given) != 1:
        table.problem(
            given[1] if given else None,
            f"{keys.file_key} and {keys.credential_key} are both set" if given else keys.missing,
            "keep one of them" if given else keys.make,
        )
        return None, ""
    if given[0] == keys.file_key:
        path = table.file_path(keys.file_key, sources.base)
        source = f"file {path}"
    else:
        name = table.required_text(keys.credential_key, "the name given to LoadCredential=")
        path = systemd_credential(
            table,
            keys.credential_key,
            name,
            sources.environ,
            holds="key",
            file_key=keys.file_key,
        )
        source = f"systemd credential {name}"
    return (_key_bytes(table, given[0], path, keys) if path else None), source


def read_key_arrays(
    table: Table, sources: Sources, keys: KeyKeys
) -> tuple[tuple[SecretBytes, ...], tuple[str, ...]]:
    """Every key the arrays `keys.file_key` (paths) and `keys.credential_key` (systemd
    credential names) point at, and where each came from; a key that cannot be used is a
    problem at its element, and left out."""
    found: list[tuple[SecretBytes, str]] = []
    for index, item in enumerate(table.array(keys.file_key, '["/etc/token-broker/old.key"]')):
        element: KeyPath = (keys.file_key, index)
        if _named(table, element, item, "the path of a key file"):
            path = sources.base / str(item)
            key = _key_bytes(table, element, path, keys)
            if key is not None:
                found.append((key, f"file {path}"))
    for index, item in enumerate(table.array(keys.credential_key, '["fleet-key-old"]')):
        element = (keys.credential_key, index)
        if not _named(table, element, item, "the name given to LoadCredential="):
            continue
        given = systemd_credential(
            table,
            keys.credential_key,
            str(item),
            sources.environ,
            holds="key",
            file_key=keys.file_key,
        )
        key = None if given is None else _key_bytes(table, element, given, keys)
        if key is not None:
            found.append((key, f"systemd credential {item}"))
    return tuple(key for key, _ in found), tuple(source for _, source in found)


def _named(table: Table, element: KeyPath, item: object, meaning: str) -> bool:
    """Whether an array's element is a non-empty string (else a problem at it)."""
    if isinstance(item, str) and item:
        return True
    shown = quote(item) if isinstance(item, str) else type(item).__name__
    table.problem(element, f"expected {meaning}, got {shown}", f"write {meaning} as a string")
    return False


def _key_bytes(table: Table, key: str | KeyPath, path: Path, keys: KeyKeys) -> SecretBytes | None:
    """The key file's bytes, if it is long enough and only its owner (or root and the
    broker's own group, see `_kept_for_the_broker`) may read it."""
    try:
        info: os.stat_result | None = path.stat()
    except (OSError, ValueError):
        info = None  # readable() says why the file cannot be used
    content = table.readable(key, path)
    if content is None:
        return None
    if len(content) < KEY_BYTES:
        table.problem(
            key,
            f"{path} holds {len(content)} bytes; {keys.what} needs at least {KEY_BYTES}",
            keys.make,
        )
        return None
    mode = 0 if info is None else stat.S_IMODE(info.st_mode)
    if mode & 0o077 and not (info is not None and _kept_for_the_broker(info)):
        table.problem(
            key,
            f"{path} has mode {mode:04o}: other users could read the key and {keys.exposes}",
            f"chmod 600 {path}, owned by the broker's user (or owned by root with the "
            "broker's group, mode 0440, as a Kubernetes Secret mounted with the pod's fsGroup)",
        )
        return None
    return SecretBytes(content)


def _kept_for_the_broker(info: os.stat_result) -> bool:
    """Whether a key file that its group may read is still the broker's alone: root owns
    it, its group is the broker's own, and the group may only read (mode 0440 or 0640).

    A Kubernetes Secret volume gives exactly that with the pod's fsGroup (its files are
    root's, and only the containers that mount it see it), and so does root:token-broker
    on a host. Not for a broker running as root, whose own group vouches for nobody."""
    return (
        os.geteuid() != 0
        and info.st_uid == 0
        and info.st_gid == os.getegid()
        and not stat.S_IMODE(info.st_mode) & 0o037  # no group write or exec, nothing for others
    )
