"""The emulator's own control API under `/_emulator/`, for the CLI and for tests written
in other languages: read call counts, arm and clear faults, take regions down and up,
change token lifetimes, mint federated tokens.

Loopback callers only; it is a test fixture, not part of the emulated cloud. A bad body is
a 400 `{"error": "bad_request", "message": …}` saying what is wrong.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from aiohttp import web

from broker.emulator.context import site_of, state_of
from broker.emulator.faults import Fault, Outage
from broker.emulator.replies import EmulatorError
from broker.emulator.state import FEDERATED_AUDIENCE

_LIFETIME_FIELDS: dict[str, tuple[type, ...]] = {
    "lifetime_s": (int, float),
    "refresh_after_s": (int, float, type(None)),
    "service": (str, type(None)),
    "placement": (str,),
}


def routes() -> list[web.RouteDef]:
    return [
        web.get("/_emulator/calls", calls, name="control.calls"),
        web.get("/_emulator/faults", list_faults, name="control.faults"),
        web.post("/_emulator/faults", add_fault, name="control.add_fault"),
        web.delete("/_emulator/faults", clear_faults, name="control.clear_faults"),
        web.post("/_emulator/regions/{region}/down", region_down, name="control.region_down"),
        web.post("/_emulator/regions/{region}/up", region_up, name="control.region_up"),
        web.post("/_emulator/token-lifetime", token_lifetime, name="control.token_lifetime"),
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
    """`{"faults": [fault…], "regions_down": [{"region", "kind", "status"}…]}`."""
    book = state_of(request).faults
    return web.json_response(
        {
            "faults": [fault.to_json() for fault in book.active()],
            "regions_down": [outage.to_json() for outage in book.outages()],
        }
    )


async def add_fault(request: web.Request) -> web.Response:
    """Arm a fault; the body is `{"route": …}` plus any of `EmulatorState.fail`'s keywords."""
    try:
        fault = Fault.from_json(await request.json())
    except (ValueError, TypeError) as exc:
        raise _control_error(400, str(exc)) from None
    state_of(request).faults.add(fault)
    return web.json_response(fault.to_json(), status=201)


async def clear_faults(request: web.Request) -> web.Response:
    """Drop every fault and end every outage: `{"cleared": n, "regions_restored": […]}`."""
    book = state_of(request).faults
    regions = [outage.region for outage in book.outages()]
    return web.json_response({"cleared": book.clear(), "regions_restored": regions})


async def region_down(request: web.Request) -> web.Response:
    """Take a region down; the optional body is `{"kind"?, "status"?}` (reset, 503)."""
    body = await _body(request, {"kind": (str,), "status": (int,)}, optional=True)
    try:
        outage = Outage(request.match_info["region"], **body)
    except ValueError as exc:
        raise _control_error(400, str(exc)) from None
    state_of(request).faults.darken(outage)
    return web.json_response(outage.to_json())


async def region_up(request: web.Request) -> web.Response:
    """Bring a region back: `{"region", "was_down"}`."""
    region = request.match_info["region"]
    was_down = state_of(request).faults.lighten(region)
    return web.json_response({"region": region, "was_down": was_down})


async def token_lifetime(request: web.Request) -> web.Response:
    """`{"lifetime_s", "refresh_after_s"?, "service"?, "placement"?}`, as
    `EmulatorState.set_token_lifetime`; answers the settings and the services changed."""
    body = await _body(request, _LIFETIME_FIELDS, required=("lifetime_s",))
    try:
        changed = state_of(request).set_token_lifetime(**body)
    except ValueError as exc:
        raise _control_error(400, str(exc)) from None
    if changed == 0 and body.get("service") is not None:
        raise _control_error(400, f"No web service is named {body['service']!r}.")
    return web.json_response({**body, "services_changed": changed})


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


async def _body(
    request: web.Request,
    fields: dict[str, tuple[type, ...]],
    *,
    required: tuple[str, ...] = (),
    optional: bool = False,
) -> dict[str, Any]:
    """The JSON object of the request, its fields checked against `fields`' types."""
    text = await request.text()
    if optional and not text.strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        raise _control_error(400, "The body must be a JSON object.") from None
    if not isinstance(data, dict):
        raise _control_error(400, "The body must be a JSON object.")
    unknown = sorted(set(data) - set(fields))
    missing = [name for name in required if name not in data]
    if unknown or missing:
        detail = f"unknown fields: {', '.join(unknown)}" if unknown else ""
        detail = detail or f"missing fields: {', '.join(missing)}"
        raise _control_error(400, f"The body has {detail}; allowed: {', '.join(fields)}.")
    for name, value in data.items():
        if isinstance(value, bool) or not isinstance(value, fields[name]):
            raise _control_error(400, f"{name} has the wrong type.")
    return data


def _control_error(status: int, message: str) -> EmulatorError:
    return EmulatorError(
        status, {"error": "bad_request" if status == 400 else "forbidden", "message": message}
    )
