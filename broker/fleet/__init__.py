"""Fleet mode: brokers on many hosts share one refresh per service through Redis.

    naming.py      the Redis keys of a service: its entry, its lease, its notices
    sealing.py     entries sealed with AES-256-GCM, bound to their key and version

This is the only package that imports `redis`; redis-py's exceptions are translated
into `FleetUnavailableError` where they enter, and nothing above sees them.
"""

from __future__ import annotations

from broker.fleet.naming import ServiceKeys
from broker.fleet.sealing import Sealer, UnreadableEntry, stamp_of

__all__ = ["Sealer", "ServiceKeys", "UnreadableEntry", "stamp_of"]
