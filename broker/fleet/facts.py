"""Facts the providers learnt of Azure, shared by the fleet: a joining broker needs no
discovery or describe call when another broker has made it.

A workspace's regional MMS and a service's or endpoint's description (compute type, auth
modes, scoring URI) hold no secret, yet they are sealed like credentials (the fleet's key,
AES-256-GCM, bound to their key name): a broker sends its ARM token to the MMS a fact
names and forwards clients to its scoring URI, so a writer to Redis without the key must
not be able to choose them, and a reader learns nothing of the fleet's workspaces.

Each lives `FACT_TTL_S` in Redis: a service redeployed with other auth modes is described
anew by the next broker that needs it within that time, and a broker that describes
writes what it found. One that does not open is ignored (logged once per value).
"""

from __future__ import annotations

from typing import Any

from broker.errors import FleetUnavailableError
from broker.fleet.naming import fact_key
from broker.fleet.sealing import UnreadableEntry
from broker.fleet.shared import Fleet
from broker.log import get_logger

log = get_logger("broker.fleet")

FACT_TTL_S = 3600.0
FactName = tuple[str, ...]  # as the providers' `broker.providers.facts.FactName`


class FleetFacts:
    """The fleet's facts, for `broker.providers.Facts` (its `SharedFacts`)."""

    def __init__(self, fleet: Fleet, ttl_s: float = FACT_TTL_S) -> None:
        self._fleet = fleet
        self._ttl_s = ttl_s
        self._unreadable: dict[str, bytes] = {}  # the last bad value seen, logged once

    def __repr__(self) -> str:
        return f"FleetFacts({self._fleet!r})"

    async def recall(self, name: FactName) -> dict[str, Any] | None:
        """The fact another broker shared under `name`, or None (none, unreadable, or
        Redis cannot tell now)."""
        fleet = self._fleet
        if fleet.healthy is False:
            return None
        key = fact_key(fleet.prefix, name)
        try:
            value = await fleet.command(fleet.connection.get_fact(key))
        except FleetUnavailableError:
            return None
        if value is None:
            return None
        try:
            fact = fleet.sealer.open_fact(key, value)
        except UnreadableEntry as exc:
            if self._unreadable.get(key) != value:
                log.warning("fleet.fact_ignored", fact=name[0], reason=exc.reason)
            self._unreadable[key] = value
            return None
        self._unreadable.pop(key, None)
        return fact

    async def remember(self, name: FactName, fact: dict[str, Any]) -> None:
        """Share `fact` under `name` (never raises)."""
        fleet = self._fleet
        if fleet.healthy is False:
            return
        key = fact_key(fleet.prefix, name)
        value = fleet.sealer.seal_fact(key, fact)
        try:
            await fleet.command(fleet.connection.set_fact(key, value, self._ttl_s))
        except FleetUnavailableError:
            return
        log.debug("fleet.fact_shared", fact=name[0])
