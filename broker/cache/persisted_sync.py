"""Keeps the persisted cache in step with the store: restored at start, rewritten on change.

Writes happen in a worker thread (they fsync), one at a time, and always write the
latest state (`LatestOnly`): a change arriving while a write is under way is written
next, so an older snapshot can never land last.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from broker.cache.persist import PersistedCache
from broker.cache.store import Entry, Store
from broker.latest_only import LatestOnly
from broker.log import get_logger
from broker.providers import RestoresScoringUri
from broker.saved_credentials import Saved

log = get_logger("broker.cache.persisted_sync")

Fingerprint = Callable[[str], str | None]  # service name -> what its credential is for


class PersistedSync:
    """Restores the store from the persisted cache and saves every change to it."""

    def __init__(
        self, store: Store, cache: PersistedCache, fingerprint: Fingerprint, *, saving: bool = True
    ) -> None:
        """With `saving` False the file is only read: for a run that holds some of the
        services only, whose save would drop the others' credentials from the file."""
        self._store = store
        self._cache = cache
        self._fingerprint = fingerprint
        # what was last saved of each service: its credential's generation, its scoring URI
        self._saved: dict[str, tuple[int, str | None]] = {}
        self._writer = LatestOnly(self._write, "persisted-cache")
        if saving:
            store.on_result(self._on_result)

    def restore(self) -> int:
        """Load still-valid credentials into the store; how many were restored."""
        fingerprints = {
            e.service: fp for e in self._store.entries if (fp := self._fingerprint(e.service))
        }
        restored = self._cache.load(fingerprints)
        count = 0
        for service, saved in restored.items():
            entry = self._store.restore(service, saved.token, saved.obtained_at)
            if entry is None:
                continue
            if saved.scoring_uri and isinstance(entry.provider, RestoresScoringUri):
                entry.provider.restore_scoring_uri(saved.scoring_uri)
            self._saved[service] = (entry.generation, entry.provider.scoring_uri)
            count += 1
        return count

    def _on_result(self, entry: Entry) -> None:
        current = (entry.generation, entry.provider.scoring_uri)
        if self._saved.get(entry.service) == current:
            return  # a failed refresh, or the same credential at the same URI: nothing new
        self._saved[entry.service] = current
        self._writer.ask()

    async def _write(self) -> None:
        await asyncio.to_thread(self._cache.save, self._snapshot())

    def _snapshot(self) -> dict[str, tuple[str, Saved]]:
        snapshot: dict[str, tuple[str, Saved]] = {}
        for entry in self._store.entries:
            fingerprint = self._fingerprint(entry.service)
            if entry.token is None or entry.obtained_at is None or fingerprint is None:
                continue
            saved = Saved(entry.token, entry.obtained_at, entry.provider.scoring_uri)
            snapshot[entry.service] = (fingerprint, saved)
        return snapshot

    async def close(self) -> None:
        """Let the last write finish."""
        await self._writer.idle()
