"""Typed keys for what the application holds."""

from __future__ import annotations

from aiohttp import web

from broker.cache import Rotations, Store
from broker.server.access import AccessRules
from broker.server.connections import Connections

STORE = web.AppKey("store", Store)
ACCESS = web.AppKey("access", AccessRules)
ROTATIONS = web.AppKey("rotations", Rotations)
CONNECTIONS = web.AppKey("connections", Connections)
