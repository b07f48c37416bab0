"""The persisted cache: credentials still valid survive a restart, encrypted at rest.

One file, rewritten whole after every change:

    b"TBCACHE2" | 12-byte nonce | AES-256-GCM(JSON document, associated data = the header)

Version 2 keeps each service's scoring URI with its credential, so that proxy mode works
at once after a restart; files of version 1 (without it) are still read, their services
restored without a scoring URI until the next refresh describes them again. A broker of
version 1 ignores a version 2 file ("written by another version") and starts empty.

Only a regular file is read: the path is opened without following a symbolic link.

The AES key is derived with HKDF-SHA256 from the operator's key file, so any 32 bytes or
more of it will do. Reading trusts all of the file or none of it: anything that does not
decrypt, parse and validate completely is ignored with a warning, and the broker starts
empty, as it would without the cache. Writing never raises: serving must not depend on
the disk.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.files import write_atomically
from broker.log import get_logger, register_secret
from broker.models import AccessToken, AuthKind, Clock, system_clock

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

log = get_logger("broker.cache.persist")

MAGIC = b"TBCACHE2"
MAGIC_V1 = b"TBCACHE1"  # still read: entries without a scoring URI
MIN_KEY_BYTES = 32
_FAMILY = MAGIC[:-1]  # b"TBCACHE": the same format family, any version
_NONCE_BYTES = 12
_TAG_BYTES = 16
_HKDF_INFO = b"token-broker cache v1"  # the key, not the format: every version shares it
MAX_FILE_BYTES = 16 * 1024 * 1024  # far above any real cache; a bound on what is read
_TEXT_KEYS = ("fingerprint", "value", "auth", "token_type")
_ENTRY_KEYS_V1 = frozenset(
    {"fingerprint", "value", "auth", "expires_on", "refresh_after", "token_type", "obtained_at"}
)
_ENTRY_KEYS = {MAGIC_V1: _ENTRY_KEYS_V1, MAGIC: _ENTRY_KEYS_V1 | {"scoring_uri"}}


@dataclass(frozen=True, slots=True)
class Saved:
    """A credential as the store holds it: the token, when it was obtained, and where the
    service is called (its scoring URI, when Azure described one)."""

    token: AccessToken
    obtained_at: float
    scoring_uri: str | None = None


class _Ignored(Exception):
    """The file cannot be trusted; `reason` says why, and never quotes its content."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PersistedCache:
    """Saves and restores the store's credentials in one encrypted file at `path`."""

    def __init__(
        self,
        path: Path,
        key_material: bytes,
        *,
        clock: Clock = system_clock,
        max_file_bytes: int = MAX_FILE_BYTES,
    ) -> None:
        if len(key_material) < MIN_KEY_BYTES:
            raise ValueError(f"the cache key must be at least {MIN_KEY_BYTES} bytes")
        # Imported here: cryptography costs about 8 MiB of RSS, and only this cache uses it.
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO)
        self._aead: AESGCM = AESGCM(hkdf.derive(key_material))
        self.path = path
        self._clock = clock
        self._max_file_bytes = max_file_bytes

    def __repr__(self) -> str:
        return f"PersistedCache(path={str(self.path)!r})"

    def load(self, fingerprints: Mapping[str, str]) -> dict[str, Saved]:
        """The saved credentials of services whose fingerprint matches and that are valid now.

        A missing file gives `{}` quietly; an untrustworthy one gives `{}` and a warning.
        """
        try:
            header, plaintext = self._decrypt(self._read())
            services = self._decode(plaintext, _ENTRY_KEYS[header])
        except FileNotFoundError:
            log.debug("cache.absent", path=str(self.path))
            return {}
        except _Ignored as exc:
            log.warning("cache.ignored", path=str(self.path), reason=exc.reason)
            return {}
        now = self._clock()
        restored: dict[str, Saved] = {}
        expired = dropped = 0
        for name, (written, saved) in services.items():
            if fingerprints.get(name) != written:
                dropped += 1  # gone from the configuration, or now another service
            elif saved.token.expires_on is not None and saved.token.expires_on <= now:
                expired += 1
            else:
                register_secret(saved.token.value)
                restored[name] = saved
        log.info(
            "cache.restored",
            path=str(self.path),
            restored=len(restored),
            expired=expired,
            dropped=dropped,
        )
        return restored

    def save(self, credentials: Mapping[str, tuple[str, Saved]]) -> None:
        """Replace the file with `credentials` (service -> (fingerprint, saved)); never raises."""
        document = {
            "written_at": self._clock(),
            "services": {name: _entry(fp, saved) for name, (fp, saved) in credentials.items()},
        }
        plaintext = json.dumps(document, separators=(",", ":")).encode("utf-8")
        nonce = os.urandom(_NONCE_BYTES)
        blob = MAGIC + nonce + self._aead.encrypt(nonce, plaintext, MAGIC)
        try:
            self._write(blob)
        except OSError as exc:
            log.warning(
                "cache.save_failed",
                path=str(self.path),
                reason=exc.strerror or type(exc).__name__,
            )
            return
        log.debug("cache.saved", path=str(self.path), services=len(credentials))

    def _read(self) -> bytes:
        try:
            # O_NONBLOCK: a FIFO planted at the path must not hang the start; O_NOFOLLOW:
            # a link to another cache file (even a valid one) is not this cache
            flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW
            fd = os.open(self.path, flags)
        except FileNotFoundError:
            raise
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _Ignored(
                    "a symbolic link; the broker reads only the regular file it writes there"
                ) from None
            raise _Ignored(f"cannot open it: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            mode = stat.S_IMODE(info.st_mode)
            if not stat.S_ISREG(info.st_mode):
                raise _Ignored("not a regular file")
            if mode & 0o077:
                raise _Ignored(
                    f"mode {mode:04o} lets group or other users at it; the broker writes it "
                    "0600, so someone changed it"
                )
            if info.st_size > self._max_file_bytes:
                raise _Ignored(f"{info.st_size} bytes is too large for a token-broker cache")
            return _read_all(fd)
        except OSError as exc:
            raise _Ignored(f"cannot read it: {exc.strerror}") from None
        finally:
            os.close(fd)

    def _decrypt(self, blob: bytes) -> tuple[bytes, bytes]:
        """The header (the format's version) and the decrypted document."""
        header, body = blob[: len(MAGIC)], blob[len(MAGIC) :]
        if not blob:
            raise _Ignored("the file is empty")
        if header not in _ENTRY_KEYS:
            known = header.startswith(_FAMILY) and len(header) == len(MAGIC)
            raise _Ignored(
                "written by another version of token-broker"
                if known
                else "not a token-broker cache"
            )
        if len(body) < _NONCE_BYTES + _TAG_BYTES:
            raise _Ignored("truncated")
        from cryptography.exceptions import InvalidTag

        try:
            return header, self._aead.decrypt(body[:_NONCE_BYTES], body[_NONCE_BYTES:], header)
        except InvalidTag:
            raise _Ignored("written with another key or corrupted") from None

    def _decode(self, plaintext: bytes, entry_keys: frozenset[str]) -> dict[str, tuple[str, Saved]]:
        try:
            document = json.loads(plaintext.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError and JSONDecodeError both
            raise _Ignored("the decrypted content is not JSON") from None
        if not isinstance(document, dict) or not isinstance(document.get("services"), dict):
            raise _Ignored("the decrypted document has no services table")
        _number(document.get("written_at"), "written_at")
        services = document["services"].items()
        return {name: _saved(name, entry, entry_keys) for name, entry in services}

    def _write(self, blob: bytes) -> None:
        write_atomically(self.path, blob, mode=0o600)  # never wider, not even for an instant


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _entry(digest: str, saved: Saved) -> dict[str, Any]:
    token = saved.token
    return {
        "fingerprint": digest,
        "value": token.value,
        "auth": token.auth.value,
        "expires_on": token.expires_on,
        "refresh_after": token.refresh_after,
        "token_type": token.token_type,
        "obtained_at": saved.obtained_at,
        "scoring_uri": saved.scoring_uri,
    }


def _saved(name: str, entry: object, entry_keys: frozenset[str]) -> tuple[str, Saved]:
    """One service's entry, or `_Ignored` naming what is wrong with it (never its value)."""
    where = f"the entry of service {name!r}"
    if not isinstance(entry, dict) or set(entry) != entry_keys:
        raise _Ignored(f"{where} does not have the expected fields")
    scoring_uri = entry.get("scoring_uri")
    if not all(isinstance(entry[key], str) for key in _TEXT_KEYS) or not isinstance(
        scoring_uri, str | None
    ):
        raise _Ignored(f"{where} has a field of the wrong type")
    try:
        token = AccessToken(
            entry["value"],
            AuthKind(entry["auth"]),
            _optional_number(entry["expires_on"], where),
            _optional_number(entry["refresh_after"], where),
            entry["token_type"],
        )
    except ValueError:  # an unknown auth kind, or a value AccessToken refuses
        raise _Ignored(f"{where} is not a valid credential") from None
    obtained_at = _number(entry["obtained_at"], where)
    return entry["fingerprint"], Saved(token, obtained_at, scoring_uri)


def _optional_number(value: object, where: str) -> float | None:
    return None if value is None else _number(value, where)


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _Ignored(f"{where} holds a time that is not a finite number")
    return float(value)
