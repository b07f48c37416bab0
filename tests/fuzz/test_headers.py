"""Hostile headers on both listeners: random names and values, long ones, too many, odd
Metadata spellings, duplicated guard headers, forwarding headers however spelt, and random
or almost-loopback Host values. The answer is exactly what the
guards define (or aiohttp's own 4xx past its limits), never a 5xx, never a leak."""

from __future__ import annotations

import operator

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.fuzz.harness import (
    LISTENERS,
    MAX_FIELD,
    MAX_HEADERS,
    SERVICES,
    TEST_TIMEOUT_S,
    Target,
    assert_aiohttp_refusal,
    assert_error_shape,
    assert_no_leak,
    assert_not_5xx,
    assert_token_reply,
    request,
)

pytestmark = [pytest.mark.fuzz, pytest.mark.timeout(TEST_TIMEOUT_S)]

Headers = list[tuple[str, str]]
Outcome = tuple[int, str | None]  # status, and the JSON error code unless 200

TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
VALUE_CHARS = st.characters(codec="latin-1", exclude_categories=["Cc"]) | st.just("\t")
FORWARDING = {
    "forwarded",
    "via",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
}
SINGLE = {"metadata", "x-token-broker-key", "x-identity-header"}  # refused when sent twice


def forwarding(name: str) -> bool:
    """Whether the guards take a header for a proxy's: the known names, any X-Forwarded-*,
    with `_` for `-` too."""
    name = name.lower().replace("_", "-")
    return name in FORWARDING or name.startswith("x-forwarded-")


# Framing and connection headers change how the request is read, which is the raw-bytes
# test's business; the guards' own headers are drawn on purpose, from the lists below.
NOT_RANDOM = FORWARDING | {"origin", "metadata", "host", "content-length", "transfer-encoding"}
NOT_RANDOM |= {"connection", "expect", "upgrade", "te", "trailer", "keep-alive", "content-encoding"}
# fmt: off
SPECIAL = [
    "Origin", "ORIGIN", "Forwarded", "X-Forwarded-For", "x-forwarded-host", "X-FORWARDED-PROTO",
    "X-Real-IP", "X-Token-Broker-Key", "Access-Control-Request-Method", "Authorization", "Cookie",
    "X-IDENTITY-HEADER", "Via", "X-Client-IP", "True-Client-IP", "X-Forwarded-Port",
    "X_Forwarded_For", "x_real_ip", "X-Forwarded-Server",
]
METADATA_NAMES = ["Metadata", "metadata", "METADATA", "MetaData", "mEtAdAtA"]
METADATA_VALUES = [
    "true", "True", "TRUE", " true", "true ", "\ttrue\t", "false", "", "1", "yes", "true,true",
    "tru", "true\xa0", "\xa0true", "t rue",
]
LOOPBACK_HOSTS = [
    "localhost", "LOCALHOST", "localhost.", "localhost:8765", " localhost ", "127.0.0.1",
    "127.0.0.1:1", "127.1.2.3", "[::1]", "[::1]:8765", "::1", "ip6-localhost", "localhost:",
]
FOREIGN_HOSTS = [
    "evil.example", "evil.example:80", "10.0.0.1", "0.0.0.0", "[::2]", "localhost.evil",
    "evil.localhost", "127.0.0.1.evil", "127.1", "0x7f.0.0.1", "2130706433", "",
    "[::ffff:10.0.0.1]", "localhost:80:80", "[::1]evil.com", "[::1]:evil", "localhost:abc",
    "127.0.0.1:80x", "[::1]]", "[::1]:80:80", "[::1", "localhost :80",
]
# fmt: on

header_names = st.text(alphabet=TCHAR, min_size=1, max_size=40).filter(
    lambda name: name.lower() not in NOT_RANDOM | SINGLE and not forwarding(name)
)
header_values = st.one_of(
    st.text(alphabet=VALUE_CHARS, max_size=60),
    st.builds(
        operator.mul,
        st.sampled_from(["a", " ", "\xff", "%"]),
        st.integers(MAX_FIELD - 300, MAX_FIELD + 300),
    ),
    st.builds(operator.mul, st.sampled_from(["a", "b"]), st.integers(1000, 20000)),
)
short_values = st.text(alphabet=VALUE_CHARS, max_size=20)
HOSTS = {"loopback": st.sampled_from(LOOPBACK_HOSTS), "foreign": st.sampled_from(FOREIGN_HOSTS)}


@st.composite
def header_sets(draw: st.DrawFn) -> tuple[Headers, str]:
    """Headers in sending order, and whether the one Host among them is `loopback`,
    `foreign` or `random`; Metadata headers come in odd spellings, none, one or several."""
    pairs = draw(st.lists(st.tuples(header_names, header_values), max_size=8))
    if draw(st.integers(0, 9)) == 0:  # now and then, about as many headers as aiohttp takes
        pairs += [(f"X-Many-{i}", "v") for i in range(draw(st.integers(100, 200)))]
    extras = []
    if draw(st.integers(0, 3)) == 0:
        extras += draw(st.lists(st.tuples(st.sampled_from(SPECIAL), short_values), max_size=2))
    metadata = st.tuples(st.sampled_from(METADATA_NAMES), st.sampled_from(METADATA_VALUES))
    extras += draw(st.lists(metadata | st.tuples(st.just("Metadata"), short_values), max_size=3))
    kind = draw(st.sampled_from(["loopback", "foreign", "random"]))
    extras.append(("Host", draw(HOSTS.get(kind, st.text(alphabet=VALUE_CHARS, max_size=30)))))
    for pair in extras:
        pairs.insert(draw(st.integers(0, len(pairs))), pair)
    return pairs, kind


def guard_outcomes(pairs: Headers, host_kind: str, listener: str) -> set[Outcome]:
    """The answers the guards may give, checked in their order: a guard header sent twice,
    forwarded, browser, Host (on TCP; a random Host may or may not be a loopback name),
    Metadata (without the whitespace around it, in any case)."""
    sent = [name.lower() for name, _ in pairs]
    if any(sent.count(name) > 1 for name in SINGLE):
        return {(400, "duplicate_header")}
    names = set(sent)
    if any(forwarding(name) for name in names):
        return {(400, "forwarded_request")}
    if "origin" in names:
        return {(403, "browser_request")}
    outcomes: set[Outcome] = set()
    if listener == "tcp" and host_kind != "loopback":
        outcomes.add((403, "host_not_allowed"))
        if host_kind == "foreign":
            return outcomes
    metadata = [value for name, value in pairs if name.lower() == "metadata"]
    if not metadata or metadata[0].strip(" \t").lower() != "true":
        return outcomes | {(400, "missing_metadata_header")}
    return outcomes | {(200, None)}


# Headers aiohttp's parser allows once: a second one is refused by aiohttp itself, in
# plain text, before the application (and the front door hands such a request to it).
AIOHTTP_ONCE = {
    *("content-location", "content-range", "content-type", "etag", "max-forwards"),
    *("server", "user-agent"),
}


def over_limits(pairs: Headers) -> tuple[bool, bool]:
    """Whether aiohttp must refuse these headers itself, and whether it may: near a limit,
    where its count includes our Connection header and a name's limit shrinks by the
    length of the name before it, or for a header it allows once sent twice. Whitespace
    around a value does not count."""
    count = len(pairs) + 1
    longest = max((len(name) + len(value) for name, value in pairs), default=0)
    sent = [name.lower() for name, _ in pairs]
    twice = any(sent.count(name) > 1 for name in AIOHTTP_ONCE)
    must = twice or count > MAX_HEADERS or any(len(v.strip(" \t")) > MAX_FIELD for _, v in pairs)
    may = must or count > MAX_HEADERS - 5 or longest > MAX_FIELD - 100
    return must, may


LOOPBACK = "loopback"


@pytest.mark.parametrize("listener", LISTENERS)
@given(service=st.sampled_from(sorted(SERVICES)), headers=header_sets())
@example(service="fraud", headers=([("Metadata", "false"), ("Metadata", "true")], LOOPBACK))
@example(service="fraud", headers=([("Metadata", " TRUE "), ("Metadata", "false")], LOOPBACK))
@example(service="fraud", headers=([("Metadata", "true,true")], LOOPBACK))
@example(service="fraud", headers=([("Metadata", "true\xa0")], LOOPBACK))
@example(service="fraud2", headers=([("Host", "evil.localhost"), ("Metadata", "true")], "foreign"))
@example(service="fraud2", headers=([("Host", "[::1]evil"), ("Metadata", "true")], "random"))
@example(service="churn", headers=([("Metadata", "true"), ("X", "a" * (MAX_FIELD + 1))], LOOPBACK))
@example(service="churn", headers=([("Metadata", "true"), ("Origin", "")], LOOPBACK))
@example(service="churn", headers=([("Metadata", "true"), ("x-real-ip", "")], LOOPBACK))
@example(
    service="churn",
    headers=([("Metadata", "true")] + [(f"X-{i}", "v") for i in range(MAX_HEADERS)], LOOPBACK),
)
@example(
    service="churn",
    headers=([("Metadata", "true"), ("USER-AGENT", ""), ("User-Agent", "")], LOOPBACK),
)
def test_headers(broker: Target, listener: str, service: str, headers: tuple[Headers, str]) -> None:
    """Random header names, values, counts, Metadata spellings and Hosts get exactly the
    guards' refusal (or aiohttp's 4xx past its limits), never a 5xx, never a leak."""
    pairs, host_kind = headers
    reply = request(broker, listener, "GET", f"/v1/token/{service}", pairs, metadata=False)
    credentials = broker.credentials()
    assert_not_5xx(reply)
    assert_no_leak(reply, credentials, service)
    must, may = over_limits(pairs)
    if must or (may and not reply.is_json):
        assert not reply.is_json, reply
        assert_aiohttp_refusal(reply)
        return
    outcomes = guard_outcomes(pairs, host_kind, listener)
    code = None if reply.status == 200 else reply.json().get("error")
    assert (reply.status, code) in outcomes, (reply, outcomes)
    if reply.status == 200:
        assert_token_reply(reply, service, credentials)
    else:
        assert_error_shape(reply)
