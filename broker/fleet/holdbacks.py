"""A 429's hold-back shared by the fleet: one broker throttled holds every broker back.

Azure throttles per principal and subscription, whichever broker calls: when one is
answered 429, the others would each earn their own. So the broker that got it writes the
hold-back to Redis with a TTL of its `Retry-After` (Redis's clock, as leases: the hosts'
clocks need not agree), and every broker reads it before calling Azure for that pair.
A longer hold is never shortened by a shorter one.

The key names no principal or subscription (a digest, `naming.holdback_key`) and the
value is only "429": a hold-back is no secret, and a reader of Redis learns no more than
that some principal of the fleet was throttled. A writer to Redis can hold a principal
back (as it could delete every entry); it cannot make a broker call Azure sooner than
its own hold-back allows.

Redis is not on any request path here either: these are read before upstream calls only,
bounded as every fleet command, and skipped while the fleet is known to be down.
"""

from __future__ import annotations

from broker.errors import FleetUnavailableError
from broker.fleet.naming import holdback_key
from broker.fleet.shared import Fleet
from broker.log import get_logger

log = get_logger("broker.fleet")

HoldKey = tuple[str, str]  # (principal, subscription), as the providers' ThrottleKey


class HoldBacks:
    """The fleet's hold-backs, for `broker.providers.Throttles` (its `SharedHoldBacks`)."""

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet

    def __repr__(self) -> str:
        return f"HoldBacks({self._fleet!r})"

    async def held_for(self, key: HoldKey) -> float | None:
        """Seconds left of the fleet's hold-back of the pair, or None (none, or Redis
        cannot tell now)."""
        if self._fleet.healthy is False:
            return None  # refreshing alone: the fleet's subscriber says when it is back
        name = holdback_key(self._fleet.prefix, *key)
        try:
            left_ms = await self._fleet.command(self._fleet.connection.held_ms(name))
        except FleetUnavailableError:
            return None
        return None if left_ms is None else left_ms / 1000

    async def hold(self, key: HoldKey, seconds: float) -> None:
        """Hold the pair back for every broker for `seconds` (never raises)."""
        if self._fleet.healthy is False:
            return
        name = holdback_key(self._fleet.prefix, *key)
        try:
            held = await self._fleet.command(self._fleet.connection.hold(name, seconds, "429"))
        except FleetUnavailableError:
            return
        log.info(
            "fleet.held_back",
            principal=key[0],
            subscription=key[1],
            hold_s=round(seconds, 1),
            shared=held,
        )
