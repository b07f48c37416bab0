"""Hostile request targets on both listeners: arbitrary paths, service names, query strings.
None may get a 5xx, or any credential but that of the service the request named."""

from __future__ import annotations

import operator
import re
from urllib.parse import parse_qsl, quote, unquote_to_bytes, urlencode

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.fuzz.harness import (
    LISTENERS,
    MAX_FIELD,
    SERVICES,
    TEST_TIMEOUT_S,
    Reply,
    Target,
    assert_aiohttp_refusal,
    assert_error_shape,
    assert_no_leak,
    assert_not_5xx,
    assert_token_reply,
    exchange,
    request,
)

pytestmark = [pytest.mark.fuzz, pytest.mark.timeout(TEST_TIMEOUT_S)]

NAMES = sorted(SERVICES)

# --- arbitrary paths ------------------------------------------------------------------

# fmt: off
TRAVERSAL = [
    "..", ".", "%2e%2e", "%2E%2E", "%2e%2e%2f", "..%2f", "..%5c", "%2e%2e%5c", "%252e%252e%252f",
    "..%252f", "%c0%ae%c0%ae", "..;", ";", "%00", "%2500", "%2f", "%2F", "%5c", "\\", "~", "%",
    "%zz", "%ff", "%e2%80%ae", "#", "#/v1/token/fraud",
]
SEGMENTS = [
    *NAMES, "v1", "token", "services", "refresh", "healthz", "readyz", "metrics", "fraud%32",
    "fr%61ud", "%66%72%61%75%64", "%66raud2", "FRAUD", "Fraud", "churn%00", "fraud.", "fraud%20",
    "fraud%2F..", "{service}",
]
ODD_TEXT = [
    "\u202efraud",  # right-to-left override
    "frau\u0301d",  # combining acute accent
    "fraud\u200b",  # zero-width space
    "\ufefffraud",  # byte-order mark
    "\uff46\uff52\uff41\uff55\uff44",  # fullwidth "fraud"
    "fr\u0430ud",  # Cyrillic a
    "\U0001f600", "\U0010ffff", "\x00", "\t", "\x7f",
]
PREFIXES = [
    "/v1/token/", "/v1/services/", "/", "/v1/", "//", "///", "/v1//token/", "*", "",
    "//evil.example/", "http://localhost/", "http://localhost/v1/token/",
    "HTTP://127.0.0.1/v1/token/",
]
SUFFIXES = ["", "/", "/refresh", "//", "/refresh/", "#", "#x", "/.", "/.."]
# fmt: on

segments = st.one_of(
    st.sampled_from([*TRAVERSAL, *SEGMENTS, ""]),
    st.sampled_from(ODD_TEXT),
    st.text(max_size=12),
    st.builds(
        operator.mul,
        st.sampled_from(["a", "%", ".", "/", "\u00e9", "\U0001f600", "%2e", "fraud"]),
        st.integers(256, 6000),
    ),
)


@st.composite
def targets(draw: st.DrawFn) -> bytes:
    """A request target: a prefix, segments, a suffix; percent-encoded or sent as raw UTF-8
    (but `?`, space, CR and LF always encoded: query strings and the request line's
    structure have tests of their own)."""
    segs = draw(st.lists(segments, max_size=5))
    text = draw(st.sampled_from(PREFIXES)) + "/".join(segs) + draw(st.sampled_from(SUFFIXES))
    if draw(st.booleans()):
        text = quote(text, safe="/%#:@!$&'()*+,;=~")
    for char in "? \r\n":
        text = text.replace(char, quote(char))
    return text.encode()


def routed_service(method: str, target: bytes) -> str | None:
    """The service a token route would be asked for, reading the path as aiohttp does: it
    ends at `?` or `#`, splits on a literal `/`, and each segment is percent-decoded once."""
    path = re.split(rb"[?#]", target, maxsplit=1)[0]
    pattern = rb"/v1/token/([^/]+)" + (rb"/refresh" if method == "POST" else b"")
    match = re.fullmatch(pattern, path)
    return None if match is None else unquote_to_bytes(match[1]).decode("utf-8", "replace")


def parsed_by_the_app(target: bytes) -> bool:
    """Whether aiohttp hands the request to the application rather than refusing it itself:
    an origin-form target of visible ASCII, well under the longest line."""
    visible = all(0x21 <= b <= 0x7E for b in target)
    return target.startswith(b"/") and visible and len(target) <= MAX_FIELD - 100


def send(target: Target, listener: str, method: str, raw_target: bytes) -> Reply | None:
    line = method.encode() + b" " + raw_target + b" HTTP/1.1\r\n"
    rest = b"Host: localhost\r\nMetadata: true\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    return exchange(target, listener, line + rest)


@pytest.mark.parametrize("listener", LISTENERS)
@given(method=st.sampled_from(["GET", "POST"]), raw_target=targets())
@example(method="GET", raw_target=b"/v1/token/fraud%32")
@example(method="GET", raw_target=b"/v1/token/%2e%2e/services/fraud")
@example(method="GET", raw_target=b"/v1/token/fraud%2F..%2F..%2Ffraud2")
@example(method="GET", raw_target=b"/v1/token/%2566raud")
@example(method="GET", raw_target=b"/v1/token/fraud#/../fraud2")
@example(method="POST", raw_target=b"/v1/token/fr%61ud2/refresh")
@example(method="GET", raw_target=b"//evil.example/v1/token/fraud")
@example(method="GET", raw_target=b"http://localhost/v1/token/fraud")
@example(method="GET", raw_target=b"/v1/token/" + b"a" * (MAX_FIELD // 2))
@example(method="GET", raw_target=b"/v1/token/" + b"a" * (MAX_FIELD + 10))
@example(method="GET", raw_target="/v1/token/\u202efraud".encode())
def test_arbitrary_paths(broker: Target, listener: str, method: str, raw_target: bytes) -> None:
    """Any path gets a non-5xx answer, a JSON error when the app refuses it, and a credential
    only when it is exactly the token route of that credential's service."""
    reply = send(broker, listener, method, raw_target)
    credentials = broker.credentials()
    assert_not_5xx(reply)
    service = routed_service(method, raw_target)
    assert_no_leak(reply, credentials, service)
    if not parsed_by_the_app(raw_target):
        assert_aiohttp_refusal(reply)
    elif service in SERVICES:
        assert reply is not None
        assert_token_reply(reply, service, credentials)
    else:
        assert reply is not None
        if reply.status >= 400:
            assert_error_shape(reply)
        else:
            assert "access_token" not in reply.json(), reply


# --- service names --------------------------------------------------------------------

LOOK_ALIKES = str.maketrans("acurdhn2", "\u0430\u0441\u03c5\u0433\u0501\u04bb\u0578\u01a7")
EXTRAS = [".", " ", "\t", "/", "%", "2", "\u200b", "\u0301", "\x00", "\n", "..", "~", "{"]


def mutations(name: str, i: int, extra: str) -> dict[str, str]:
    """Small changes to a configured name that must not reach it (or, by chance, reach
    another configured name exactly, as `fraud` + `2` does)."""
    return {
        "same": name,
        "upper": name.upper(),
        "title": name.title(),
        "swap": name[:i] + name[i].swapcase() + name[i + 1 :],
        "append": name + extra,
        "prepend": extra + name,
        "insert": name[:i] + extra + name[i:],
        "look-alike": name[:i] + name[i].translate(LOOK_ALIKES) + name[i + 1 :],
        "fullwidth": "".join(chr(ord(c) + 0xFEE0) for c in name),
        "drop": name[:i] + name[i + 1 :],
        "double": name[:i] + name[i] + name[i:],
    }


@st.composite
def mutated(draw: st.DrawFn) -> str:
    """A configured name, perhaps slightly changed: case, trailing dots or spaces, a unicode
    look-alike, a zero-width or combining character, a character dropped or doubled."""
    name = draw(st.sampled_from(NAMES))
    changed = mutations(name, draw(st.integers(0, len(name) - 1)), draw(st.sampled_from(EXTRAS)))
    return changed[draw(st.sampled_from(sorted(changed)))]


def encoded(name: str, extra: list[bool]) -> str:
    """`name` percent-encoded as `quote(safe="")` does, and the characters it leaves alone
    encoded too where `extra` says so (a client may encode any of them)."""
    pieces = [quote(char, safe="") for char in name]
    return "".join(
        f"%{ord(char):02X}" if piece == char and i < len(extra) and extra[i] else piece
        for i, (char, piece) in enumerate(zip(name, pieces, strict=True))
    )


def ask(target: Target, listener: str, route: str, quoted: str) -> Reply:
    """One request naming a service on `route`: token, header, service or refresh."""
    if route == "refresh":
        return request(target, listener, "POST", f"/v1/token/{quoted}/refresh")
    if route == "service":
        return request(target, listener, "GET", f"/v1/services/{quoted}")
    query = "?format=header" if route == "header" else ""
    return request(target, listener, "GET", f"/v1/token/{quoted}{query}")


@pytest.mark.parametrize("listener", LISTENERS)
@given(
    route=st.sampled_from(["token", "header", "service", "refresh"]),
    name=st.one_of(mutated(), st.text(max_size=30), st.sampled_from(NAMES)),
    extra=st.lists(st.booleans(), max_size=8),
)
@example(route="token", name="fraud", extra=[True, False, True])
@example(route="token", name="FRAUD", extra=[])
@example(route="header", name="fraud2", extra=[])
@example(route="header", name="fraud.", extra=[])
@example(route="service", name="churn ", extra=[])
@example(route="refresh", name="fr\u0430ud", extra=[])
@example(route="token", name="\uff46\uff52\uff41\uff55\uff44", extra=[])
def test_service_names(
    broker: Target, listener: str, route: str, name: str, extra: list[bool]
) -> None:
    """A route answers 200 only for an exactly configured name, 404 `unknown_service` for
    any other, and never another service's credential."""
    reply = ask(broker, listener, route, encoded(name, extra))
    credentials = broker.credentials()
    assert_not_5xx(reply)
    if name in SERVICES and route == "service":
        assert reply.status == 200 and reply.json()["service"] == name, reply
        assert_no_leak(reply, credentials, None)
    elif name in SERVICES:
        assert_token_reply(reply, name, credentials, header=route == "header")
    else:
        assert_no_leak(reply, credentials, None)
        assert_error_shape(reply)
        # An empty name leaves `/v1/token/`, no route at all; aiohttp's `{service}`
        # matches no decoded `{` or `}` either.
        no_route = name == "" or "{" in name or "}" in name
        expected = "not_found" if no_route else "unknown_service"
        assert reply.status == 404 and reply.json()["error"] == expected, reply


# --- query strings --------------------------------------------------------------------

# fmt: off
FORMATS = [
    "json", "header", "JSON", "Header", "json ", "", "xml", "text", "jso%6e", "json,header", "0",
    "1", "-1",
]
RAW_PIECES = [
    "", "&", "&&", "=", "==", "format", "format=", "=x", "%", "%zz", "%ff", "+", ";",
    "format=json;x", "format=%6Aso%6E", "format=head%65r", "form%61t=xml", "format=%00",
    "format%00=xml",
]
QUERY_ROUTES = [
    "/v1/token/{}", "/v1/services/{}", "/v1/services", "/healthz", "/readyz",
    "/v1/token/{}/refresh",
]
# fmt: on


@st.composite
def queries(draw: st.DrawFn) -> str:
    """Random keys and values, repeated keys, `format` among them with random values, and
    raw pieces no encoder would produce."""
    text = st.text(max_size=20)
    pairs = draw(st.lists(st.tuples(text, text), max_size=6))
    for value in draw(st.lists(st.sampled_from(FORMATS) | text, max_size=3)):
        pairs.insert(draw(st.integers(0, len(pairs))), ("format", value))
    pieces = [urlencode(pairs)] if pairs else []
    for piece in draw(st.lists(st.sampled_from(RAW_PIECES), max_size=3)):
        pieces.insert(draw(st.integers(0, len(pieces))), piece)
    return "&".join(pieces)


def requested_format(query: str) -> str:
    """The `format` the token route reads: the first value given, `json` when none is."""
    given = [value for key, value in parse_qsl(query, keep_blank_values=True) if key == "format"]
    return given[0] if given else "json"


@pytest.mark.parametrize("listener", LISTENERS)
@given(route=st.sampled_from(QUERY_ROUTES), service=st.sampled_from(NAMES), query=queries())
@example(route="/v1/token/{}", service="fraud", query="format=json&format=xml")
@example(route="/v1/token/{}", service="fraud", query="format=xml&format=json")
@example(route="/v1/token/{}", service="churn", query="format=+header")
@example(route="/v1/token/{}", service="churn", query="format=1")
@example(route="/v1/token/{}", service="fraud2", query="format=head%65r")
def test_query_strings(broker: Target, listener: str, route: str, service: str, query: str) -> None:
    """Only `format=json` or `format=header` (the first one given) succeeds on the token
    route, anything else is a JSON 400; other routes ignore the query; never a 5xx."""
    path = route.format(service)
    method = "POST" if path.endswith("/refresh") else "GET"
    reply = request(broker, listener, method, f"{path}?{query}")
    credentials = broker.credentials()
    assert_not_5xx(reply)
    fmt = requested_format(query)
    if method == "POST":
        assert_token_reply(reply, service, credentials)
    elif route != "/v1/token/{}":
        assert reply.status == 200, reply
        assert_no_leak(reply, credentials, None)
    elif fmt in ("json", "header"):
        assert_token_reply(reply, service, credentials, header=fmt == "header")
    else:
        assert_error_shape(reply)
        assert reply.status == 400 and reply.json()["error"] == "bad_request", reply
