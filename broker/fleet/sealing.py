"""Shared entries sealed for Redis: what a reader of Redis sees is ciphertext and a stamp.

One Redis string per service:

    b"TBFLEET1:" | stamp | b":" | 12-byte nonce | AES-256-GCM(JSON record)

The stamp says how new the credential is (its expiry in milliseconds, or when a key was
obtained), in plain digits, so that Redis's compare-and-set script can keep the newer of
two writes without the key. The associated data binds the header (the format's version
and the stamp) and the Redis key name the entry was written under, so an entry altered,
moved under another key or written with another encryption key fails to open. The record
inside is the persisted cache's (`broker.saved_credentials`), marked with the service's
identity, which is checked too.

The AES key is derived with HKDF-SHA256 from the operator's fleet key, under an info
string of its own: the same bytes used as a cache key give an unrelated AES key.

Facts (what the providers learnt of Azure: workspace discovery, describe results) are
sealed the same way, with no stamp: `b"TBFACT1:" | nonce | AES-256-GCM(JSON object)`, the
associated data binding the header and the key name. They hold no secret, but a broker
sends its ARM token to the MMS a fact names, and proxies clients to its scoring URI: what
it reads must be what a broker of the fleet wrote.
"""

from __future__ import annotations

import json
import os
import re
from typing import TYPE_CHECKING, Any

from broker.saved_credentials import Saved, UntrustedRecord, from_record, to_record

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSION = 1
MAGIC = b"TBFLEET%d:" % VERSION
MIN_KEY_BYTES = 32
MAX_ENTRY_BYTES = 64 * 1024  # far above any credential; a bound on what is opened
_NONCE_BYTES = 12
_TAG_BYTES = 16
_HKDF_INFO = b"token-broker fleet entry v1"
_HEADER = re.compile(rb"TBFLEET(\d{1,4}):(\d{1,20}):")
FACT_MAGIC = b"TBFACT%d:" % VERSION


class UnreadableEntry(Exception):
    """A shared entry cannot be trusted; `reason` says why, never quoting its content."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Sealer:
    """Seals entries with the fleet's key; opens them with it or with older keys given
    (a key being rolled: read with old and new, write with new)."""

    def __init__(self, key: bytes, *older: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # cost only when used

        self._aeads: list[AESGCM] = [AESGCM(_derive(k)) for k in (key, *older)]

    def __repr__(self) -> str:
        return f"Sealer(keys={len(self._aeads)})"

    def seal(self, key_name: str, identity: str, saved: Saved) -> bytes:
        """The Redis value of `saved`, the credential of the service `identity` names,
        to be written under `key_name`."""
        header = MAGIC + b"%d:" % saved.stamp
        plaintext = json.dumps(to_record(identity, saved), separators=(",", ":")).encode()
        nonce = os.urandom(_NONCE_BYTES)
        return header + nonce + self._aeads[0].encrypt(nonce, plaintext, _bound(header, key_name))

    def open(self, key_name: str, identity: str, value: bytes) -> Saved:
        """The credential in `value`, read from `key_name`; `UnreadableEntry` when any of
        it cannot be trusted."""
        header, stamp = _header(value)
        body = value[len(header) :]
        if len(body) < _NONCE_BYTES + _TAG_BYTES:
            raise UnreadableEntry("truncated")
        plaintext = self._decrypt(body, _bound(header, key_name))
        try:
            record = json.loads(plaintext.decode("utf-8"))
            digest, saved = from_record("the shared entry", record)
        except ValueError:  # UnicodeDecodeError and JSONDecodeError both
            raise UnreadableEntry("the decrypted entry is not JSON") from None
        except UntrustedRecord as exc:
            raise UnreadableEntry(exc.reason) from None
        if digest != identity:
            raise UnreadableEntry("it holds the credential of another service or principal")
        if saved.stamp != stamp:
            raise UnreadableEntry("its stamp does not match the credential inside")
        return saved

    def seal_fact(self, key_name: str, fact: dict[str, Any]) -> bytes:
        """The Redis value of `fact`, to be written under `key_name`."""
        plaintext = json.dumps(fact, separators=(",", ":"), sort_keys=True).encode()
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aeads[0].encrypt(nonce, plaintext, _bound(FACT_MAGIC, key_name))
        return FACT_MAGIC + nonce + sealed

    def open_fact(self, key_name: str, value: bytes) -> dict[str, Any]:
        """The fact in `value`, read from `key_name`; `UnreadableEntry` when it cannot be
        trusted."""
        if len(value) > MAX_ENTRY_BYTES:
            raise UnreadableEntry(f"{len(value)} bytes is too large for a fleet fact")
        if not value.startswith(FACT_MAGIC):
            raise UnreadableEntry("not a token-broker fleet fact of this version")
        body = value[len(FACT_MAGIC) :]
        if len(body) < _NONCE_BYTES + _TAG_BYTES:
            raise UnreadableEntry("truncated")
        plaintext = self._decrypt(body, _bound(FACT_MAGIC, key_name))
        try:
            fact = json.loads(plaintext.decode("utf-8"))
        except ValueError:
            raise UnreadableEntry("the decrypted fact is not JSON") from None
        if not isinstance(fact, dict):
            raise UnreadableEntry("the decrypted fact is not a JSON object")
        return fact

    def _decrypt(self, body: bytes, bound: bytes) -> bytes:
        from cryptography.exceptions import InvalidTag

        nonce, sealed = body[:_NONCE_BYTES], body[_NONCE_BYTES:]
        for aead in self._aeads:
            try:
                return aead.decrypt(nonce, sealed, bound)
            except InvalidTag:
                continue
        raise UnreadableEntry(
            "it does not open: written with another encryption key, under another Redis key, "
            "or altered"
        )


def stamp_in(value: bytes) -> int | None:
    """The stamp of a stored value, or None when it is not a fleet entry of this version."""
    try:
        return _header(value)[1]
    except UnreadableEntry:
        return None


def _header(value: bytes) -> tuple[bytes, int]:
    if len(value) > MAX_ENTRY_BYTES:
        raise UnreadableEntry(f"{len(value)} bytes is too large for a fleet entry")
    found = _HEADER.match(value)
    if found is None:
        raise UnreadableEntry("not a token-broker fleet entry")
    if int(found.group(1)) != VERSION:
        raise UnreadableEntry("written by another version of token-broker")
    return found.group(0), int(found.group(2))


def _bound(header: bytes, key_name: str) -> bytes:
    """The associated data: the header, then the key name the entry lives under."""
    return header + key_name.encode("utf-8")


def _derive(key: bytes) -> bytes:
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"the fleet's encryption key must be at least {MIN_KEY_BYTES} bytes")
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(key)
