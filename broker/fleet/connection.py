"""The broker's one client of Redis: redis-py's asyncio client, bounded and translated.

Every command has a deadline (`connect_timeout_s` to connect, `command_timeout_s` for an
answer, and an overall bound of both, in case the library itself waits longer); redis-py's
own retries are turned off, so a Redis that is down costs one bounded wait, never a hang.
Every redis-py exception is translated here into `FleetUnavailableError`, which names
the operation and never quotes a value.

The scripts are the only commands that change shared state:

    lease     SET lease <random> NX PX lease_ms                 take the refresh lease
    release   delete the lease only while it still holds our random value
    extend    renew the lease only while it still holds our random value
    write     set the entry only when its stamp is newer than the stored one (or the stored
              one is the unreadable value the caller saw), with a TTL, and publish a notice
    hold      set a hold-back with a TTL of its Retry-After, unless a longer one is there

Facts (`facts.py`) are plain GET and SET with a TTL: the last broker to learn one wins.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from time import perf_counter
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    NoPermissionError,
    RedisError,
    ResponseError,
)

from broker.config import FleetConfig
from broker.errors import FleetUnavailableError
from broker.fleet.naming import ServiceKeys

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_WRITE = """
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[4] then
  local stamp = string.match(current, '^TBFLEET%d+:(%d+):')
  if stamp and tonumber(stamp) >= tonumber(ARGV[2]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
redis.call('PUBLISH', ARGV[5], ARGV[2])
return 1
"""

_HOLD = """
if redis.call('PTTL', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[1])
return 1
"""

Observer = Callable[[str, float, bool], None]  # operation, seconds, whether it succeeded


def _no_observer(operation: str, seconds: float, ok: bool) -> None:
    """Observe nothing."""


@dataclass(frozen=True, slots=True)
class Notice:
    """A service's entry changed: on `channel`, with the new stamp."""

    channel: str
    stamp: int


class Connection:
    """Redis as the fleet uses it; every method raises `FleetUnavailableError` or answers."""

    def __init__(self, config: FleetConfig, observer: Observer = _no_observer) -> None:
        self._config = config
        self._observe = observer
        self._bound_s = config.connect_timeout_s + config.command_timeout_s
        self._client = aioredis.Redis(**_client_options(config))
        self._release = self._client.register_script(_RELEASE)
        self._extend = self._client.register_script(_EXTEND)
        self._write = self._client.register_script(_WRITE)
        self._hold = self._client.register_script(_HOLD)

    def __repr__(self) -> str:
        return f"Connection({_where(self._config.redis_url)})"

    async def ping(self) -> None:
        async with self._command("ping"):
            await self._client.ping()

    async def get(self, keys: ServiceKeys) -> bytes | None:
        async with self._command("read"):
            value = await self._client.get(keys.credential)
        return value if isinstance(value, bytes) else None

    async def take_lease(self, keys: ServiceKeys, holder: str, lease_s: float) -> bool:
        async with self._command("lease"):
            taken = await self._client.set(keys.lease, holder, nx=True, px=_ms(lease_s))
        return bool(taken)

    async def extend_lease(self, keys: ServiceKeys, holder: str, lease_s: float) -> bool:
        async with self._command("extend"):
            kept = await self._extend(keys=[keys.lease], args=[holder, _ms(lease_s)])
        return bool(kept)

    async def release_lease(self, keys: ServiceKeys, holder: str) -> bool:
        async with self._command("release"):
            released = await self._release(keys=[keys.lease], args=[holder])
        return bool(released)

    async def write(
        self, keys: ServiceKeys, value: bytes, stamp: int, ttl_s: float, replaces: bytes | None
    ) -> bool:
        """Store `value` if it is newer than the stored entry; True when it was stored."""
        args: list[bytes | str | int] = [value, stamp, _ms(ttl_s), replaces or b"", keys.notices]
        async with self._command("write"):
            written = await self._write(keys=[keys.credential], args=args)
        return bool(written)

    async def held_ms(self, key: str) -> int | None:
        """The milliseconds left of the hold-back at `key`, or None when there is none."""
        async with self._command("holdback.read"):
            left = await self._client.pttl(key)
        return left if isinstance(left, int) and left > 0 else None

    async def hold(self, key: str, hold_s: float, value: str) -> bool:
        """Hold back for `hold_s` at `key` unless a longer hold is there; True when set."""
        async with self._command("holdback.write"):
            held = await self._hold(keys=[key], args=[_ms(hold_s), value])
        return bool(held)

    async def get_fact(self, key: str) -> bytes | None:
        async with self._command("fact.read"):
            value = await self._client.get(key)
        return value if isinstance(value, bytes) else None

    async def set_fact(self, key: str, value: bytes, ttl_s: float) -> None:
        async with self._command("fact.write"):
            await self._client.set(key, value, px=_ms(ttl_s))

    @asynccontextmanager
    async def notices(self, channels: Iterable[str]) -> AsyncIterator[PubSubReader]:
        """A subscription to `channels`, confirmed by Redis (a notice published from then on
        is heard); closed on leaving."""
        wanted = sorted(set(channels))
        pubsub = self._client.pubsub()
        try:
            async with self._command("subscribe"):
                await pubsub.subscribe(*wanted)
                await _confirmed(pubsub, len(wanted))
            yield PubSubReader(pubsub, self)
        finally:
            async with self._command("unsubscribe"):
                # Typed from redis-py 8.2, untyped before: the cast suits both.
                await cast(Callable[[], Awaitable[None]], pubsub.aclose)()

    async def close(self) -> None:
        """Drop every connection, within the bound of one command (a TLS peer that stopped
        answering is not waited for)."""
        async with self._command("close"):
            await self._client.aclose()

    @asynccontextmanager
    async def _command(self, operation: str) -> AsyncIterator[None]:
        started = perf_counter()
        ok = False
        try:
            with _translated(operation):
                async with asyncio.timeout(self._bound_s):
                    yield
            ok = True
        finally:
            self._observe(operation, perf_counter() - started, ok)


async def _confirmed(pubsub: PubSub, count: int) -> None:
    """Return once Redis has confirmed `count` subscriptions (within the caller's bound)."""
    confirmed = 0
    while confirmed < count:
        message = await pubsub.get_message(timeout=None)
        if isinstance(message, dict) and message.get("type") == "subscribe":
            confirmed += 1


class PubSubReader:
    """The messages of one subscription."""

    def __init__(self, pubsub: PubSub, connection: Connection) -> None:
        self._pubsub = pubsub
        self._connection = connection

    async def next(self, timeout_s: float) -> Notice | None:
        """The next notice within `timeout_s`, or None; `FleetUnavailableError` when the
        subscription is lost."""
        with _translated("notices"):
            message = await self._pubsub.get_message(timeout=timeout_s)
        if not isinstance(message, dict) or message.get("type") != "message":
            return None
        channel, data = message.get("channel"), message.get("data")
        if not isinstance(channel, bytes) or not isinstance(data, bytes) or not data.isdigit():
            return None
        return Notice(channel.decode("utf-8", "replace"), int(data))


_LOGIN_REFUSED = (
    "Redis refused the broker's login (%s): check [fleet] username and password, and that "
    "the user is enabled"
)


@contextmanager
def _translated(operation: str) -> Iterator[None]:
    """redis-py's and the socket's failures as the broker's own error."""
    try:
        yield
    except AuthenticationError:  # raised as it is from redis-py 8.2, wrapped before
        raise FleetUnavailableError(_LOGIN_REFUSED % operation, operation=operation) from None
    except NoPermissionError as exc:
        raise FleetUnavailableError(
            f"Redis refused the broker's {operation}: {_kind(exc)} (check [fleet] username "
            "and password, and the user's ACL)",
            operation=operation,
        ) from None
    except ResponseError as exc:
        raise FleetUnavailableError(
            f"Redis failed the broker's {operation}: {_kind(exc)}", operation=operation
        ) from None
    except (RedisError, OSError, TimeoutError) as exc:
        if _refused(exc):  # redis-py before 8.2 raises a ConnectionError from a refused login
            raise FleetUnavailableError(_LOGIN_REFUSED % operation, operation=operation) from None
        tls = _tls_problem(exc)
        if tls is not None:
            raise FleetUnavailableError(
                f"the broker's TLS connection to Redis failed ({operation}): {tls}",
                operation=operation,
            ) from None
        raise FleetUnavailableError(
            f"Redis did not answer the broker's {operation}: {_kind(exc)}", operation=operation
        ) from None


def _refused(exc: BaseException) -> bool:
    causes = (exc.__cause__, exc.__context__)
    return any(isinstance(cause, AuthenticationError | NoPermissionError) for cause in causes)


def _tls_problem(exc: BaseException) -> str | None:
    """Why a TLS handshake failed, from the `ssl` error redis-py wrapped: OpenSSL's reason,
    which names a certificate check or a protocol step, never a value the broker sent."""
    seen: BaseException | None = exc
    for _ in range(4):  # redis-py wraps once or twice
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLCertVerificationError):
            return (
                f"certificate verify failed: {seen.verify_message} (check [fleet] ca_file: it "
                "must hold the CA that signed the server's certificate, which must name the "
                "host of redis_url)"
            )
        if isinstance(seen, ssl.SSLError):
            return (
                f"{seen.reason or type(seen).__name__} (check that the port of redis_url "
                "speaks TLS, and the server's log)"
            )
        seen = seen.__cause__ or seen.__context__
    return None


def _kind(exc: BaseException) -> str:
    """What went wrong, without the message: redis-py's messages may echo arguments."""
    return type(exc).__name__


def _ms(seconds: float) -> int:
    return max(int(seconds * 1000), 1)


def _where(url: str) -> str:
    return url.split("://", 1)[0] + "://…"


def _client_options(config: FleetConfig) -> dict[str, Any]:
    """redis-py's keyword arguments for `config`; the URL was validated by the config."""
    from urllib.parse import urlsplit

    parts = urlsplit(config.redis_url)
    options: dict[str, Any] = {
        "username": config.username,
        "password": config.password.reveal() if config.password is not None else None,
        "socket_connect_timeout": config.connect_timeout_s,
        "socket_timeout": config.command_timeout_s,
        "retry": Retry(NoBackoff(), 0),  # one bounded attempt; the broker decides what next
        "retry_on_error": [],
        "health_check_interval": 0,
        "client_name": "token-broker",
        "decode_responses": False,
    }
    if parts.scheme == "unix":
        options["unix_socket_path"] = parts.path
        return options
    options["host"] = parts.hostname
    options["port"] = parts.port or 6379
    options["db"] = int(parts.path.strip("/") or 0)
    if parts.scheme == "rediss":
        options["ssl"] = True
        options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        options["ssl_check_hostname"] = True
        if config.ca_file is not None:
            options["ssl_ca_certs"] = str(config.ca_file)
    return options
