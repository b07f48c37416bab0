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
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from broker.files import write_atomically
from broker.log import get_logger, register_secret
from broker.models import Clock, system_clock
from broker.saved_credentials import (
    RECORD_KEYS,
    RECORD_KEYS_V1,
    Saved,
    UntrustedRecord,
    finite_number,
    from_record,
    to_record,
)

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
_ENTRY_KEYS = {MAGIC_V1: RECORD_KEYS_V1, MAGIC: RECORD_KEYS}


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
        except UntrustedRecord as exc:
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
            "services": {name: to_record(fp, saved) for name, (fp, saved) in credentials.items()},
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
                raise UntrustedRecord(
                    "a symbolic link; the broker reads only the regular file it writes there"
                ) from None
            raise UntrustedRecord(f"cannot open it: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            mode = stat.S_IMODE(info.st_mode)
            if not stat.S_ISREG(info.st_mode):
                raise UntrustedRecord("not a regular file")
            if mode & 0o077:
                raise UntrustedRecord(
                    f"mode {mode:04o} lets group or other users at it; the broker writes it "
                    "0600, so someone changed it"
                )
            if info.st_size > self._max_file_bytes:
                raise UntrustedRecord(f"{info.st_size} bytes is too large for a token-broker cache")
            return _read_all(fd)
        except OSError as exc:
            raise UntrustedRecord(f"cannot read it: {exc.strerror}") from None
        finally:
            os.close(fd)

    def _decrypt(self, blob: bytes) -> tuple[bytes, bytes]:
        """The header (the format's version) and the decrypted document."""
        header, body = blob[: len(MAGIC)], blob[len(MAGIC) :]
        if not blob:
            raise UntrustedRecord("the file is empty")
        if header not in _ENTRY_KEYS:
            known = header.startswith(_FAMILY) and len(header) == len(MAGIC)
            raise UntrustedRecord(
                "written by another version of token-broker"
                if known
                else "not a token-broker cache"
            )
        if len(body) < _NONCE_BYTES + _TAG_BYTES:
            raise UntrustedRecord("truncated")
        from cryptography.exceptions import InvalidTag

        try:
            return header, self._aead.decrypt(body[:_NONCE_BYTES], body[_NONCE_BYTES:], header)
        except InvalidTag:
            raise UntrustedRecord("written with another key or corrupted") from None

    def _decode(self, plaintext: bytes, entry_keys: frozenset[str]) -> dict[str, tuple[str, Saved]]:
        try:
            document = json.loads(plaintext.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError and JSONDecodeError both
            raise UntrustedRecord("the decrypted content is not JSON") from None
        if not isinstance(document, dict) or not isinstance(document.get("services"), dict):
            raise UntrustedRecord("the decrypted document has no services table")
        finite_number(document.get("written_at"), "written_at")
        services = document["services"].items()
        return {
            name: from_record(f"the entry of service {name!r}", entry, entry_keys)
            for name, entry in services
        }

    def _write(self, blob: bytes) -> None:
        write_atomically(self.path, blob, mode=0o600)  # never wider, not even for an instant


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)
