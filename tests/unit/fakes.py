"""Stand-ins the unit tests share: a clock the test sets, and a provider answering from a
queue of credentials and errors."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Awaitable, Callable

from broker.models import AccessToken


class FakeClock:
    """A clock that stands still until the test moves `now`."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeProvider:
    """Answers each fetch with the next credential or error of `outcomes`; with
    `gated=True`, each fetch waits for `gate` to be set, so a test can hold it in flight."""

    def __init__(self, service: str = "svc", *, gated: bool = False) -> None:
        self.service = service
        self.has_scoring_host = True
        self.scoring_uri = None
        self.clock_skew_s: float | None = None
        self.calls = 0
        self.gate = asyncio.Event()
        if not gated:
            self.gate.set()
        self.outcomes: list[AccessToken | Exception] = []

    async def fetch(self) -> AccessToken:
        self.calls += 1
        await self.gate.wait()
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


class SimTime:
    """Simulated time for the refresh path: the broker's `Clock`, its `Sleep` and the
    refresher's `Jobs`, all moved only by `advance`, which runs what falls due in order."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now
        self.jobs: dict[str, tuple[float, Callable[[], Awaitable[None]]]] = {}
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._running: set[asyncio.Future[None]] = set()

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float, /) -> asyncio.Future[None]:
        waiter = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + max(seconds, 0.0), next(self._order), waiter))
        return waiter

    # The `Jobs` protocol of broker.cache.scheduling.
    def start(self) -> None:
        pass

    def shutdown(self) -> None:
        self.jobs.clear()

    def at(self, key: str, when: float, job: Callable[[], Awaitable[None]]) -> None:
        self.jobs[key] = (when, job)

    def cancel(self, key: str) -> None:
        self.jobs.pop(key, None)

    async def advance(self, seconds: float) -> None:
        """Move time forward by `seconds`, waking sleepers and running jobs as they fall due."""
        target = self.now + seconds
        while True:
            await settle()
            due = self._next_due()
            if due is None or due > target:
                break
            self.now = max(self.now, due)
            self._wake_due()
        self.now = target
        await settle()

    def _next_due(self) -> float | None:
        times = [when for when, _ in self.jobs.values()]
        while self._sleepers and self._sleepers[0][2].done():  # cancelled sleeps
            heapq.heappop(self._sleepers)
        if self._sleepers:
            times.append(self._sleepers[0][0])
        return min(times, default=None)

    def _wake_due(self) -> None:
        while self._sleepers and self._sleepers[0][0] <= self.now:
            _, _, waiter = heapq.heappop(self._sleepers)
            if not waiter.done():
                waiter.set_result(None)
        for key, (when, job) in list(self.jobs.items()):
            if when <= self.now:
                del self.jobs[key]  # a one-shot job is gone once it fires
                task = asyncio.ensure_future(job())
                self._running.add(task)
                task.add_done_callback(self._running.discard)


async def settle(rounds: int = 200) -> None:
    """Let every task that can run, run: the fakes answer without real I/O."""
    for _ in range(rounds):
        await asyncio.sleep(0)
