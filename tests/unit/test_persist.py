"""The persisted cache: all of a file or none of it, private on disk, silent about values."""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from broker import log
from broker.cache.persist import MAGIC, MAGIC_V1, PersistedCache
from broker.models import AccessToken, AuthKind, fingerprint
from broker.saved_credentials import Saved
from tests.conftest import logged
from tests.unit.fakes import FakeClock

pytestmark = pytest.mark.timeout(5)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
TOKEN_VALUE = "persisted-token-VALUE-0001"
KEY_VALUE = "persisted-key-VALUE-0002"
NOW = 1_000_000.0
FRAUD, CHURN = fingerprint("main", "sub", "rg", "ws", "fraud"), fingerprint("main", "churn")
FINGERPRINTS = {"fraud": FRAUD, "churn": CHURN}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "cache.bin"


@pytest.fixture
def cache(path: Path, clock: FakeClock) -> PersistedCache:
    return PersistedCache(path, KEY, clock=clock)


@pytest.fixture(autouse=True)
def forget_values() -> Iterator[None]:
    """Restored values are registered process-wide; each test starts and ends without them."""
    yield
    log.forget_secret(TOKEN_VALUE)
    log.forget_secret(KEY_VALUE)


def credentials() -> dict[str, tuple[str, Saved]]:
    """A token valid for an hour and a key, as the store would hand them over."""
    token = AccessToken(TOKEN_VALUE, AuthKind.TOKEN, NOW + 3600, NOW + 1800)
    key = AccessToken(KEY_VALUE, AuthKind.KEY, None)
    return {"fraud": (FRAUD, Saved(token, NOW - 60)), "churn": (CHURN, Saved(key, NOW - 5))}


def seal(plaintext: bytes, key: bytes = KEY, header: bytes = MAGIC) -> bytes:
    """A file in the documented format around any plaintext: HKDF key, AES-GCM, header as AAD."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"token-broker cache v1")
    nonce = os.urandom(12)
    return header + nonce + AESGCM(hkdf.derive(key)).encrypt(nonce, plaintext, header)


def overwrite(path: Path, content: bytes) -> None:
    path.write_bytes(content)
    path.chmod(0o600)


def entry(**changes: object) -> dict[str, object]:
    """A well-formed saved entry of the fraud service, with some fields changed."""
    fields: dict[str, object] = {
        "fingerprint": FRAUD,
        "value": TOKEN_VALUE,
        "auth": "token",
        "expires_on": NOW + 3600,
        "refresh_after": None,
        "token_type": "Bearer",
        "obtained_at": NOW,
        "scoring_uri": None,
    }
    fields.update(changes)
    return fields


# -- saving and restoring ------------------------------------------------------------------


def test_round_trip_restores_what_was_saved(cache: PersistedCache, logs: io.StringIO) -> None:
    """A saved token and key come back equal, and the restore is counted in the log."""
    saved = credentials()
    cache.save(saved)

    assert cache.load(FINGERPRINTS) == {name: pair[1] for name, pair in saved.items()}
    (restored,) = logged(logs, "cache.restored")
    assert (restored["restored"], restored["expired"], restored["dropped"]) == (2, 0, 0)


def test_file_is_private_and_no_temporary_file_remains(
    cache: PersistedCache, path: Path, tmp_path: Path
) -> None:
    """The file is mode 0600 whatever the umask, encrypted, and alone in its directory."""
    previous = os.umask(0)
    try:
        cache.save(credentials())
    finally:
        os.umask(previous)

    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["cache.bin"]
    content = path.read_bytes()
    assert content.startswith(MAGIC)
    assert TOKEN_VALUE.encode() not in content and KEY_VALUE.encode() not in content


def test_a_later_save_replaces_the_earlier_one(cache: PersistedCache, clock: FakeClock) -> None:
    """Each save rewrites the whole file, so a dropped service is gone from it."""
    cache.save(credentials())
    cache.save({"churn": credentials()["churn"]})

    assert list(cache.load(FINGERPRINTS)) == ["churn"]


def test_restored_values_are_masked_in_logs(cache: PersistedCache) -> None:
    """Every restored value is registered, so a log line that quoted it would mask it."""
    cache.save(credentials())
    cache.load(FINGERPRINTS)

    assert log.scrub(f"x {TOKEN_VALUE} {KEY_VALUE}") == f"x {log.MASK} {log.MASK}"


def test_expired_tokens_are_dropped_and_keys_kept(
    cache: PersistedCache, clock: FakeClock, logs: io.StringIO
) -> None:
    """After the token's expiry only the key, which has none, is restored."""
    cache.save(credentials())
    clock.now = NOW + 3600

    assert list(cache.load(FINGERPRINTS)) == ["churn"]
    (restored,) = logged(logs, "cache.restored")
    assert (restored["restored"], restored["expired"], restored["dropped"]) == (1, 1, 0)
    assert log.scrub(TOKEN_VALUE) == TOKEN_VALUE  # an expired value is not registered


@pytest.mark.parametrize(
    "fingerprints",
    [
        {"churn": CHURN, "fraud": fingerprint("main", "sub", "rg", "ws", "other-service")},
        {"churn": CHURN},
        {"churn": CHURN, "renamed": FRAUD},
    ],
    ids=["changed-definition", "removed-service", "renamed-service"],
)
def test_services_whose_definition_changed_are_dropped(
    cache: PersistedCache, logs: io.StringIO, fingerprints: dict[str, str]
) -> None:
    """A service restores only under its own name with the same fingerprint."""
    cache.save(credentials())

    assert list(cache.load(fingerprints)) == ["churn"]
    (restored,) = logged(logs, "cache.restored")
    assert (restored["restored"], restored["dropped"]) == (1, 1)


def test_missing_file_is_an_empty_cache_without_warning(
    cache: PersistedCache, logs: io.StringIO
) -> None:
    """No file yet, as on a first start, restores nothing and warns about nothing."""
    assert cache.load(FINGERPRINTS) == {}
    assert logged(logs, "cache.absent")
    assert '"warning"' not in logs.getvalue()


def test_fingerprint_separates_its_parts() -> None:
    """Fingerprints are stable SHA-256 hex digests that do not depend on where parts split."""
    assert fingerprint("ab", "c") != fingerprint("a", "bc")
    assert fingerprint("a", "b") == fingerprint("a", "b")
    assert len(fingerprint("a")) == 64 and int(fingerprint("a"), 16) >= 0


def test_short_key_material_is_refused(path: Path) -> None:
    """Key material under 32 bytes is a programming error: the config loader refuses it first."""
    with pytest.raises(ValueError, match="at least 32 bytes"):
        PersistedCache(path, b"x" * 31)


# -- files that are not trusted ------------------------------------------------------------


def ignored_reason(cache: PersistedCache, logs: io.StringIO) -> str:
    """Load, expect nothing restored, and return the one `cache.ignored` reason logged."""
    assert cache.load(FINGERPRINTS) == {}
    (ignored,) = logged(logs, "cache.ignored")
    assert ignored["level"] == "warning"
    assert ignored["path"] == str(cache.path)
    assert not logged(logs, "cache.restored")
    return str(ignored["reason"])


def test_another_key_is_ignored(path: Path, clock: FakeClock, logs: io.StringIO) -> None:
    """A file written with another key restores nothing and says so."""
    PersistedCache(path, OTHER_KEY, clock=clock).save(credentials())

    reason = ignored_reason(PersistedCache(path, KEY, clock=clock), logs)
    assert reason == "written with another key or corrupted"


def flip(content: bytes, index: int) -> bytes:
    return content[:index] + bytes([content[index] ^ 0x01]) + content[index + 1 :]


DAMAGE = [
    ("empty", lambda c: b"", "the file is empty"),
    ("truncated-header", lambda c: c[:5], "not a token-broker cache"),
    ("truncated-nonce", lambda c: c[:20], "truncated"),
    ("truncated-end", lambda c: c[:-1], "written with another key or corrupted"),
    ("flipped-header", lambda c: flip(c, 0), "not a token-broker cache"),
    ("flipped-nonce", lambda c: flip(c, 10), "written with another key or corrupted"),
    ("flipped-ciphertext", lambda c: flip(c, 40), "written with another key or corrupted"),
    ("flipped-tag", lambda c: flip(c, len(c) - 1), "written with another key or corrupted"),
    ("wrong-magic", lambda c: b"SQLite f" + c[8:], "not a token-broker cache"),
    ("other-version", lambda c: b"TBCACHE9" + c[8:], "written by another version of token-broker"),
    ("garbage", lambda c: random.Random(7).randbytes(500), "not a token-broker cache"),
    ("plain-json", lambda c: b'{"services": {}}', "not a token-broker cache"),
]


@pytest.mark.parametrize(("damage", "reason"), [pytest.param(d[1], d[2], id=d[0]) for d in DAMAGE])
def test_damaged_file_is_ignored(
    cache: PersistedCache, path: Path, logs: io.StringIO, damage: Any, reason: str
) -> None:
    """A truncated, altered, foreign or empty file restores nothing and names the reason."""
    cache.save(credentials())
    overwrite(path, damage(path.read_bytes()))

    assert ignored_reason(cache, logs) == reason


STRUCTURES = [
    ("not-utf8", b"\xff\xfe", "not JSON"),
    ("not-json", b"services: {}", "not JSON"),
    ("a-list", b"[]", "no services table"),
    ("no-services", json.dumps({"written_at": NOW}).encode(), "no services table"),
    ("services-list", json.dumps({"written_at": NOW, "services": []}).encode(), "no services"),
    ("no-written-at", json.dumps({"services": {}}).encode(), "not a finite number"),
]


@pytest.mark.parametrize(
    ("plaintext", "reason"), [pytest.param(s[1], s[2], id=s[0]) for s in STRUCTURES]
)
def test_decrypted_document_of_the_wrong_shape_is_ignored(
    cache: PersistedCache, path: Path, logs: io.StringIO, plaintext: bytes, reason: str
) -> None:
    """A file that decrypts with our key but is not a cache document restores nothing."""
    overwrite(path, seal(plaintext))
    assert reason in ignored_reason(cache, logs)


ENTRIES = [
    ("not-a-table", "token", "expected fields"),
    ("missing-field", {k: v for k, v in entry().items() if k != "obtained_at"}, "expected fields"),
    ("extra-field", entry(note="x"), "expected fields"),
    ("value-not-text", entry(value=5), "wrong type"),
    ("token-type-null", entry(token_type=None), "wrong type"),
    ("unknown-auth", entry(auth="cookie"), "not a valid credential"),
    ("value-with-space", entry(value="two words"), "not a valid credential"),
    ("token-without-expiry", entry(expires_on=None), "not a valid credential"),
    ("expiry-as-text", entry(expires_on="soon"), "not a finite number"),
    ("expiry-as-boolean", entry(expires_on=True), "not a finite number"),
    ("obtained-not-finite", entry(obtained_at=float("nan")), "not a finite number"),
    ("scoring-uri-not-text", entry(scoring_uri=5), "wrong type"),
]


@pytest.mark.parametrize(("bad", "reason"), [pytest.param(e[1], e[2], id=e[0]) for e in ENTRIES])
def test_one_malformed_entry_discards_the_whole_file(
    cache: PersistedCache, path: Path, logs: io.StringIO, bad: object, reason: str
) -> None:
    """A single wrong entry next to a good one restores neither: no part of the file is trusted."""
    document = {"written_at": NOW, "services": {"churn": entry(fingerprint=CHURN), "fraud": bad}}
    overwrite(path, seal(json.dumps(document).encode()))

    found = ignored_reason(cache, logs)
    assert reason in found and "'fraud'" in found
    assert TOKEN_VALUE not in found


def test_sealed_well_formed_document_is_restored(cache: PersistedCache, path: Path) -> None:
    """The documented format, written by other code, is read back: the tests above pin it."""
    document = {"written_at": NOW, "services": {"fraud": entry()}}
    overwrite(path, seal(json.dumps(document).encode()))

    assert cache.load(FINGERPRINTS)["fraud"].token.value == TOKEN_VALUE


def test_scoring_uri_is_saved_with_the_credential(cache: PersistedCache) -> None:
    """A service's scoring URI comes back with its token, so proxy mode needs no describe."""
    token = AccessToken(TOKEN_VALUE, AuthKind.TOKEN, NOW + 3600, NOW + 1800)
    saved = Saved(token, NOW - 60, "https://fraud.example/api/v1/service/fraud/score")
    cache.save({"fraud": (FRAUD, saved)})

    assert cache.load(FINGERPRINTS) == {"fraud": saved}


def test_a_version_1_file_is_still_read_without_scoring_uris(
    cache: PersistedCache, path: Path
) -> None:
    """A cache written before scoring URIs were kept restores its credentials, URIs unknown."""
    v1_entry = {k: v for k, v in entry().items() if k != "scoring_uri"}
    document = {"written_at": NOW, "services": {"fraud": v1_entry}}
    overwrite(path, seal(json.dumps(document).encode(), header=MAGIC_V1))

    restored = cache.load(FINGERPRINTS)["fraud"]
    assert (restored.token.value, restored.scoring_uri) == (TOKEN_VALUE, None)


def test_each_version_has_exactly_its_own_fields(
    cache: PersistedCache, path: Path, logs: io.StringIO
) -> None:
    """A version 1 file with a scoring URI is not trusted: each header pins its fields."""
    document = {"written_at": NOW, "services": {"fraud": entry()}}
    overwrite(path, seal(json.dumps(document).encode(), header=MAGIC_V1))
    assert "expected fields" in ignored_reason(cache, logs)


def test_a_link_to_a_valid_cache_file_is_ignored(
    cache: PersistedCache, path: Path, tmp_path: Path, clock: FakeClock, logs: io.StringIO
) -> None:
    """A symbolic link at the path is not followed, even to a good cache; a save replaces it."""
    elsewhere = tmp_path / "elsewhere.bin"
    PersistedCache(elsewhere, KEY, clock=clock).save(credentials())
    path.symlink_to(elsewhere)
    before = elsewhere.read_bytes()

    assert ignored_reason(cache, logs) == (
        "a symbolic link; the broker reads only the regular file it writes there"
    )
    cache.save({})
    assert not path.is_symlink() and elsewhere.read_bytes() == before


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o666])
def test_file_opened_to_other_users_is_ignored(
    cache: PersistedCache, path: Path, logs: io.StringIO, mode: int
) -> None:
    """A file someone loosened beyond 0600 restores nothing, and the next save makes it 0600."""
    cache.save(credentials())
    path.chmod(mode)

    assert f"mode {mode:04o}" in ignored_reason(cache, logs)
    cache.save(credentials())
    assert path.stat().st_mode & 0o777 == 0o600


def test_directory_at_the_path_is_ignored(
    cache: PersistedCache, path: Path, logs: io.StringIO
) -> None:
    """Something other than a regular file at the path restores nothing."""
    path.mkdir(mode=0o700)
    assert ignored_reason(cache, logs) == "not a regular file"


def test_oversized_file_is_ignored(path: Path, clock: FakeClock, logs: io.StringIO) -> None:
    """A file larger than any cache could be is not read into memory."""
    PersistedCache(path, KEY, clock=clock).save(credentials())
    small = PersistedCache(path, KEY, clock=clock, max_file_bytes=64)
    assert "too large" in ignored_reason(small, logs)


def test_unopenable_path_is_ignored(tmp_path: Path, clock: FakeClock, logs: io.StringIO) -> None:
    """A path the OS refuses to open is ignored with the OS's reason."""
    (tmp_path / "file").write_text("")
    cache = PersistedCache(tmp_path / "file" / "cache.bin", KEY, clock=clock)
    assert ignored_reason(cache, logs) == "cannot open it: Not a directory"


# -- saving never breaks serving -----------------------------------------------------------


def test_save_to_an_unwritable_path_logs_and_returns(
    tmp_path: Path, clock: FakeClock, logs: io.StringIO
) -> None:
    """A save that the OS refuses is a `cache.save_failed` warning, not an exception."""
    (tmp_path / "file").write_text("")
    target = tmp_path / "file" / "cache.bin"

    PersistedCache(target, KEY, clock=clock).save(credentials())

    (failed,) = logged(logs, "cache.save_failed")
    assert failed["level"] == "warning"
    assert (failed["path"], failed["reason"]) == (str(target), "Not a directory")


def test_failed_replace_leaves_no_temporary_file(
    cache: PersistedCache, path: Path, tmp_path: Path, logs: io.StringIO
) -> None:
    """When the final rename fails the temporary file is removed and the failure logged."""
    (path / "occupied").mkdir(parents=True)  # a non-empty directory cannot be replaced

    cache.save(credentials())

    assert logged(logs, "cache.save_failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.bin"]
    assert [p.name for p in path.iterdir()] == ["occupied"]


# -- secrecy -------------------------------------------------------------------------------


def test_values_never_reach_a_log_line(path: Path, clock: FakeClock) -> None:
    """Saving, restoring, ignoring and failing never put a credential value in any log event."""
    stream = io.StringIO()
    log.configure("json", "debug", stream=stream)
    try:
        cache = PersistedCache(path, KEY, clock=clock)
        cache.save(credentials())
        PersistedCache(path, OTHER_KEY, clock=clock).load(FINGERPRINTS)
        cache.load(FINGERPRINTS)
        PersistedCache(path / "no" / "such", KEY, clock=clock).save(credentials())
    finally:
        log.reset()

    text = stream.getvalue()
    assert TOKEN_VALUE not in text and KEY_VALUE not in text
    assert log.MASK not in text  # nothing needed masking: no value was ever in an event
    names = [json.loads(line)["event"] for line in text.splitlines()]
    assert names == ["cache.saved", "cache.ignored", "cache.restored", "cache.save_failed"]


def test_reprs_show_no_value_and_no_key(cache: PersistedCache) -> None:
    """The cache and what it restores print without any credential or key material."""
    cache.save(credentials())
    shown = repr(cache) + repr(cache.load(FINGERPRINTS))
    assert TOKEN_VALUE not in shown and KEY_VALUE not in shown
    assert KEY.hex() not in shown and repr(KEY) not in shown
