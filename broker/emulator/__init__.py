"""A built-in emulator of Entra ID, Azure Resource Manager and Azure ML (MMS v1), served
over real HTTPS, so the broker and its users can test without an Azure account.

    async with Emulator(state=demo_state()) as emu:
        emu.base_url, emu.ca_path, emu.state.count("mms.token")

It imports nothing from the rest of `broker`.
"""

from __future__ import annotations

from broker.emulator.faults import ROUTES, Fault
from broker.emulator.seed import demo_state
from broker.emulator.server import Emulator, run_emulator
from broker.emulator.state import FEDERATED_AUDIENCE, FEDERATED_ISSUER, EmulatorState

__all__ = [
    "FEDERATED_AUDIENCE",
    "FEDERATED_ISSUER",
    "ROUTES",
    "Emulator",
    "EmulatorState",
    "Fault",
    "demo_state",
    "run_emulator",
]
