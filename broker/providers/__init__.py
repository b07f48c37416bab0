"""What we fetch: one module per upstream kind, and `upstream` where HTTP errors are translated."""

from __future__ import annotations

from broker.providers.azureml_v1 import WebServiceProvider, Workspaces
from broker.providers.azureml_v2 import OnlineEndpointProvider
from broker.providers.base import KeyName, KeyRotator, RestoresScoringUri, TokenProvider
from broker.providers.entra import EntraProvider
from broker.providers.facts import Facts, SharedFacts
from broker.providers.throttle import SharedHoldBacks, Throttles
from broker.providers.upstream import Upstream

__all__ = [
    "EntraProvider",
    "Facts",
    "KeyName",
    "KeyRotator",
    "OnlineEndpointProvider",
    "RestoresScoringUri",
    "SharedFacts",
    "SharedHoldBacks",
    "Throttles",
    "TokenProvider",
    "Upstream",
    "WebServiceProvider",
    "Workspaces",
]
