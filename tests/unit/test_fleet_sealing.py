"""Shared entries: every credential survives sealing, and any tampering makes it unreadable."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.fleet import Sealer, ServiceKeys, UnreadableEntry
from broker.fleet.sealing import MAGIC, stamp_in
from broker.models import AccessToken, AuthKind, fingerprint
from broker.saved_credentials import Saved

pytestmark = pytest.mark.timeout(30)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
IDENTITY = fingerprint("cloud", "tenant", "client", "sub", "rg", "ws", "fraud")
OTHER_IDENTITY = fingerprint("cloud", "tenant", "client", "sub", "rg", "ws", "churn")
KEYS = ServiceKeys.of("token-broker:", IDENTITY)
VALUE = "fleet-token-VALUE-0001"
SAVED = Saved(
    AccessToken(VALUE, AuthKind.TOKEN, 2_000_000.5, 1_999_000.0),
    1_998_000.25,
    "https://eastus.example/score",
)

_times = st.floats(min_value=1.0, max_value=4e9, allow_nan=False, allow_infinity=False)
_values = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=300)


@st.composite
def credentials(draw: st.DrawFn) -> Saved:
    """Any credential the store may hold: a token with its times, or a key."""
    auth = draw(st.sampled_from(list(AuthKind)))
    expires = None if auth is AuthKind.KEY else draw(_times)
    token = AccessToken(
        draw(_values),
        auth,
        expires,
        draw(st.none() | _times),
        draw(st.sampled_from(["Bearer", "bearer"])),
    )
    uri = draw(st.none() | st.just("https://host.example/score"))
    return Saved(token, draw(_times), uri)


def test_keys_share_one_hash_tag() -> None:
    """A service's entry, lease and notices sit under one Redis Cluster hash tag and prefix."""
    tag = "token-broker:{" + IDENTITY[:32] + "}"
    assert (KEYS.credential, KEYS.lease, KEYS.notices) == (
        f"{tag}:credential",
        f"{tag}:lease",
        f"{tag}:notices",
    )


@settings(max_examples=200, deadline=None)
@given(credentials())
def test_round_trip(saved: Saved) -> None:
    """Whatever credential is sealed opens to the same credential, under the same key."""
    sealed = Sealer(KEY).seal(KEYS.credential, IDENTITY, saved)
    assert Sealer(KEY).open(KEYS.credential, IDENTITY, sealed) == saved
    assert stamp_in(sealed) == saved.stamp
    if len(saved.token.value) >= 12:  # shorter ones may occur in ciphertext by chance
        assert saved.token.value.encode() not in sealed


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_altered_byte_is_refused(data: st.DataObject) -> None:
    """Changing any byte of a sealed entry, header included, makes it unreadable."""
    sealed = bytearray(Sealer(KEY).seal(KEYS.credential, IDENTITY, SAVED))
    index = data.draw(st.integers(0, len(sealed) - 1))
    sealed[index] ^= data.draw(st.integers(1, 255))
    with pytest.raises(UnreadableEntry):
        Sealer(KEY).open(KEYS.credential, IDENTITY, bytes(sealed))


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 200))
def test_truncated_entries_are_refused(length: int) -> None:
    """Any prefix of a sealed entry is unreadable."""
    sealed = Sealer(KEY).seal(KEYS.credential, IDENTITY, SAVED)
    with pytest.raises(UnreadableEntry):
        Sealer(KEY).open(KEYS.credential, IDENTITY, sealed[: min(length, len(sealed) - 1)])


def test_an_entry_moved_under_another_key_is_refused() -> None:
    """An entry copied under another service's key does not open there."""
    sealed = Sealer(KEY).seal(KEYS.credential, IDENTITY, SAVED)
    other = ServiceKeys.of("token-broker:", OTHER_IDENTITY)
    with pytest.raises(UnreadableEntry, match="another Redis key"):
        Sealer(KEY).open(other.credential, IDENTITY, sealed)
    with pytest.raises(UnreadableEntry, match="another Redis key"):
        Sealer(KEY).open(ServiceKeys.of("other:", IDENTITY).credential, IDENTITY, sealed)


def test_another_services_record_is_refused() -> None:
    """A record written for another identity is refused even under the right key name."""
    sealed = Sealer(KEY).seal(KEYS.credential, OTHER_IDENTITY, SAVED)
    with pytest.raises(UnreadableEntry, match="another service or principal"):
        Sealer(KEY).open(KEYS.credential, IDENTITY, sealed)


def test_another_encryption_key_is_refused() -> None:
    """An entry written with another fleet key does not open."""
    sealed = Sealer(OTHER_KEY).seal(KEYS.credential, IDENTITY, SAVED)
    with pytest.raises(UnreadableEntry, match="another encryption key"):
        Sealer(KEY).open(KEYS.credential, IDENTITY, sealed)


def test_an_older_key_still_opens_while_the_new_one_writes() -> None:
    """While a key is rolled, entries of the old key open and new ones use the new key."""
    rolling = Sealer(KEY, OTHER_KEY)
    old = Sealer(OTHER_KEY).seal(KEYS.credential, IDENTITY, SAVED)
    assert rolling.open(KEYS.credential, IDENTITY, old) == SAVED
    new = rolling.seal(KEYS.credential, IDENTITY, SAVED)
    assert Sealer(KEY).open(KEYS.credential, IDENTITY, new) == SAVED
    with pytest.raises(UnreadableEntry):
        Sealer(OTHER_KEY).open(KEYS.credential, IDENTITY, new)


def test_the_fleet_key_is_not_the_cache_key() -> None:
    """The same bytes as a cache key and as a fleet key give unrelated AES keys."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    cache_key = HKDF(hashes.SHA256(), 32, None, b"token-broker cache v1").derive(KEY)
    sealed = Sealer(KEY).seal(KEYS.credential, IDENTITY, SAVED)
    header_end = sealed.index(b":", len(MAGIC)) + 1
    nonce, body = sealed[header_end : header_end + 12], sealed[header_end + 12 :]
    from cryptography.exceptions import InvalidTag

    with pytest.raises(InvalidTag):
        AESGCM(cache_key).decrypt(nonce, body, sealed[:header_end] + KEYS.credential.encode())


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"", "not a token-broker fleet entry"),
        (b"TBCACHE2" + bytes(40), "not a token-broker fleet entry"),
        (b"TBFLEET2:123:" + bytes(40), "written by another version"),
        (b"TBFLEET1:123:" + bytes(10), "truncated"),
        (MAGIC + b"1:" + bytes(70_000), "too large"),
    ],
)
def test_foreign_or_future_values_are_refused(value: bytes, reason: str) -> None:
    """Values of another format, another version, or too short or long say so."""
    with pytest.raises(UnreadableEntry, match=reason):
        Sealer(KEY).open(KEYS.credential, IDENTITY, value)


def test_a_restamped_entry_is_refused() -> None:
    """Changing the plaintext stamp (to win or block compare-and-set) breaks the entry."""
    sealed = Sealer(KEY).seal(KEYS.credential, IDENTITY, SAVED)
    stamp = str(SAVED.stamp).encode()
    restamped = sealed.replace(b":" + stamp + b":", b":" + b"9" * len(stamp) + b":", 1)
    assert stamp_in(restamped) != SAVED.stamp
    with pytest.raises(UnreadableEntry):
        Sealer(KEY).open(KEYS.credential, IDENTITY, restamped)


def test_a_short_key_is_refused() -> None:
    """A fleet key shorter than 32 bytes is a programming error, refused at once."""
    with pytest.raises(ValueError, match="at least 32 bytes"):
        Sealer(b"k" * 31)


def test_reasons_never_quote_the_value() -> None:
    """No reason a refusal gives contains the credential."""
    sealer = Sealer(KEY)
    reasons = []
    for key_name in (KEYS.credential, "other"):
        for value in (sealer.seal(KEYS.credential, IDENTITY, SAVED), VALUE.encode()):
            try:
                sealer.open(key_name, IDENTITY, value)
            except UnreadableEntry as exc:
                reasons.append(exc.reason)
    assert reasons and not any(VALUE in reason for reason in reasons)
