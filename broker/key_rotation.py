"""Key rotation with no gap: serve the key that stays, regenerate the other, serve the new one.

Azure invalidates a key when its regeneration succeeds. So before asking for it, the
service is switched to the other key and that key is fetched and in place; only then
is the chosen key regenerated; once the operation has succeeded, the keys are listed
again and the new key is served. A client is never handed a key that Azure has
already invalidated. If regeneration fails, the other key — still valid — stays served.

In fleet mode a rotation holds the service's refresh lease from start to end, so two
brokers cannot rotate at once (the second is refused with `LeaseBusyError` once it has
waited as long as a refresh would), and every key it fetches is shared: the fleet
switches to the other key before the chosen one is regenerated, and to the new key
after. Redis down, a rotation runs alone, as without a fleet.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from broker.cache import Entry, Store
from broker.cache.sharing import Lease
from broker.errors import (
    BadRequestError,
    FleetUnavailableError,
    LeaseBusyError,
    UpstreamError,
    UpstreamFailedError,
)
from broker.log import get_logger
from broker.models import AuthKind
from broker.providers import KeyName, KeyRotator

log = get_logger("broker.key_rotation")

_LEASE_WAITS = 2  # lease_s a rotation waits for the lease, as a refresh does


class KeyRotations:
    """Runs key rotations, one at a time per service."""

    def __init__(self, store: Store, poll_s: float = 2.0) -> None:
        self._store = store
        self.poll_s = poll_s  # between polls of Azure's operation, when it names no Retry-After
        self._locks: dict[str, asyncio.Lock] = {}

    async def rotate(self, service: str, which: KeyName) -> Entry:
        entry = await self._store.credential(service)  # the first fetch tells what it serves
        provider = entry.provider
        if (
            entry.token is None
            or entry.token.auth is not AuthKind.KEY
            or not isinstance(provider, KeyRotator)
        ):
            raise BadRequestError(
                f"service {service!r} is not served with a key: "
                "only key services can have their keys rotated",
                code="not_a_key_service",
            )
        async with (
            self._locks.setdefault(service, asyncio.Lock()),
            self._fleet_lease(service) as leased,
        ):
            return await self._rotate(entry, provider, which, leased)

    @asynccontextmanager
    async def _fleet_lease(self, service: str) -> AsyncIterator[bool]:
        """Hold the service's fleet lease while rotating: True when held, False without a
        fleet (or with Redis down); `LeaseBusyError` when another broker keeps it."""
        shared = self._store.shared
        lease: Lease | None = None
        if shared is not None:
            loop = asyncio.get_running_loop()
            give_up_at = loop.time() + _LEASE_WAITS * shared.lease_s
            try:
                while (lease := await shared.lease(service)) is None:
                    if loop.time() >= give_up_at:
                        raise LeaseBusyError(
                            f"another broker of the fleet holds the lease of {service!r} "
                            "(rotating its keys, or refreshing): try again when it is done"
                        )
                    await shared.wait(service, shared.poll_s)
            except FleetUnavailableError:
                log.warning("keys.rotation_alone", service=service, note="Redis cannot be used")
        try:
            yield lease is not None
        finally:
            if lease is not None:
                await lease.release()

    async def _rotate(
        self, entry: Entry, provider: KeyRotator, which: KeyName, leased: bool
    ) -> Entry:
        other: KeyName = "secondary" if which == "primary" else "primary"
        log.info("keys.rotation_started", service=entry.service, key=which, serving=other)
        if entry.inflight is not None:  # begun before the switch: it may bring `which`
            await asyncio.wait([entry.inflight])
        try:
            provider.serve_key = other
            await self._store.fetch(entry.service, leased=leased)
            await provider.regenerate(which, poll_s=self.poll_s)
            provider.serve_key = which
            await self._store.fetch(entry.service, leased=leased)
        except UpstreamError as exc:
            log.warning("keys.rotation_failed", service=entry.service, key=which, error=exc.message)
            raise UpstreamFailedError(
                f"rotating the {which} key of {entry.service!r} failed: {exc.message}; "
                f"the broker serves the {provider.serve_key} key"
            ) from None
        log.info("keys.rotated", service=entry.service, key=which)
        return entry
