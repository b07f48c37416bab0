"""The fleet as the store sees it: read a service's shared credential, take its refresh
lease, write a newer credential, wait for another broker's notice.

Redis is never on the request path: the store calls these only when a service is due or
starts, and every call is bounded. Redis down, slow or refusing raises
`FleetUnavailableError` (the store then refreshes alone); the fleet says so once
(`fleet.unavailable`) and once again when Redis answers (`fleet.recovered`). An entry that
does not open is ignored with a warning (once per value) and replaced by the next write.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Protocol, TypeVar

from broker.config import FleetConfig
from broker.errors import FleetUnavailableError
from broker.fleet.naming import ServiceKeys
from broker.fleet.sealing import Sealer, UnreadableEntry
from broker.log import get_logger, register_secret
from broker.saved_credentials import Saved

if TYPE_CHECKING:
    # redis-py (and the cryptography it imports) costs about 5 MiB of RSS: loaded only
    # when a Fleet is built, so a broker without [fleet] never pays for it.
    from broker.fleet.connection import Connection, Notice

log = get_logger("broker.fleet")

_T = TypeVar("_T")
Identity = Callable[[str], str | None]  # service name -> what its credential is (or None)
NoticeListener = Callable[[str], None]  # called with the service whose entry changed
_RECONNECT_MIN_S = 0.5
_RECONNECT_MAX_S = 10.0
_NOTICE_READ_S = 5.0  # how long one read of the subscription waits for a message


class FleetObserver(Protocol):
    """Where the fleet's figures go (the metrics)."""

    def fleet_command(self, operation: str, seconds: float, ok: bool) -> None: ...

    def fleet_lease(self, service: str, outcome: str) -> None: ...

    def fleet_health(self, up: bool) -> None: ...


class _Unobserved:
    def fleet_command(self, operation: str, seconds: float, ok: bool) -> None:
        """Observe nothing."""

    def fleet_lease(self, service: str, outcome: str) -> None:
        """Observe nothing."""

    def fleet_health(self, up: bool) -> None:
        """Observe nothing."""


class Fleet:
    """One broker's part in the fleet, for every service it serves."""

    def __init__(
        self,
        config: FleetConfig,
        identity: Identity,
        *,
        observer: FleetObserver | None = None,
        older_keys: Iterable[bytes] = (),
    ) -> None:
        if config.encryption_key is None:
            raise ValueError("fleet mode needs its encryption key")
        self.lease_s = config.lease_s
        # how often a broker waiting on another's lease looks again, notice or not
        self.poll_s = max(0.05, min(1.0, config.lease_s / 10))
        self._identity = identity
        self._observer = observer or _Unobserved()
        from broker.fleet.connection import Connection

        self._connection = Connection(config, self._observer.fleet_command)
        self._sealer = Sealer(config.encryption_key.reveal(), *older_keys)
        self._prefix = config.key_prefix
        self._holder = secrets.token_hex(8)  # this broker, in its lease values
        self.healthy: bool | None = None  # None until Redis first answers or fails
        self.listening = asyncio.Event()  # set while Redis has confirmed the notices' channels
        self.problem: str | None = None  # why Redis cannot be used, while it cannot
        self._changed: dict[str, asyncio.Event] = {}
        self._unreadable: dict[str, bytes] = {}  # the last bad value seen, to replace it
        self._listeners: list[NoticeListener] = []
        self._channels: dict[str, list[str]] = {}
        self._subscriber: asyncio.Task[None] | None = None
        log.info("fleet.joined", holder=self._holder, prefix=self._prefix, lease_s=self.lease_s)

    def __repr__(self) -> str:
        return f"Fleet(prefix={self._prefix!r}, {self._connection!r})"

    @property
    def health(self) -> str:
        """`up`, `down`, or `unknown` before Redis first answered or failed."""
        return {None: "unknown", True: "up", False: "down"}[self.healthy]

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def sealer(self) -> Sealer:
        """The fleet's keys, for the other state it seals (`broker.fleet.facts`)."""
        return self._sealer

    @property
    def connection(self) -> Connection:
        """The fleet's Redis, for the other state it shares (`broker.fleet.holdbacks`)."""
        return self._connection

    async def command(self, operation: Awaitable[_T]) -> _T:
        """Await one of `connection`'s commands, keeping the fleet's health and saying
        once when Redis fails (`FleetUnavailableError`) or answers again."""
        return await self._call(operation)

    def keys(self, service: str) -> ServiceKeys | None:
        identity = self._identity(service)
        return None if identity is None else ServiceKeys.of(self._prefix, identity)

    async def read(self, service: str) -> Saved | None:
        """The fleet's credential for `service`, if there is one that opens."""
        keys, identity = self.keys(service), self._identity(service)
        if keys is None or identity is None:
            return None
        value = await self._call(self._connection.get(keys))
        if value is None:
            return None
        try:
            saved = self._sealer.open(keys.credential, identity, value)
        except UnreadableEntry as exc:
            if self._unreadable.get(service) != value:
                log.warning("fleet.entry_ignored", service=service, reason=exc.reason)
            self._unreadable[service] = value
            return None
        self._unreadable.pop(service, None)
        register_secret(saved.token.value)
        return saved

    async def lease(self, service: str) -> FleetLease | None:
        """The service's refresh lease, or None while another broker holds it."""
        keys = self.keys(service)
        if keys is None:
            return None
        holder = f"{self._holder}:{secrets.token_hex(8)}"
        taken = await self._call(self._connection.take_lease(keys, holder, self.lease_s))
        self._observer.fleet_lease(service, "taken" if taken else "busy")
        if not taken:
            return None
        return FleetLease(self, service, keys, holder)

    async def write(self, service: str, saved: Saved, ttl_s: float) -> bool:
        """Share `saved` for `ttl_s` if it is newer than the fleet's; True when written.
        Never raises: a failed write costs the fleet one refresh, not this broker."""
        keys, identity = self.keys(service), self._identity(service)
        if keys is None or identity is None or ttl_s <= 0:
            return False
        value = self._sealer.seal(keys.credential, identity, saved)
        replaces = self._unreadable.get(service)
        try:
            written = await self._call(
                self._connection.write(keys, value, saved.stamp, ttl_s, replaces)
            )
        except FleetUnavailableError:
            return False
        if written:
            self._unreadable.pop(service, None)
        log.debug("fleet.written", service=service, written=written, ttl_s=round(ttl_s, 1))
        return written

    async def wait(self, service: str, timeout_s: float) -> None:
        """Return at the next notice about `service`, or after `timeout_s`."""
        changed = self._changed.setdefault(service, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), timeout_s)

    def on_notice(self, listener: NoticeListener) -> None:
        """Call `listener` with a service's name whenever another broker shares it anew."""
        self._listeners.append(listener)

    def watch(self, services: Iterable[str]) -> None:
        """Listen for notices about `services` (replacing what was listened to)."""
        channels: dict[str, list[str]] = {}
        for service in services:
            keys = self.keys(service)
            if keys is not None:
                channels.setdefault(keys.notices, []).append(service)
        if channels == self._channels and self._subscriber is not None:
            return
        self._channels = channels
        if self._subscriber is not None:
            self._subscriber.cancel()
        self.listening = asyncio.Event()  # the new subscription's; the old one's is dropped
        self._subscriber = asyncio.get_running_loop().create_task(
            self._subscribe(self.listening), name="fleet-notices"
        )

    async def close(self) -> None:
        if self._subscriber is not None:
            self._subscriber.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._subscriber
        with contextlib.suppress(FleetUnavailableError):  # nothing is left to do with Redis
            await self._connection.close()

    async def _subscribe(self, listening: asyncio.Event) -> None:
        pause = _RECONNECT_MIN_S
        while True:
            try:
                async with self._connection.notices(list(self._channels)) as reader:
                    self._up()
                    pause = _RECONNECT_MIN_S
                    listening.set()
                    try:
                        while True:
                            notice = await reader.next(_NOTICE_READ_S)
                            if notice is not None:
                                self._noticed(notice)
                    finally:
                        listening.clear()
            except FleetUnavailableError as exc:
                _unless_cancelled()
                self._down(exc)
            await asyncio.sleep(pause)
            pause = min(pause * 2, _RECONNECT_MAX_S)

    def _noticed(self, notice: Notice) -> None:
        for service in self._channels.get(notice.channel, ()):
            changed = self._changed.pop(service, None)
            if changed is not None:
                changed.set()
            for listener in self._listeners:
                listener(service)

    async def _call(self, operation: Awaitable[_T]) -> _T:
        try:
            result = await operation
        except FleetUnavailableError as exc:
            self._down(exc)
            raise
        self._up()
        return result

    def _up(self) -> None:
        if self.healthy is False:
            log.info("fleet.recovered", note="sharing refreshes through Redis again")
        if self.healthy is not True:
            self._observer.fleet_health(True)
        self.healthy, self.problem = True, None

    def _down(self, exc: FleetUnavailableError) -> None:
        if self.healthy is not False:
            log.warning(
                "fleet.unavailable",
                operation=exc.operation,
                error=exc.message,
                note="refreshing alone, as without a fleet, until Redis answers",
            )
            self._observer.fleet_health(False)
        self.healthy, self.problem = False, exc.message


class FleetLease:
    """A held refresh lease, renewed while held; `held` turns False if it was lost."""

    def __init__(self, fleet: Fleet, service: str, keys: ServiceKeys, holder: str) -> None:
        self._fleet = fleet
        self._service = service
        self._keys = keys
        self._holder = holder
        self.held = True
        self._renewer = asyncio.get_running_loop().create_task(
            self._renew(), name=f"fleet-lease:{service}"
        )

    async def _renew(self) -> None:
        fleet = self._fleet
        while True:
            await asyncio.sleep(fleet.lease_s / 3)
            try:
                kept = await fleet._call(
                    fleet._connection.extend_lease(self._keys, self._holder, fleet.lease_s)
                )
            except FleetUnavailableError:
                _unless_cancelled()
                continue  # Redis down: nobody else can take it either; try again
            if not kept:
                self.held = False
                fleet._observer.fleet_lease(self._service, "lost")
                log.warning(
                    "fleet.lease_lost",
                    service=self._service,
                    note="another broker may refresh too; the newer credential is kept",
                )
                return

    async def release(self) -> None:
        self._renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._renewer
        if not self.held:
            return
        self.held = False
        with contextlib.suppress(FleetUnavailableError):
            await self._fleet._call(self._fleet._connection.release_lease(self._keys, self._holder))


def _unless_cancelled() -> None:
    """Raise `CancelledError` when the running task was asked to stop. A cancellation that
    reaches redis-py mid-command can come out as a connection error; a loop that retried it
    would outlive its `cancel()` and hang whoever awaits it (a lease's release, a stop)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
