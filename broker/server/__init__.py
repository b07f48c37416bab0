"""Who we serve: the local API over a Unix socket and loopback TCP."""

from __future__ import annotations

from broker.server.access_rules import AccessRules
from broker.server.app import make_app
from broker.server.listeners import AlreadyRunningError, ListenError, Listeners

__all__ = ["AccessRules", "AlreadyRunningError", "ListenError", "Listeners", "make_app"]
