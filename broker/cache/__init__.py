"""Where credentials are kept: refresh policy (pure maths), the store, the refresher, and
the copies made of them: the persisted cache and file sinks."""

from __future__ import annotations

from broker.cache.persist import PersistedCache, fingerprint
from broker.cache.policy import Policy
from broker.cache.refresher import Refresher
from broker.cache.rotation import Rotations
from broker.cache.saver import Saver
from broker.cache.sinks import Sinks
from broker.cache.store import Entry, Store

__all__ = [
    "Entry",
    "PersistedCache",
    "Policy",
    "Refresher",
    "Rotations",
    "Saver",
    "Sinks",
    "Store",
    "fingerprint",
]
