"""Where the front door finds the end of an answered request, with no offsets from llhttp:
by feeding a fresh parser the same bytes again (broker.server.front_door.end_of)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.server.front_door import end_of

pytestmark = pytest.mark.timeout(60)

REQUESTS = [
    b"GET /v1/token/fraud HTTP/1.1\r\nHost: localhost\r\nMetadata: true\r\n\r\n",
    b"HEAD /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET /readyz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"POST /v1/token/x/refresh HTTP/1.1\r\nHost: a\r\nContent-Length: 7\r\n\r\nGET / H",
    b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"\r\n\r\nGET /x HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: a\r\n\r\n",
]


@settings(deadline=None)  # a shared machine's pauses are not the parser's
@given(
    requests=st.lists(st.sampled_from(REQUESTS), min_size=1, max_size=8),
    cut=st.integers(0, 200),
    tail=st.binary(max_size=40),
    data=st.data(),
)
def test_the_end_of_each_request_is_found_to_the_byte(
    requests: list[bytes], cut: int, tail: bytes, data: st.DataObject
) -> None:
    """Whatever requests follow each other, however much of the first came in an earlier
    read, and whatever bytes follow the last, the k-th request completed in the read ends
    exactly where its bytes end."""
    cut = min(cut, len(requests[0]) - 1)
    prefix, read = requests[0][:cut], b"".join(requests)[cut:] + tail
    k = data.draw(st.integers(1, len(requests)), label="k")
    assert end_of(prefix, read, k) == sum(len(r) for r in requests[:k]) - cut


def test_a_request_not_completed_in_the_read_ends_with_it() -> None:
    """Asked for more requests than the read completes, the answer is the whole read."""
    read = REQUESTS[0] + REQUESTS[1][:10]
    assert end_of(b"", read, 2) == len(read)
