"""A hard cap on upstream calls, whatever the refresh policy decides.

Two token buckets guard every fetch: one for the service and one for the principal and
subscription it calls Azure as (Azure throttles per principal and subscription). A fetch
takes one token from each; when either is empty it waits for the refill. This is
defence in depth: the policy already spaces attempts, but if a future bug in the state
machine asked too often, Azure would still never see a burst.

A fetch that must wait reserves its call: the bucket goes into debt and the fetch sleeps
once, until the refill has paid for it, so fetches waiting on one bucket leave in the
order they came, one refill apart. (Each one sleeping until the next token and trying
again woke every waiter at every refill: a broker starting 10,000 services spent its
event loop on those wake-ups instead of its clients.) A fetch cancelled while it waits
gives its reservation back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from broker.log import get_logger
from broker.models import Clock, Sleep, system_clock, system_sleep

log = get_logger("broker.budget")

_K = TypeVar("_K")
PrincipalKey = tuple[str, str]  # (client id, subscription id); Entra scopes have no subscription


@dataclass(frozen=True, slots=True)
class Allowance:
    """A bucket's size: `burst` calls at once, refilled at `per_minute`."""

    burst: int
    per_minute: float

    def __post_init__(self) -> None:
        if self.burst < 1 or self.per_minute <= 0:
            raise ValueError("a call budget needs a burst of 1 or more and a positive rate")


class Bucket:
    """A token bucket on the broker's clock."""

    def __init__(self, allowance: Allowance, now: float) -> None:
        self.allowance = allowance
        self._tokens = float(allowance.burst)
        self._at = now

    def _refill(self, now: float) -> None:
        rate = self.allowance.per_minute / 60.0
        self._tokens = min(float(self.allowance.burst), self._tokens + (now - self._at) * rate)
        self._at = max(self._at, now)

    def reserve(self, now: float) -> float:
        """Take a call now, into debt if need be; how long until the refill pays for it."""
        self._refill(now)
        self._tokens -= 1.0
        owed = -self._tokens
        return 0.0 if owed <= 1e-9 else owed * 60.0 / self.allowance.per_minute

    def give_back(self) -> None:
        """Return a reserved call that was not made."""
        self._tokens = min(float(self.allowance.burst), self._tokens + 1.0)

    def resize(self, allowance: Allowance, now: float) -> None:
        self._refill(now)
        self.allowance = allowance
        self._tokens = min(self._tokens, float(allowance.burst))


class CallBudget:
    """The buckets of every service and every principal and subscription."""

    def __init__(
        self,
        service: Allowance,
        principal: Allowance,
        clock: Clock = system_clock,
        sleep: Sleep = system_sleep,
    ) -> None:
        self._service = service
        self._principal = principal
        self._clock = clock
        self._sleep = sleep
        self._services: dict[str, Bucket] = {}
        self._principals: dict[PrincipalKey, Bucket] = {}
        self._exhausted: set[str] = set()  # services waiting in an episode already logged

    def resize(self, service: Allowance, principal: Allowance) -> None:
        """Apply new allowances (a reload); buckets keep what they hold, up to the new size."""
        self._service, self._principal = service, principal
        now = self._clock()
        for bucket in self._services.values():
            bucket.resize(service, now)
        for pair in self._principals.values():
            pair.resize(principal, now)

    def forget(self, service: str) -> None:
        self._services.pop(service, None)
        self._exhausted.discard(service)

    async def spend(self, service: str, principal: PrincipalKey) -> int:
        """Take one call from both buckets, waiting while either is empty: 1 when it
        waited, 0 when the budget had room."""
        now = self._clock()
        own = self._bucket(self._services, service, self._service, now)
        shared = self._bucket(self._principals, principal, self._principal, now)
        own_wait, shared_wait = own.reserve(now), shared.reserve(now)
        wait = max(own_wait, shared_wait)
        if wait <= 0:
            self._exhausted.discard(service)
            return 0
        if service not in self._exhausted:
            self._exhausted.add(service)
            log.warning(
                "upstream.budget_exhausted",
                service=service,
                reason="service" if own_wait >= shared_wait else "principal",
                wait_s=round(wait, 2),
                note="a call budget in [refresh] holds this service's calls to Azure back",
            )
        try:
            await self._sleep(wait)
        except BaseException:
            own.give_back()
            shared.give_back()
            raise
        return 1

    @staticmethod
    def _bucket(buckets: dict[_K, Bucket], key: _K, allowance: Allowance, now: float) -> Bucket:
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = Bucket(allowance, now)
        return bucket
