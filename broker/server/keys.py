"""Typed keys for what the application holds."""

from __future__ import annotations

from aiohttp import web

from broker.cache import Store
from broker.key_rotation import KeyRotations
from broker.server.access_rules import AccessRules
from broker.server.connections import Connections

STORE = web.AppKey("store", Store)
ACCESS = web.AppKey("access", AccessRules)
ROTATIONS = web.AppKey("rotations", KeyRotations)
CONNECTIONS = web.AppKey("connections", Connections)
