"""What every handler reads from the aiohttp app: the state, the site's own address, and
the event that tells waiting handlers (hung or slowed by a fault) the emulator is stopping."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import web

from broker.emulator.state import EmulatorState


@dataclass(slots=True)
class Site:
    """The emulator's own address, filled in once its socket is bound."""

    base_url: str = ""
    ca_path: str = ""

    def region_base(self, region: str) -> str:
        return f"{self.base_url}/regions/{region}"


STATE_KEY = web.AppKey("emulator_state", EmulatorState)
SITE_KEY = web.AppKey("emulator_site", Site)
STOPPING_KEY = web.AppKey("emulator_stopping", asyncio.Event)


def state_of(request: web.Request) -> EmulatorState:
    return request.app[STATE_KEY]


def site_of(request: web.Request) -> Site:
    return request.app[SITE_KEY]


def stopping_of(request: web.Request) -> asyncio.Event:
    return request.app[STOPPING_KEY]
