"""When refreshes run: a seam in front of APScheduler, so tests can run it in simulated time.

Production uses APScheduler 3's asyncio scheduler (one one-shot job per service, upserted
after every fetch; the scheduler sleeps until the next is due, so an idle broker burns no
CPU). Tests put a scheduler of their own on a fake clock behind the same `Jobs` protocol.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Protocol

from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.date import DateTrigger

Job = Callable[[], Awaitable[None]]


class Jobs(Protocol):
    """One-shot jobs keyed by name, each run once at its time (on the broker's clock)."""

    def start(self) -> None: ...

    def shutdown(self) -> None: ...

    def at(self, key: str, when: float, job: Job) -> None:
        """Run `job` at `when`, replacing any job of the same key."""

    def cancel(self, key: str) -> None:
        """Drop the job of `key`, if any."""


class ApschedulerJobs:
    """`Jobs` on APScheduler 3's `AsyncIOScheduler`, on the wall clock."""

    def __init__(self) -> None:
        self._scheduler = AsyncIOScheduler(timezone=UTC)

    def start(self) -> None:
        self._scheduler.start()

    def shutdown(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    def at(self, key: str, when: float, job: Job) -> None:
        self._scheduler.add_job(
            job,
            trigger=DateTrigger(run_date=datetime.fromtimestamp(when, UTC)),
            id=key,
            name=f"refresh:{key}",
            replace_existing=True,
            misfire_grace_time=None,
            coalesce=True,
            max_instances=3,  # a job may be upserted while its previous run finishes
        )

    def cancel(self, key: str) -> None:
        with contextlib.suppress(JobLookupError):
            self._scheduler.remove_job(key)
