"""What we fetch: one module per upstream kind, and `upstream` where HTTP errors are translated."""

from __future__ import annotations

from broker.providers.azureml_v1 import WebServiceProvider, Workspaces
from broker.providers.azureml_v2 import OnlineEndpointProvider
from broker.providers.base import KeyName, KeyRotator, RestoresScoringUri, TokenProvider
from broker.providers.entra import EntraProvider
from broker.providers.throttle import Throttles
from broker.providers.upstream import Upstream

__all__ = [
    "EntraProvider",
    "KeyName",
    "KeyRotator",
    "OnlineEndpointProvider",
    "RestoresScoringUri",
    "Throttles",
    "TokenProvider",
    "Upstream",
    "WebServiceProvider",
    "Workspaces",
]
