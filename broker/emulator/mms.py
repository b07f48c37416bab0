"""Emulated Azure ML Model Management Service (MMS) v1: describe a web service, issue
its token, list and rotate its keys, and poll rotation operations.

Every call needs an Entra token for the resource manager and Reader (or Contributor,
Owner) on the workspace. Errors use MMS's flat shape `{"code", "statusCode", "message"}`.
"""

from __future__ import annotations

from aiohttp import web

from broker.emulator.arm import WORKSPACE_PATH
from broker.emulator.callers import Caller, TokenRejected, arm_caller, issue_token
from broker.emulator.context import site_of, state_of
from broker.emulator.key_requests import rotation_request
from broker.emulator.records import Operation, WebService, Workspace
from broker.emulator.replies import mms_error

PREFIX = "/regions/{region}/modelmanagement/v1.0" + WORKSPACE_PATH
SERVICE = PREFIX + "/services/{name}"


def routes() -> list[web.RouteDef]:
    return [
        web.get(SERVICE, describe, name="mms.describe"),
        web.post(SERVICE + "/token", service_token, name="mms.token"),
        web.post(SERVICE + "/listkeys", list_keys, name="mms.listkeys"),
        web.post(SERVICE + "/regenerateKeys", regenerate_keys, name="mms.regenerate"),
        web.get(PREFIX + "/operations/{operation}", operation_status, name="mms.operation"),
    ]


def scoring_uri(request: web.Request, service: WebService) -> str:
    ws = service.workspace
    # Shaped like an AKS scoring URI (…/api/v1/service/{name}/score), with the workspace
    # ahead of it since service names are unique only per workspace.
    base = site_of(request).region_base(ws.region)
    return f"{base}/workspaces/{ws.name}/api/v1/service/{service.name}/score"


async def describe(request: web.Request) -> web.Response:
    """The service's compute type, auth modes and scoring URI."""
    _, service = _service(request)
    return web.json_response(
        {
            "id": service.service_id,
            "name": service.name,
            "computeType": service.compute_type,
            "state": "Healthy",
            "scoringUri": scoring_uri(request, service),
            "authEnabled": service.auth_enabled,
            "aadAuthEnabled": service.aad_auth_enabled,
        }
    )


async def service_token(request: web.Request) -> web.Response:
    """A fresh token for an AKS service with token auth, with its refresh and expiry times."""
    caller, service = _service(request)
    if not service.supports_token:
        raise mms_error(
            400,
            "BadRequest",
            f"Token authentication is only available for AKS services with aadAuthEnabled; "
            f"service '{service.name}' is {service.compute_type} with "
            f"aadAuthEnabled={str(service.aad_auth_enabled).lower()}.",
        )
    access_token, issued_at, expires_at = issue_token(request, caller, service, "modelmanagement")
    body: dict[str, object] = {"accessToken": access_token, "tokenType": "Bearer"}
    refresh_after = service.refresh_after(issued_at, expires_at)
    if refresh_after is not None:
        body["refreshAfter"] = refresh_after
    body["expiryOn"] = expires_at
    return web.json_response(body)


async def list_keys(request: web.Request) -> web.Response:
    """The service's current keys, when key auth is on."""
    _, service = _service(request)
    _require_key_auth(service)
    return web.json_response(
        {"primaryKey": service.primary_key, "secondaryKey": service.secondary_key}
    )


async def regenerate_keys(request: web.Request) -> web.Response:
    """Start rotating one key; the old key stays valid until the operation succeeds."""
    _, service = _service(request)
    _require_key_auth(service)
    key_type, value = await rotation_request(request, mms_error)
    operation = state_of(request).start_key_rotation(service, key_type, value)
    location = f"{_prefix_url(request, service.workspace)}/operations/{operation.id}"
    return web.Response(status=202, headers={"Operation-Location": location})


async def operation_status(request: web.Request) -> web.Response:
    """One poll of a rotation: `Running` first, then `Succeeded`."""
    _, ws = _workspace(request)
    state = state_of(request)
    operation = state.operation(request.match_info["operation"])
    if (
        operation is None
        or not isinstance(operation.service, WebService)
        or operation.service.workspace is not ws
    ):
        raise mms_error(404, "NotFound", "Operation not found.")
    return web.json_response(_operation_body(state.poll_operation(operation)))


def _operation_body(operation: Operation) -> dict[str, object]:
    return {
        "id": operation.id,
        "state": operation.state,
        "operationType": "RegenerateKeys",
        "resourceLocation": f"/services/{operation.service.name}",
    }


def _workspace(request: web.Request) -> tuple[Caller, Workspace]:
    try:
        caller = arm_caller(request)
    except TokenRejected as exc:
        raise mms_error(401, "Unauthorized", str(exc)) from None
    info = request.match_info
    ws = state_of(request).workspace(info["sub"], info["rg"], info["ws"])
    if ws is None or ws.region.lower() != info["region"].lower():
        raise mms_error(
            404, "NotFound", f"Workspace '{info['ws']}' not found in region '{info['region']}'."
        )
    if not state_of(request).may_read(caller.app_id, ws):
        raise mms_error(
            403,
            "Forbidden",
            f"The client '{caller.app_id}' does not have authorization to perform action "
            f"'Microsoft.MachineLearningServices/workspaces/read' on workspace '{ws.name}'.",
        )
    return caller, ws


def _service(request: web.Request) -> tuple[Caller, WebService]:
    caller, ws = _workspace(request)
    name = request.match_info["name"]
    service = state_of(request).web_service(ws.subscription_id, ws.resource_group, ws.name, name)
    if service is None:
        raise mms_error(404, "NotFound", f"Service '{name}' not found in workspace '{ws.name}'.")
    return caller, service


def _require_key_auth(service: WebService) -> None:
    if not service.auth_enabled:
        raise mms_error(
            400,
            "BadRequest",
            f"Key authentication is not enabled for service '{service.name}' (authEnabled=false).",
        )


def _prefix_url(request: web.Request, ws: Workspace) -> str:
    return f"{site_of(request).region_base(ws.region)}/modelmanagement/v1.0{ws.arm_id}"
