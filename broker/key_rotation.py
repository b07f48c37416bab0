"""Key rotation with no gap: serve the key that stays, regenerate the other, serve the new one.

Azure invalidates a key when its regeneration succeeds. So before asking for it, the
service is switched to the other key and that key is fetched and in place; only then
is the chosen key regenerated; once the operation has succeeded, the keys are listed
again and the new key is served. A client is never handed a key that Azure has
already invalidated. If regeneration fails, the other key — still valid — stays served.
"""

from __future__ import annotations

import asyncio

from broker.cache import Entry, Store
from broker.errors import BadRequestError, UpstreamError, UpstreamFailedError
from broker.log import get_logger
from broker.models import AuthKind
from broker.providers import KeyName, KeyRotator

log = get_logger("broker.key_rotation")


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
        async with self._locks.setdefault(service, asyncio.Lock()):
            return await self._rotate(entry, provider, which)

    async def _rotate(self, entry: Entry, provider: KeyRotator, which: KeyName) -> Entry:
        other: KeyName = "secondary" if which == "primary" else "primary"
        log.info("keys.rotation_started", service=entry.service, key=which, serving=other)
        try:
            provider.serve_key = other
            await self._store.fetch(entry.service)
            await provider.regenerate(which, poll_s=self.poll_s)
            provider.serve_key = which
            await self._store.fetch(entry.service)
        except UpstreamError as exc:
            log.warning("keys.rotation_failed", service=entry.service, key=which, error=exc.message)
            raise UpstreamFailedError(
                f"rotating the {which} key of {entry.service!r} failed: {exc.message}; "
                f"the broker serves the {provider.serve_key} key"
            ) from None
        log.info("keys.rotated", service=entry.service, key=which)
        return entry
