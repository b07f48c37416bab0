"""The seam between the store and a fleet of brokers sharing their credentials.

The store asks `SharedCredentials` only when a service is due or starts: never while
serving a request. Each call is bounded; `FleetUnavailableError` means the fleet cannot
be used now, and the store then refreshes on its own, exactly as without a fleet.
`broker.fleet.Fleet` is the implementation (Redis); the daemon hands it to the store.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from broker.saved_credentials import Saved


class Lease(Protocol):
    """The right to refresh one service for the whole fleet, while `held`."""

    @property
    def held(self) -> bool: ...

    async def release(self) -> None:
        """Give the lease up (never raises)."""


class SharedCredentials(Protocol):
    """The credentials a fleet shares, by service name."""

    @property
    def lease_s(self) -> float:
        """How long a lease outlives its holder's last renewal."""

    @property
    def poll_s(self) -> float:
        """How often a broker waiting on another's lease looks again, notice or not."""

    @property
    def health(self) -> str:
        """`up`, `down` or `unknown`, for status."""

    async def read(self, service: str) -> Saved | None:
        """The fleet's credential of `service`, if one opens; `FleetUnavailableError`."""

    async def lease(self, service: str) -> Lease | None:
        """The service's lease, or None while another broker holds it;
        `FleetUnavailableError`."""

    async def write(self, service: str, saved: Saved, ttl_s: float) -> bool:
        """Share `saved` for `ttl_s` if it is newer than the fleet's (never raises)."""

    async def wait(self, service: str, timeout_s: float) -> None:
        """Return at the next notice about `service`, or after `timeout_s`."""

    def on_notice(self, listener: Callable[[str], None]) -> None:
        """Call `listener` with a service's name when another broker shares it anew."""
