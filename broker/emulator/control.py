"""The emulator's own control API under `/_emulator/`, for the CLI and for tests written
in other languages: read call counts, arm and clear faults, mint federated tokens.

Loopback callers only; it is a test fixture, not part of the emulated cloud.
"""

from __future__ import annotations

import ipaddress

from aiohttp import web

from broker.emulator.context import site_of, state_of
from broker.emulator.faults import Fault
from broker.emulator.replies import EmulatorError
from broker.emulator.state import FEDERATED_AUDIENCE


def routes() -> list[web.RouteDef]:
    return [
        web.get("/_emulator/calls", calls, name="control.calls"),
        web.get("/_emulator/faults", list_faults, name="control.faults"),
        web.post("/_emulator/faults", add_fault, name="control.add_fault"),
        web.delete("/_emulator/faults", clear_faults, name="control.clear_faults"),
        web.get("/_emulator/info", info, name="control.info"),
        web.post("/_emulator/federated-token", federated_token, name="control.federated_token"),
    ]


def require_loopback(request: web.Request) -> None:
    try:
        loopback = ipaddress.ip_address(request.remote or "").is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise _control_error(403, "The emulator's control API answers loopback clients only.")


async def calls(request: web.Request) -> web.Response:
    """`{"calls": {route: n}, "by_service": {route: {service: n}}}`."""
    state = state_of(request)
    return web.json_response({"calls": dict(state.calls), "by_service": state.calls_by_service()})


async def list_faults(request: web.Request) -> web.Response:
    faults = state_of(request).faults.active()
    return web.json_response({"faults": [fault.to_json() for fault in faults]})


async def add_fault(request: web.Request) -> web.Response:
    """Arm a fault; the body is `{"route": …}` plus any of `EmulatorState.fail`'s keywords."""
    try:
        fault = Fault.from_json(await request.json())
    except (ValueError, TypeError) as exc:
        raise _control_error(400, str(exc)) from None
    state_of(request).faults.add(fault)
    return web.json_response(fault.to_json(), status=201)


async def clear_faults(request: web.Request) -> web.Response:
    return web.json_response({"cleared": state_of(request).faults.clear()})


async def info(request: web.Request) -> web.Response:
    site = site_of(request)
    hosts = {
        "authority_host": site.base_url,
        "resource_manager": site.base_url,
        "region_api": f"{site.base_url}/regions/{{region}}",
    }
    return web.json_response({"base_url": site.base_url, "ca_path": site.ca_path, "hosts": hosts})


async def federated_token(request: web.Request) -> web.Response:
    """`{"subject", "audience"?, "lifetime_s"?}` → `{"token"}` from the federated issuer."""
    try:
        body = await request.json()
        subject = body["subject"]
        audience = body.get("audience", FEDERATED_AUDIENCE)
        lifetime_s = float(body.get("lifetime_s", 3600))
    except (ValueError, TypeError, KeyError, AttributeError):
        raise _control_error(400, 'The body must be {"subject": str}.') from None
    if not isinstance(subject, str) or not isinstance(audience, str):
        raise _control_error(400, "subject and audience must be strings.")
    token = state_of(request).mint_federated_token(
        subject, audience=audience, lifetime_s=lifetime_s
    )
    return web.json_response({"token": token})


def _control_error(status: int, message: str) -> EmulatorError:
    return EmulatorError(
        status, {"error": "bad_request" if status == 400 else "forbidden", "message": message}
    )
