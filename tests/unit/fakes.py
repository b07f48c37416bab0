"""Stand-ins the unit tests share: a clock the test sets, and a provider answering from a
queue of credentials and errors."""

from __future__ import annotations

import asyncio

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
        self.scoring_uri = None
        self.clock_skew_s = None
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
