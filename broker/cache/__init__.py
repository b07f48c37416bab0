"""Where credentials are kept: refresh policy (pure maths), the store, the refresher, and
the copies made of them: the persisted cache and file sinks."""

from __future__ import annotations

from broker.cache.budget import Allowance, CallBudget
from broker.cache.persist import PersistedCache, fingerprint
from broker.cache.policy import Policy
from broker.cache.refresher import Refresher
from broker.cache.rotation import Rotations
from broker.cache.saver import Saver
from broker.cache.sinks import Sinks
from broker.cache.store import Entry, Reconciled, Store, Wanted

__all__ = [
    "Allowance",
    "CallBudget",
    "Entry",
    "PersistedCache",
    "Policy",
    "Reconciled",
    "Refresher",
    "Rotations",
    "Saver",
    "Sinks",
    "Store",
    "Wanted",
    "fingerprint",
]
