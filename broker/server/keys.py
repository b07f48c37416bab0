"""Typed keys for what the application holds."""

from __future__ import annotations

from aiohttp import web

from broker.cache import Store

STORE = web.AppKey("store", Store)
