"""Emulated ARM routes of Azure ML v2 managed online endpoints: describe an endpoint,
issue its AMLToken, list and rotate its keys, and poll the rotation's ARM operation.

Every call needs `?api-version=…` and an Entra token for the resource manager, like the
workspace route. Describing needs Reader (or Contributor, Owner); the token, listKeys and
regenerateKeys actions need Contributor, Owner or a grant of that very action, and a 403
names the missing action. Errors use ARM's shape `{"error": {"code", "message"}}`.
"""

from __future__ import annotations

import math
from urllib.parse import quote

from aiohttp import web

from broker.emulator.arm import (
    WORKSPACE_PATH,
    arm_request_caller,
    require_action,
    require_api_version,
    workspace_of,
)
from broker.emulator.callers import Caller, issue_token
from broker.emulator.context import site_of, state_of
from broker.emulator.key_requests import rotation_request
from broker.emulator.records import (
    ENDPOINT_LIST_KEYS_ACTION,
    ENDPOINT_READ_ACTION,
    ENDPOINT_REGENERATE_ACTION,
    ENDPOINT_TOKEN_ACTION,
    PROVIDER,
    OnlineEndpoint,
    Operation,
)
from broker.emulator.replies import arm_error

ENDPOINT_PATH = WORKSPACE_PATH + "/onlineEndpoints/{name}"
OPERATION_PATH = (
    "/subscriptions/{sub}/providers/" + PROVIDER + "/locations/{region}/mfeOperationsStatus"
)
ENDPOINT_TYPE = f"{PROVIDER}/workspaces/onlineEndpoints"
_ARM_STATUS = {"Running": "InProgress", "Succeeded": "Succeeded"}


def routes() -> list[web.RouteDef]:
    return [
        web.get(ENDPOINT_PATH, describe, name="arm.endpoint"),
        web.post(ENDPOINT_PATH + "/token", endpoint_token, name="arm.endpoint_token"),
        web.post(ENDPOINT_PATH + "/listKeys", list_keys, name="arm.endpoint_keys"),
        web.post(
            ENDPOINT_PATH + "/regenerateKeys", regenerate_keys, name="arm.endpoint_regenerate"
        ),
        web.get(OPERATION_PATH + "/{operation}", operation_status, name="arm.operation"),
    ]


def scoring_uri(request: web.Request, endpoint: OnlineEndpoint) -> str:
    region_base = site_of(request).region_base(endpoint.workspace.region)
    return f"{region_base}/endpoints/{endpoint.name}/score"


async def describe(request: web.Request) -> web.Response:
    """The endpoint's auth mode and scoring URI."""
    endpoint = _endpoint(request, ENDPOINT_READ_ACTION)[1]
    return web.json_response(
        {
            "id": endpoint.arm_id,
            "name": endpoint.name,
            "type": ENDPOINT_TYPE,
            "location": endpoint.workspace.region,
            "properties": {
                "authMode": endpoint.auth_mode,
                "scoringUri": scoring_uri(request, endpoint),
                "provisioningState": "Succeeded",
            },
        }
    )


async def endpoint_token(request: web.Request) -> web.Response:
    """A fresh AMLToken, with its expiry and refresh times in whole epoch seconds."""
    caller, endpoint = _endpoint(request, ENDPOINT_TOKEN_ACTION)
    _require_mode(endpoint, "AMLToken")
    access_token, issued_at, expires_at = issue_token(request, caller, endpoint, "onlineEndpoints")
    return web.json_response(
        {
            "accessToken": access_token,
            "tokenType": "Bearer",
            "expiryTimeUtc": expires_at,
            "refreshAfterTimeUtc": math.floor(issued_at + endpoint.refresh_after_s),
        }
    )


async def list_keys(request: web.Request) -> web.Response:
    """The endpoint's current keys, when its auth mode is Key."""
    endpoint = _endpoint(request, ENDPOINT_LIST_KEYS_ACTION)[1]
    _require_mode(endpoint, "Key")
    return web.json_response(
        {"primaryKey": endpoint.primary_key, "secondaryKey": endpoint.secondary_key}
    )


async def regenerate_keys(request: web.Request) -> web.Response:
    """Start rotating one key: 202 and the operation to poll; the old key stays valid until
    the operation succeeds."""
    endpoint = _endpoint(request, ENDPOINT_REGENERATE_ACTION)[1]
    _require_mode(endpoint, "Key")
    key_type, value = await rotation_request(request, arm_error)
    operation = state_of(request).start_key_rotation(endpoint, key_type, value)
    url = _operation_url(request, endpoint, operation)
    return web.Response(status=202, headers={"Azure-AsyncOperation": url, "Location": url})


async def operation_status(request: web.Request) -> web.Response:
    """One poll of a key rotation: `InProgress` first, then `Succeeded`."""
    require_api_version(request)
    arm_request_caller(request)
    info = request.match_info
    state = state_of(request)
    operation = state.operation(info["operation"])
    target = operation.service if operation is not None else None
    if (
        operation is None
        or not isinstance(target, OnlineEndpoint)
        or target.workspace.subscription_id.lower() != info["sub"].lower()
        or target.workspace.region.lower() != info["region"].lower()
    ):
        raise arm_error(404, "NotFound", f"The operation '{info['operation']}' was not found.")
    return web.json_response({"status": _ARM_STATUS[state.poll_operation(operation).state]})


def _endpoint(request: web.Request, action: str) -> tuple[Caller, OnlineEndpoint]:
    """The caller and the endpoint of the path, after ARM's checks in ARM's order: 400
    without api-version, 401, 404 for the workspace, 403 without `action` on the
    endpoint's scope, then 404 for the endpoint."""
    require_api_version(request)
    caller = arm_request_caller(request)
    ws = workspace_of(request)
    name = request.match_info["name"]
    require_action(request, caller, ws, action, f"{ws.arm_id}/onlineEndpoints/{name}")
    endpoint = state_of(request).online_endpoint(
        ws.subscription_id, ws.resource_group, ws.name, name
    )
    if endpoint is None:
        raise arm_error(
            404,
            "ResourceNotFound",
            f"The Resource '{ENDPOINT_TYPE}/{name}' under resource group "
            f"'{ws.resource_group}' was not found.",
        )
    return caller, endpoint


def _require_mode(endpoint: OnlineEndpoint, mode: str) -> None:
    if endpoint.auth_mode != mode:
        raise arm_error(
            400,
            "BadRequest",
            f"This operation needs an endpoint with authMode '{mode}'; online endpoint "
            f"'{endpoint.name}' has authMode '{endpoint.auth_mode}'.",
        )


def _operation_url(request: web.Request, endpoint: OnlineEndpoint, operation: Operation) -> str:
    ws = endpoint.workspace
    path = OPERATION_PATH.format(sub=ws.subscription_id, region=ws.region)
    version = quote(require_api_version(request), safe="")
    return f"{site_of(request).base_url}{path}/{operation.id}?api-version={version}"
