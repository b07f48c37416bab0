"""Proxy mode: `ANY /v1/proxy/{service}/{path}` forwards to the emulator's HTTPS scoring
endpoints with the service's credential, streaming, bounded and guarded like the token routes."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy
from yarl import URL

from broker.config import hash_api_key
from broker.emulator import Emulator
from broker.emulator import seed as demo
from tests.conftest import OffsetClock, config_text
from tests.e2e.conftest import LISTENERS, Broker, StartBroker

pytestmark = pytest.mark.timeout(30)

MiB = 1 << 20
API_KEY = "proxy-test-api-key-0123456789"
ENDPOINTS = {"v2-token": demo.ENDPOINT_TOKEN, "v2-key": demo.ENDPOINT_KEY}
ENTRA = '\n[[service]]\nname = "aml"\nkind = "entra"\nscope = "https://ml.azure.com/.default"\n'


def proxy_config(
    emulator: Emulator, short_dir: Path, *, proxy: str = "", refresh: str = "", service: str = ""
) -> str:
    """fraud (v1 token), churn (v1 key), two v2 endpoints, an Entra scope, and `[proxy]`."""
    text = config_text(emulator, short_dir, refresh=refresh, extra_service_keys=service)
    for name, endpoint in ENDPOINTS.items():
        text += (
            f'\n[[service]]\nname = "{name}"\nkind = "azureml-online-endpoint"\n'
            f'subscription_id = "{demo.SUBSCRIPTION_ID}"\n'
            f'resource_group = "{demo.RESOURCE_GROUP}"\n'
            f'workspace = "{demo.WORKSPACE}"\nendpoint = "{endpoint}"\n'
        )
    return text + ENTRA + f"\n[proxy]\n{proxy}\n"


@dataclass
class Answer:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Caller:
    """Sends any request to a broker over one listener; paths are sent exactly as written."""

    def __init__(self, broker: Broker, listener: str) -> None:
        daemon = broker.daemon
        if listener == "unix":
            assert daemon.unix_path is not None
            connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=str(daemon.unix_path))
            self.base = "http://localhost"
        else:
            assert daemon.tcp_address is not None
            host, port = daemon.tcp_address
            connector = aiohttp.TCPConnector()
            self.base = f"http://{host}:{port}"
        self.session = aiohttp.ClientSession(connector=connector)

    async def call(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        data: Any = None,
        metadata: bool = True,
    ) -> Answer:
        sent = {"Metadata": "true"} if metadata else {}
        sent.update(headers or {})
        url = URL(self.base + path, encoded=True)
        async with self.session.request(method, url, headers=sent, data=data) as resp:
            return Answer(resp.status, resp.headers, await resp.read())


@pytest.fixture
async def callers() -> AsyncIterator[list[Caller]]:
    made: list[Caller] = []
    yield made
    for caller in made:
        await caller.session.close()


@pytest.fixture
def caller(callers: list[Caller]) -> Any:
    def make(broker: Broker, listener: str = "unix") -> Caller:
        made = Caller(broker, listener)
        callers.append(made)
        return made

    return make


async def chunks(data: bytes, size: int = 256 << 10) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def score_calls(emulator: Emulator, service: str = demo.TOKEN_SERVICE) -> int:
    return emulator.state.count("score", service=service)


def token_calls(emulator: Emulator, service: str = demo.TOKEN_SERVICE) -> int:
    return emulator.state.count("mms.token", service=service)


@pytest.mark.parametrize("listener", LISTENERS)
async def test_scoring_needs_no_client_credential(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, caller: Any, listener: str
) -> None:
    """v1 token and key services and v2 endpoints score through the proxy with no credential."""
    broker = await start_broker(proxy_config(emulator, short_dir))
    client = caller(broker, listener)
    expected = {"fraud": "token", "churn": "key", "v2-token": "token", "v2-key": "key"}
    for service, auth in expected.items():
        answer = await client.call("POST", f"/v1/proxy/{service}", data=b'{"data": [1]}')
        assert answer.status == 200, (service, answer.body)
        assert answer.json() == {"accepted": True, "auth": auth}
    for service, path in (("fraud", "score"), ("v2-key", "score")):
        answer = await client.call("POST", f"/v1/proxy/{service}/{path}", data=b"{}")
        assert answer.status == 200 and answer.json()["accepted"] is True


async def test_client_credential_and_broker_headers_are_not_forwarded(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, caller: Any
) -> None:
    """The client's Authorization is replaced by the broker's credential; Metadata, the API
    key and Host are not passed on; other headers are."""
    broker = await start_broker(proxy_config(emulator, short_dir))
    answer = await caller(broker).call(
        "POST",
        "/v1/proxy/fraud?report=true",
        headers={"Authorization": "Bearer not-a-valid-token", "X-Client-Tag": "kept"},
        data=b"{}",
    )
    assert answer.status == 200, answer.body
    body = answer.json()
    assert body["auth"] == "token"  # the emulator refuses the client's bearer
    assert "x-client-tag" in body["headers"] and "authorization" in body["headers"]
    assert not {"metadata", "x-token-broker-key"} & set(body["headers"])


async def test_hop_by_hop_headers_are_dropped_both_ways(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, caller: Any
) -> None:
    """Connection, Keep-Alive, TE, Proxy-* and what Connection names stay on their hop."""
    broker = await start_broker(proxy_config(emulator, short_dir))
    answer = await caller(broker, "tcp").call(
        "POST",
        "/v1/proxy/churn?report=true&hop=true",
        headers={
            "Connection": "keep-alive, X-Client-Hop",
            "X-Client-Hop": "this hop only",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic dXNlcjpwYXNz",
            "X-Client-Kept": "end to end",
        },
        data=b"{}",
    )
    assert answer.status == 200, answer.body
    received = set(answer.json()["headers"])
    assert "x-client-kept" in received
    assert not {"x-client-hop", "keep-alive", "te", "proxy-authorization"} & received
    assert answer.headers["X-Emulator-Kept"] == "passed on by a proxy"
    assert "X-Emulator-Hop" not in answer.headers and "Keep-Alive" not in answer.headers
    assert "X-Emulator-Hop" not in answer.headers.get("Connection", "")


async def test_proxied_calls_carry_the_refreshed_token(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, caller: Any
) -> None:
    """After a refresh the proxy sends the new token, which Azure alone accepts once the
    first has expired."""
    azure = OffsetClock()
    emulator.state.clock = azure
    broker = await start_broker(proxy_config(emulator, short_dir))
    client = caller(broker)
    assert (await client.call("POST", "/v1/proxy/fraud", data=b"{}")).status == 200
    first = broker.daemon.store.entry("fraud").token
    azure.advance(30)  # the next token is issued 30 s later on Azure's clock
    await asyncio.wait([broker.daemon.store.fetch("fraud")])  # as the refresher does
    second = broker.daemon.store.entry("fraud").token
    assert first is not None and second is not None and second.value != first.value
    azure.advance(31)  # 61 s on: the first 60 s token is expired, the second is not
    answer = await client.call("POST", "/v1/proxy/fraud", data=b"{}")
    assert answer.status == 200, answer.body
    assert token_calls(emulator) == 2 and score_calls(emulator) == 2


async def test_a_401_is_recovered_by_exactly_one_refresh(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, caller: Any
) -> None:
    """A 401 on a short body leads to one refresh and one retry, which succeeds."""
    broker = await start_broker(proxy_config(emulator, short_dir))
    await broker.settled()
    broker.clock.advance(11)  # past client_refresh_window_s since the first fetch
    emulator.state.fail("score", status=401, times=1, service=demo.TOKEN_SERVICE)
    answer = await caller(broker).call("POST", "/v1/proxy/fraud", data=b'{"data": [1]}')
    assert answer.status == 200, answer.body
    assert answer.json() == {"accepted": True, "auth": "token"}
    assert token_calls(emulator) == 2 and score_calls(emulator) == 2


async def test_a_401_inside_the_refresh_window_is_passed_through(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, caller: Any
) -> None:
    """With no newer credential to be had, the service's 401 reaches the client as it came."""
    broker = await start_broker(proxy_config(emulator, short_dir))
    await broker.settled()
    emulator.state.fail("score", status=401, times=1, service=demo.TOKEN_SERVICE)
    answer = await caller(broker).call("POST", "/v1/proxy/fraud", data=b"{}")
    assert answer.status == 401 and answer.json() == {"error": "unauthorized"}
    assert token_calls(emulator) == 1 and score_calls(emulator) == 1


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_large_body_streams_through_intact(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, caller: Any, framing: str
) -> None:
    """Several MiB arrive whole (size and SHA-256), and come back whole when echoed."""
    broker = await start_broker(proxy_config(emulator, short_dir))
    client = caller(broker)
    payload = os.urandom(6 * MiB)

    def body() -> Any:
        return io.BytesIO(payload) if framing == "content-length" else chunks(payload)

    answer = await client.call("POST", "/v1/proxy/v2-token/score?report=true", data=body())
    assert answer.status == 200, answer.body[:200]
    report = answer.json()
    assert report["bytes"] == len(payload)
    assert report["sha256"] == hashlib.sha256(payload).hexdigest()
    framed_as = "content-length" if framing == "content-length" else "transfer-encoding"
    assert framed_as in report["headers"]  # the client's framing is kept
    echoed = await client.call("POST", "/v1/proxy/v2-token/score?echo=true", data=body())
    assert echoed.status == 200 and echoed.body == payload


async def test_a_401_on_a_streamed_body_is_not_retried(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, caller: Any
) -> None:
    """A body too long to keep cannot be sent twice: its 401 is passed through, no refresh."""
    broker = await start_broker(proxy_config(emulator, short_dir))
    await broker.settled()
    broker.clock.advance(11)  # a refresh would be allowed, so only the body size stops it
    emulator.state.fail("score", status=401, times=1, service=demo.TOKEN_SERVICE)
    answer = await caller(broker).call(
        "POST", "/v1/proxy/fraud", data=io.BytesIO(os.urandom(3 * MiB))
    )
    assert answer.status == 401 and answer.json() == {"error": "unauthorized"}
    assert token_calls(emulator) == 1 and score_calls(emulator) == 1


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_body_over_the_limit_is_413(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, caller: Any, framing: str
) -> None:
    """A body longer than max_body_bytes is refused with the JSON error, however framed."""
    broker = await start_broker(proxy_config(emulator, short_dir, proxy="max_body_bytes = 1048576"))
    payload = os.urandom(2 * MiB)
    data = io.BytesIO(payload) if framing == "content-length" else chunks(payload)
    answer = await caller(broker).call("POST", "/v1/proxy/fraud", data=data)
    assert answer.status == 413, answer.body[:200]
    assert answer.json()["error"] == "payload_too_large"
    assert "max_body_bytes" in answer.json()["message"]
    if framing == "content-length":
        assert score_calls(emulator) == 0  # refused before anything was sent


async def test_unknown_and_entra_services_are_refused(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, caller: Any
) -> None:
    """An unknown service is 404; an Entra scope, which has no scoring URI, is 409 saying so."""
    broker = await start_broker(proxy_config(emulator, short_dir))
    client = caller(broker)
    unknown = await client.call("POST", "/v1/proxy/nope/score", data=b"{}")
    assert unknown.status == 404 and unknown.json()["error"] == "unknown_service"
    entra = await client.call("POST", "/v1/proxy/aml", data=b"{}")
    assert entra.status == 409 and entra.json()["error"] == "no_scoring_uri"
    assert "Entra" in entra.json()["message"] and "/v1/token/aml" in entra.json()["message"]


async def test_no_credential_yet_is_503_with_retry_after(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, caller: Any
) -> None:
    """While a service has never had a credential, the proxy answers 503 and Retry-After."""
    emulator.state.fail("mms.token", status=500, service=demo.TOKEN_SERVICE)
    broker = await start_broker(proxy_config(emulator, short_dir))
    await broker.settled()
    answer = await caller(broker).call("POST", "/v1/proxy/fraud", data=b"{}")
    assert answer.status == 503 and answer.json()["error"] == "not_ready"
    assert int(answer.headers["Retry-After"]) >= 1
    assert score_calls(emulator) == 0


async def test_the_token_routes_guards_hold(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, caller: Any
) -> None:
    """No Metadata header is 400, a foreign Host 403, before anything is forwarded."""
    broker = await start_broker(proxy_config(emulator, short_dir))
    client = caller(broker, "tcp")
    bare = await client.call("POST", "/v1/proxy/fraud", data=b"{}", metadata=False)
    assert bare.status == 400 and bare.json()["error"] == "missing_metadata_header"
    foreign = await client.call(
        "POST", "/v1/proxy/fraud", data=b"{}", headers={"Host": "attacker.example"}
    )
    assert foreign.status == 403 and foreign.json()["error"] == "host_not_allowed"
    assert score_calls(emulator) == 0


async def test_api_keys_are_required_on_tcp(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, caller: Any
) -> None:
    """A service limited to API keys is proxied on TCP only for a client sending one, and
    the key is not passed on."""
    text = proxy_config(emulator, short_dir, service='api_keys = ["scorer"]')
    broker = await start_broker(text + f'\n[api_key.scorer]\nsha256 = "{hash_api_key(API_KEY)}"\n')
    client = caller(broker, "tcp")
    refused = await client.call("POST", "/v1/proxy/fraud", data=b"{}")
    assert refused.status == 403 and refused.json()["error"] == "access_denied"
    assert score_calls(emulator) == 0
    allowed = await client.call(
        "POST", "/v1/proxy/fraud?report=true", data=b"{}", headers={"X-Token-Broker-Key": API_KEY}
    )
    assert allowed.status == 200, allowed.body
    assert "x-token-broker-key" not in allowed.json()["headers"]


async def test_an_upstream_timeout_is_504(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, caller: Any
) -> None:
    """A scoring host that does not answer within timeout_s gets the client a JSON 504."""
    broker = await start_broker(proxy_config(emulator, short_dir, proxy="timeout_s = 0.5"))
    emulator.state.fail("score", kind="hang", times=1, service=demo.TOKEN_SERVICE)
    answer = await caller(broker).call("POST", "/v1/proxy/fraud", data=b"{}")
    assert answer.status == 504 and answer.json()["error"] == "upstream_timeout"
    assert "timeout_s" in answer.json()["message"]


async def test_an_upstream_reset_is_502(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, caller: Any
) -> None:
    """A connection the scoring host cuts gets the client a JSON 502."""
    broker = await start_broker(proxy_config(emulator, short_dir))
    emulator.state.fail("score", kind="reset", times=1, service=demo.TOKEN_SERVICE)
    answer = await caller(broker).call("POST", "/v1/proxy/fraud", data=b"{}")
    assert answer.status == 502 and answer.json()["error"] == "upstream_unreachable"


async def test_an_answer_cut_while_it_is_read_is_relayed_cut(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, caller: Any
) -> None:
    """A scoring answer that breaks off before its Content-Length reaches the client as it
    came: the status, the whole length declared, the bytes that came, then the connection
    closed, so that it cannot pass for a whole answer."""
    broker = await start_broker(proxy_config(emulator, short_dir))
    emulator.state.fail("score", kind="cut", times=1, service=demo.TOKEN_SERVICE)
    reader, writer = await asyncio.open_unix_connection(str(broker.daemon.unix_path))
    writer.write(
        b"POST /v1/proxy/fraud HTTP/1.1\r\nHost: localhost\r\nMetadata: true\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    )
    received = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    declared = int(head.split(b"Content-Length: ", 1)[1].split(b"\r\n", 1)[0])
    assert 0 < len(body) < declared
    whole = await caller(broker).call("POST", "/v1/proxy/fraud", data=b"{}")
    assert whole.status == 200 and len(whole.body) == declared
    assert whole.body.startswith(body)


async def test_sub_paths_resolve_in_the_scoring_directory(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, caller: Any
) -> None:
    """`{path}` is taken in the scoring URI's directory, with the query string passed on."""
    broker = await start_broker(proxy_config(emulator, short_dir))
    client = caller(broker)
    swagger = await client.call("GET", "/v1/proxy/v2-key/swagger.json")
    assert swagger.status == 200 and swagger.json()["swagger"] == "2.0"
    other = await client.call("GET", "/v1/proxy/v2-key/models/v1/info?detail=full&x=%20y")
    assert other.status == 200, other.body
    assert other.json() == {
        "path": "models/v1/info",
        "method": "GET",
        "query": {"detail": "full", "x": " y"},
        "auth": "key",
    }
    for path in ("/v1/proxy/v2-key", "/v1/proxy/v2-key/"):
        assert (await client.call("POST", path, data=b"{}")).json()["auth"] == "key"


@pytest.mark.parametrize(
    "path",
    [
        "/v1/proxy/v2-key/../v2-token/score",
        "/v1/proxy/v2-key/a/../../x",
        "/v1/proxy/v2-key/%2e%2e/x",
        "/v1/proxy/v2-key/%2E./x",
        "/v1/proxy/v2-key/%252e%252e/x",
        "/v1/proxy/v2-key/..;/x",
        "/v1/proxy/v2-key/./score",
        "/v1/proxy/v2-key/a%2fb",
        "/v1/proxy/v2-key/a%5cb",
        "/v1/proxy/v2-key/a\\b",
        "/v1/proxy/v2-key//attacker.example/x",
        "/v1/proxy/v2-key/a//b",
        "/v1/proxy/v2-key/a%00b",
    ],
)
async def test_paths_leaving_the_directory_are_refused(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, caller: Any, path: str
) -> None:
    """Dot segments, however encoded, encoded separators and empty segments are 400."""
    broker = await start_broker(proxy_config(emulator, short_dir))
    answer = await caller(broker).call("GET", path)
    assert answer.status == 400, (path, answer.body)
    assert answer.json()["error"] == "bad_proxy_path"


async def test_metrics_count_proxied_calls(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, caller: Any
) -> None:
    """Proxied calls are counted by service and the scoring host's status."""
    broker = await start_broker(proxy_config(emulator, short_dir))
    client = caller(broker)
    await client.call("POST", "/v1/proxy/fraud", data=b"{}")
    emulator.state.fail("score", kind="reset", times=1, service=demo.TOKEN_SERVICE)
    await client.call("POST", "/v1/proxy/fraud", data=b"{}")
    text = (await client.call("GET", "/metrics")).body.decode()
    assert 'token_broker_proxy_requests_total{service="fraud",status="200"} 1.0' in text
    assert 'token_broker_proxy_requests_total{service="fraud",status="error"} 1.0' in text


async def test_no_token_in_logs_or_error_bodies(
    start_broker: StartBroker,
    emulator: Emulator,
    short_dir: Path,
    caller: Any,
    logs: io.StringIO,
) -> None:
    """Through successes, retries, refusals and failures, no credential and no query string
    reaches a log line or an error body; each call is logged at debug without its URL."""
    broker = await start_broker(proxy_config(emulator, short_dir, proxy="timeout_s = 0.5"))
    client = caller(broker)
    await broker.settled()
    broker.clock.advance(11)
    emulator.state.fail("score", status=401, times=1, service=demo.TOKEN_SERVICE)
    emulator.state.fail("score", status=401, times=1, service=demo.KEY_SERVICE)
    emulator.state.fail("score", kind="hang", times=1, service=demo.ENDPOINT_TOKEN)
    emulator.state.fail("score", kind="reset", times=1, service=demo.ENDPOINT_KEY)
    bodies = []
    for service in ("fraud", "churn", "v2-token", "v2-key", "fraud"):
        answer = await client.call("POST", f"/v1/proxy/{service}?sig=query-secret", data=b"{}")
        bodies.append(answer.body.decode())
    bodies.append((await client.call("GET", "/v1/proxy/fraud/..")).body.decode())
    secrets = [e.token.value for e in broker.daemon.store.entries if e.token is not None]
    secrets += emulator.state.current_keys(
        demo.SUBSCRIPTION_ID, demo.RESOURCE_GROUP, demo.WORKSPACE, demo.KEY_SERVICE
    )
    assert len(secrets) >= 6
    text = logs.getvalue()
    assert text.count('"proxy.forwarded"') >= 5
    everything = text + "\n".join(bodies)
    for secret in [*secrets, "query-secret"]:
        assert secret not in everything


@pytest.mark.parametrize("size", ["kept", "streamed"])
async def test_compressed_bodies_are_forwarded_as_sent(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, caller: Any, size: str
) -> None:
    """A gzip body with `Content-Encoding: gzip` reaches the scoring host byte for byte,
    kept for a retry or streamed past retry_buffer_bytes: the host decodes the original."""
    proxy = "retry_buffer_bytes = 4096"
    broker = await start_broker(proxy_config(emulator, short_dir, proxy=proxy))
    payload = os.urandom(1024 if size == "kept" else 256 << 10)
    packed = gzip.compress(payload)
    answer = await caller(broker).call(
        "POST",
        "/v1/proxy/fraud?report=true",
        headers={"Content-Encoding": "gzip"},
        data=packed,
    )
    assert answer.status == 200, answer.body[:300]
    report = answer.json()
    assert report["bytes"] == len(payload)
    assert report["sha256"] == hashlib.sha256(payload).hexdigest()
    assert "content-encoding" in report["headers"]


async def test_a_corrupt_compressed_body_is_the_scoring_hosts_to_judge(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, caller: Any, logs: io.StringIO
) -> None:
    """A body that is not the gzip it claims to be is forwarded as it came and answered by
    the scoring host: no local 500, and no byte of it in the broker's log."""
    broker = await start_broker(proxy_config(emulator, short_dir))
    marker = b"BODY-BYTES-NEVER-LOGGED-"
    before = score_calls(emulator)
    answer = await caller(broker).call(
        "POST",
        "/v1/proxy/fraud",
        headers={"Content-Encoding": "gzip"},
        data=b"\x1f\x8b\x08\x00" + marker * 8,
    )
    assert score_calls(emulator) == before + 1  # the scoring host got it
    assert not (answer.status == 500 and b'"internal"' in answer.body), answer.body
    text = logs.getvalue()
    assert "request.crashed" not in text
    assert marker.decode() not in text and "BODY-BYTES" not in text


@pytest.mark.parametrize("listener", LISTENERS)
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_body_line_starting_with_connect_is_forwarded(
    start_broker: StartBroker,
    emulator: Emulator,
    short_dir: Path,
    caller: Any,
    listener: str,
    framing: str,
) -> None:
    """A body holding `\\nCONNECT ` lines is proxied and answered by the scoring host, not
    refused as if it were a CONNECT request."""
    broker = await start_broker(proxy_config(emulator, short_dir))
    payload = b"hello\nCONNECT me\n\r\nCONNECT evil.example:443 HTTP/1.1\r\n\r\n"
    data: Any = payload if framing == "content-length" else chunks(payload)
    answer = await caller(broker, listener).call("POST", "/v1/proxy/fraud?report=true", data=data)
    assert answer.status == 200, answer.body[:300]
    assert answer.json()["sha256"] == hashlib.sha256(payload).hexdigest()
