"""Where credentials are kept: refresh policy (pure maths), the store, the refresher."""

from __future__ import annotations

from broker.cache.policy import Policy
from broker.cache.refresher import Refresher
from broker.cache.store import Entry, Store

__all__ = ["Entry", "Policy", "Refresher", "Store"]
