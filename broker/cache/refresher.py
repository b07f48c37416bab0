"""Schedules every service's next refresh on APScheduler 3's asyncio scheduler.

Each service has one one-shot job, upserted after every fetch: at the policy's
refresh time after a success, after a jittered backoff after a failure. The
scheduler sleeps until the next job is due, so an idle broker burns no CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime

from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.date import DateTrigger

from broker.cache.store import Entry, Store
from broker.errors import UpstreamError
from broker.log import get_logger

log = get_logger("broker.refresher")


class Refresher:
    """Keeps every entry of a `Store` refreshed ahead of its deadline."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._scheduler = AsyncIOScheduler(timezone=UTC)
        store.on_result(self._reschedule)

    def start(self) -> None:
        """Start the scheduler and fetch every service now.

        The first fetches start here rather than as jobs so that a client asking
        at once joins them instead of starting a second fetch.
        """
        self._scheduler.start()
        for entry in self._store.entries:
            self.track(entry.service)

    def track(self, service: str) -> None:
        """Start refreshing a service: at its refresh time if it holds a usable credential
        (restored from the persisted cache), else now."""
        entry = self._store.entry(service)
        if entry.token is not None and entry.obtained_at is not None and self._store.usable(entry):
            self._schedule(service, self._store.policy.refresh_at(entry.token, entry.obtained_at))
        else:
            self._store.fetch(service)

    def forget(self, service: str) -> None:
        """Stop refreshing a service that is no longer configured."""
        with contextlib.suppress(JobLookupError):
            self._scheduler.remove_job(service)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop scheduling; let fetches under way finish within `grace_s`, then cancel them.

        Waiting matters because MSAL runs in worker threads that a cancelled task
        cannot stop: they would outlive the event loop.
        """
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        pending = [e.inflight for e in self._store.entries if e.inflight is not None]
        if not pending:
            return
        _, late = await asyncio.wait(pending, timeout=grace_s)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)

    async def _run(self, service: str) -> None:
        # A failure is recorded and logged by the store, and _reschedule sets the retry.
        with contextlib.suppress(UpstreamError):
            await self._store.fetch(service)

    def _reschedule(self, entry: Entry) -> None:
        store = self._store
        now = store.clock()
        if entry.last_error is None and entry.token is not None and entry.obtained_at is not None:
            when = store.policy.refresh_at(entry.token, entry.obtained_at)
        else:
            error = entry.last_error
            delay = store.policy.retry_in(
                entry.failures,
                error.retry_after if error else None,
                error.retryable if error else True,
            )
            when = now + delay
        self._schedule(entry.service, when)
        log.debug("refresh.scheduled", service=entry.service, in_s=round(when - now, 2))

    def _schedule(self, service: str, when: float) -> None:
        self._store.entry(service).next_attempt_at = when
        self._scheduler.add_job(
            self._run,
            trigger=DateTrigger(run_date=datetime.fromtimestamp(when, UTC)),
            args=[service],
            id=service,
            name=f"refresh:{service}",
            replace_existing=True,
            misfire_grace_time=None,
            coalesce=True,
            max_instances=3,  # a job may be upserted while its previous run finishes
        )
