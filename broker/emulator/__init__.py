"""A built-in emulator of Entra ID, Azure Resource Manager and Azure ML (MMS v1 web
services, v2 managed online endpoints), served over real HTTPS, so the broker and its
users can test without an Azure account.

    async with Emulator(state=demo_state()) as emu:
        emu.base_url, emu.ca_path, emu.state.count("mms.token")
        emu.state.fail("mms.token", kind="reset", times=1)
        emu.state.region_down("eastus")

It imports nothing from the rest of `broker`.
"""

from __future__ import annotations

from broker.emulator.faults import KINDS, OUTAGE_KINDS, ROUTES, Fault, Outage
from broker.emulator.records import (
    AUTH_MODES,
    ENDPOINT_LIST_KEYS_ACTION,
    ENDPOINT_READ_ACTION,
    ENDPOINT_REGENERATE_ACTION,
    ENDPOINT_TOKEN_ACTION,
    PLACEMENTS,
)
from broker.emulator.replies import http_date
from broker.emulator.seed import demo_state
from broker.emulator.server import Emulator, run_emulator
from broker.emulator.state import FEDERATED_AUDIENCE, FEDERATED_ISSUER, EmulatorState

__all__ = [
    "AUTH_MODES",
    "ENDPOINT_LIST_KEYS_ACTION",
    "ENDPOINT_READ_ACTION",
    "ENDPOINT_REGENERATE_ACTION",
    "ENDPOINT_TOKEN_ACTION",
    "FEDERATED_AUDIENCE",
    "FEDERATED_ISSUER",
    "KINDS",
    "OUTAGE_KINDS",
    "PLACEMENTS",
    "ROUTES",
    "Emulator",
    "EmulatorState",
    "Fault",
    "Outage",
    "demo_state",
    "http_date",
    "run_emulator",
]
