"""Fleet mode: brokers on many hosts share one refresh per service through Redis.

    naming.py      the Redis keys of a service: its entry, its lease, its notices
    sealing.py     entries sealed with AES-256-GCM, bound to their key and version
    connection.py  redis-py's asyncio client: bounded commands, the lease and write scripts
    shared.py      `Fleet`: read, lease, write and wait for one broker; health, notices
    holdbacks.py   a 429's hold-back for a principal and subscription, the whole fleet's
    facts.py       what the providers learnt of Azure (discovery, describe), sealed too

This is the only package that imports `redis`; redis-py's exceptions are translated
into `FleetUnavailableError` where they enter, and nothing above sees them.
"""

from __future__ import annotations

from broker.fleet.facts import FleetFacts
from broker.fleet.holdbacks import HoldBacks
from broker.fleet.naming import ServiceKeys
from broker.fleet.sealing import Sealer, UnreadableEntry
from broker.fleet.shared import Fleet, FleetLease, FleetObserver

__all__ = [
    "Fleet",
    "FleetFacts",
    "FleetLease",
    "FleetObserver",
    "HoldBacks",
    "Sealer",
    "ServiceKeys",
    "UnreadableEntry",
]
