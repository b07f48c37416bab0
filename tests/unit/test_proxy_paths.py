"""The proxy's path mapping and header filtering, without sockets."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from broker.errors import BadRequestError, NoScoringUriError
from broker.server.proxy_routes import (
    forwarded_headers,
    returned_headers,
    split_target,
    upstream_url,
)

pytestmark = pytest.mark.timeout(10)

SCORING = "https://h.example:8443/api/v1/service/x/score"


@pytest.mark.parametrize(
    ("raw_path", "expected"),
    [
        ("/v1/proxy/x", SCORING),
        ("/v1/proxy/x/", SCORING),
        ("/v1/proxy/x/score", SCORING),
        ("/v1/proxy/x/score?a=1&b=%20", SCORING + "?a=1&b=%20"),
        ("/v1/proxy/x/swagger.json", "https://h.example:8443/api/v1/service/x/swagger.json"),
        ("/v1/proxy/x/a/b%20c/", "https://h.example:8443/api/v1/service/x/a/b%20c/"),
        (
            "/v1/proxy/x/user@evil.example",
            "https://h.example:8443/api/v1/service/x/user@evil.example",
        ),
    ],
)
def test_paths_map_into_the_scoring_directory(raw_path: str, expected: str) -> None:
    """`{path}` is resolved in the scoring URI's directory, on its host, query passed on."""
    tail, query = split_target(raw_path)
    url = upstream_url("x", SCORING, tail, query)
    assert str(url) == expected
    assert url.host == "h.example" and url.port == 8443 and url.scheme == "https"


def test_the_scoring_uris_own_query_is_kept() -> None:
    """A scoring URI with a query keeps it, and the client's is added after it."""
    url = upstream_url("x", "http://h/score?api-version=1", "", "a=2")
    assert str(url) == "http://h/score?api-version=1&a=2"


@pytest.mark.parametrize(
    "raw_path",
    [
        "/v1/proxy/x/..",
        "/v1/proxy/x/.",
        "/v1/proxy/x/a/../../b",
        "/v1/proxy/x/%2e%2e/b",
        "/v1/proxy/x/.%2E/b",
        "/v1/proxy/x/%252e%252e/b",
        "/v1/proxy/x/..;jsessionid=1/b",
        "/v1/proxy/x/a%2Fb",
        "/v1/proxy/x/a%252fb",
        "/v1/proxy/x/a%5Cb",
        "/v1/proxy/x/a\\b",
        "/v1/proxy/x/a%00",
        "/v1/proxy/x//h2/b",
        "/v1/proxy/x/a//b",
        "/v1/proxy/x/a%zz",
        "/v1/proxy/x/a b",
        "/v1/proxy/x/a?b#c",
    ],
)
def test_escaping_paths_are_refused(raw_path: str) -> None:
    """Dot segments however encoded, encoded separators, empty segments, bad bytes: 400."""
    with pytest.raises(BadRequestError):
        split_target(raw_path)


@pytest.mark.parametrize("uri", [None, "", "ftp://h/score", "https:///score", "score"])
def test_no_usable_scoring_uri(uri: str | None) -> None:
    """A missing or non-HTTP scoring URI is 409, naming the service."""
    with pytest.raises(NoScoringUriError, match="'x'"):
        upstream_url("x", uri, "", "")


def test_header_filters() -> None:
    """Hop-by-hop headers, those Connection names, the client's credential and the broker's
    own headers are dropped; repeated end-to-end headers are kept."""
    sent = CIMultiDictProxy(
        CIMultiDict(
            [
                ("Host", "localhost"),
                ("Connection", "keep-alive, X-Hop"),
                ("X-Hop", "1"),
                ("Keep-Alive", "timeout=5"),
                ("TE", "trailers"),
                ("Trailer", "X-T"),
                ("Transfer-Encoding", "chunked"),
                ("Upgrade", "h2c"),
                ("Proxy-Authorization", "Basic x"),
                ("Authorization", "Bearer client"),
                ("Metadata", "true"),
                ("X-Token-Broker-Key", "k"),
                ("Content-Length", "3"),
                ("Expect", "100-continue"),
                ("Accept", "a"),
                ("Accept", "b"),
                ("Content-Type", "application/json"),
            ]
        )
    )
    kept = forwarded_headers(sent)
    assert list(kept.items()) == [
        ("Accept", "a"),
        ("Accept", "b"),
        ("Content-Type", "application/json"),
    ]
    answered = CIMultiDictProxy(
        CIMultiDict(
            [
                ("Connection", "X-Up"),
                ("X-Up", "1"),
                ("Proxy-Authenticate", "Basic"),
                ("Set-Cookie", "a=1"),
                ("Set-Cookie", "b=2"),
                ("Content-Length", "10"),
            ]
        )
    )
    assert returned_headers(answered) == [
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("Content-Length", "10"),
    ]
