"""Where credentials are kept: refresh policy (pure maths), the call budget, the store, the
refresher, the persisted cache kept in step with the store, and how a credential is
rendered for handing out."""

from __future__ import annotations

from broker.cache.budget import Allowance, CallBudget
from broker.cache.persist import PersistedCache
from broker.cache.persisted_sync import PersistedSync
from broker.cache.policy import Policy
from broker.cache.refresher import Refresher
from broker.cache.rendering import Rendered
from broker.cache.store import Entry, Reconciled, Store, Wanted

__all__ = [
    "Allowance",
    "CallBudget",
    "Entry",
    "PersistedCache",
    "PersistedSync",
    "Policy",
    "Reconciled",
    "Refresher",
    "Rendered",
    "Store",
    "Wanted",
]
