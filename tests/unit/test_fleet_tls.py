"""The fleet over TLS against a real redis-server speaking only TLS, with a CA the test made:
the right CA connects, a wrong one or a plain-text port fails within its bound and says why."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from broker.config import Secret
from broker.errors import FleetUnavailableError
from broker.fleet import Fleet
from tests.conftest import TlsRedis
from tests.unit.test_fleet_shared import IDENTITIES, fleet_config, saved

pytestmark = pytest.mark.timeout(30)

PASSWORD = "tls-PASSWORD-0001"
MakeFleet = Callable[..., Fleet]


@pytest.fixture
async def make_fleet(tls_redis: TlsRedis) -> AsyncIterator[MakeFleet]:
    """Fleets on the TLS Redis (emptied first), trusting the CA given; closed after."""
    tls_redis.server.command("FLUSHALL")
    made: list[Fleet] = []

    def make(url: str | None = None, **changes: Any) -> Fleet:
        changes.setdefault("ca_file", tls_redis.ca_file)
        fleet = Fleet(fleet_config(url or tls_redis.url, **changes), IDENTITIES.get)
        made.append(fleet)
        return fleet

    yield make
    for fleet in made:
        await fleet.close()


async def test_brokers_share_over_tls_with_the_servers_ca(make_fleet: MakeFleet) -> None:
    """With the CA that signed the server's certificate, one broker's entry is read back by
    another and its notice heard: the handshake checks the certificate and its host."""
    writer, reader = make_fleet(), make_fleet()
    heard: list[str] = []
    reader.on_notice(heard.append)
    reader.watch(["fraud"])
    await asyncio.wait_for(reader.listening.wait(), 10)  # Redis confirmed the subscription
    assert reader.health == "up"
    credential = saved()
    assert await writer.write("fraud", credential, 600.0)
    assert await reader.read("fraud") == credential
    for _ in range(200):
        if heard:
            break
        await asyncio.sleep(0.01)
    assert heard == ["fraud"]


async def test_a_wrong_ca_fails_within_its_bound_saying_why(
    make_fleet: MakeFleet, tls_redis: TlsRedis
) -> None:
    """A CA that did not sign the server's certificate: each command fails within the
    connect and command timeouts, and the error says certificate verify failed and names
    ca_file, never the password."""
    fleet = make_fleet(ca_file=tls_redis.other_ca_file, password=Secret(PASSWORD))
    started = time.monotonic()
    with pytest.raises(FleetUnavailableError) as caught:
        await fleet.read("fraud")
    assert time.monotonic() - started < 1.5
    message = caught.value.message
    assert "certificate verify failed" in message and "ca_file" in message, message
    assert PASSWORD not in message and fleet.health == "down"
    assert fleet.problem == message


async def test_the_systems_cas_do_not_trust_a_private_ca(make_fleet: MakeFleet) -> None:
    """Without ca_file the system's CAs are used, and they do not trust the test's CA."""
    fleet = make_fleet(ca_file=None)
    with pytest.raises(FleetUnavailableError) as caught:
        await fleet.read("fraud")
    assert "certificate verify failed" in caught.value.message


async def test_a_port_that_does_not_speak_tls_says_so(make_fleet: MakeFleet) -> None:
    """rediss:// aimed at a port whose server answers in plain text fails the handshake,
    and the error gives OpenSSL's reason and asks whether the port speaks TLS."""

    async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"-ERR this port speaks plain text\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(plain, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        fleet = make_fleet(f"rediss://127.0.0.1:{port}/0")
        with pytest.raises(FleetUnavailableError) as caught:
            await fleet.read("fraud")
    finally:
        server.close()
        await server.wait_closed()
    message = caught.value.message
    assert "TLS connection to Redis failed" in message and "speaks TLS" in message, message


async def test_closing_on_a_frozen_redis_is_bounded(
    make_fleet: MakeFleet, tls_redis: TlsRedis
) -> None:
    """A fleet subscribed over TLS to a Redis that stopped answering (SIGSTOP) closes
    within the bound of one command: neither the subscription's end nor the client's close
    waits for the peer's TLS close."""
    fleet = make_fleet()
    fleet.watch(["fraud"])
    await asyncio.wait_for(fleet.listening.wait(), 10)
    await fleet.read("fraud")  # a pooled connection beside the subscription's
    process = tls_redis.server.process
    assert process is not None
    process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        await fleet.close()
        assert time.monotonic() - started < 1.5
    finally:
        process.send_signal(signal.SIGCONT)
    # Redis, woken, ends the TLS sessions that were left to it; the test waits for that so
    # that no socket outlives its event loop.
    for _ in range(200):
        if b"name=token-broker" not in tls_redis.server.command("CLIENT", "LIST"):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0)
