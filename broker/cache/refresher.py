"""Schedules every service's next refresh.

Each service has one one-shot job, upserted after every fetch: at the policy's refresh
time after a success, after a jittered backoff after a failure, and after the same
backoff when a credential asks to be refreshed at once. Jobs run on `Jobs` (APScheduler
in production, simulated time in tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools

from broker.cache.scheduling import ApschedulerJobs, Jobs
from broker.cache.store import Entry, Reconciled, Store, Wanted
from broker.errors import UpstreamError
from broker.log import get_logger
from broker.models import AuthKind

log = get_logger("broker.refresher")

_EARLY_S = 0.25  # a job may fire this much before its time: not a sign it was moved


class Refresher:
    """Keeps every entry of a `Store` refreshed ahead of its deadline."""

    def __init__(self, store: Store, jobs: Jobs | None = None) -> None:
        self._store = store
        self._jobs = jobs if jobs is not None else ApschedulerJobs()
        store.on_result(self._reschedule)

    def start(self) -> None:
        """Start the scheduler and fetch every service now.

        The first fetches start here rather than as jobs so that a client asking
        at once joins them instead of starting a second fetch.
        """
        self._jobs.start()
        for entry in self._store.entries:
            self.track(entry.service)

    def track(self, service: str) -> None:
        """Start refreshing a service: at its refresh time if it holds a usable token
        (restored from the persisted cache), else now. A restored key is served but
        re-listed at once: it may have been rotated while the broker was down."""
        entry = self._store.entry(service)
        token = entry.token
        if (
            token is not None
            and entry.obtained_at is not None
            and token.auth is not AuthKind.KEY
            and self._store.usable(entry)
        ):
            self._schedule(service, self._store.policy.refresh_at(token, entry.obtained_at))
        else:
            self._store.fetch(service)

    def reconcile(self, wanted: list[Wanted]) -> Reconciled:
        """Apply a reloaded list of services to the store, and schedule what it changed."""
        result = self._store.reconcile(wanted)
        for service in result.removed + result.replaced:
            self._jobs.cancel(service)
        for service in result.added + result.replaced:
            self.track(service)
        for service in result.resigned:
            self._store.fetch(service)  # keeps serving its credential meanwhile
        return result

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop scheduling; let fetches under way finish within `grace_s`, then cancel them.

        Waiting matters because MSAL runs in worker threads that a cancelled task
        cannot stop: they would outlive the event loop.
        """
        self._jobs.shutdown()
        pending = [e.inflight for e in self._store.entries if e.inflight is not None]
        if not pending:
            return
        _, late = await asyncio.wait(pending, timeout=grace_s)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)

    async def _run(self, service: str) -> None:
        entry = self._store.entry(service)
        if entry.next_attempt_at is not None and (
            entry.next_attempt_at > self._store.clock() + _EARLY_S
        ):
            # Moved later after this run was due and before it started: a credential
            # arrived meanwhile (in fleet mode, adopted on another broker's notice).
            log.debug("refresh.superseded", service=service)
            return
        # A failure is recorded and logged by the store, and _reschedule sets the retry.
        with contextlib.suppress(UpstreamError):
            await self._store.fetch(service)

    def _reschedule(self, entry: Entry) -> None:
        store = self._store
        now = store.clock()
        policy = store.policy
        if entry.last_error is None and entry.token is not None and entry.obtained_at is not None:
            when = policy.refresh_at(entry.token, entry.obtained_at)
            if when - now < policy.config.retry_min_s:
                # Due at once by its own times: back off as after a failure, never loop.
                entry.due_at_once += 1
                when = now + policy.retry_in(entry.due_at_once, None, True)
                log.warning("refresh.due_at_once", service=entry.service, streak=entry.due_at_once)
            else:
                entry.due_at_once = 0
        else:
            error = entry.last_error
            delay = policy.retry_in(
                entry.failures,
                error.retry_after if error else None,
                error.retryable if error else True,
            )
            when = now + delay
        self._schedule(entry.service, when)
        log.debug("refresh.scheduled", service=entry.service, in_s=round(when - now, 2))

    def _schedule(self, service: str, when: float) -> None:
        self._store.entry(service).next_attempt_at = when
        self._jobs.at(service, when, functools.partial(self._run, service))
