"""Emulated Azure Resource Manager workspace lookup and the regional discovery document,
and the checks every ARM route shares (api-version, Entra token, workspace, permission).

The workspace answers with its region and `properties.discoveryUrl`; discovery maps
service names to the emulator's regional base, where MMS and scoring live.
"""

from __future__ import annotations

from aiohttp import web

from broker.emulator.callers import Caller, TokenRejected, arm_caller
from broker.emulator.context import site_of, state_of
from broker.emulator.records import PROVIDER, Workspace
from broker.emulator.replies import arm_error

WORKSPACE_PATH = (
    "/subscriptions/{sub}/resourceGroups/{rg}/providers/" + PROVIDER + "/workspaces/{ws}"
)
READ_ACTION = f"{PROVIDER}/workspaces/read"


def routes() -> list[web.RouteDef]:
    return [
        web.get(WORKSPACE_PATH, workspace, name="arm.workspace"),
        web.get("/regions/{region}/discovery", discovery, name="discovery"),
    ]


async def workspace(request: web.Request) -> web.Response:
    """`GET` a workspace: 401 without a valid token, 404 unknown, 403 without a role."""
    require_api_version(request)
    caller = arm_request_caller(request)
    ws = workspace_of(request)
    require_action(request, caller, ws, READ_ACTION, ws.arm_id)
    site = site_of(request)
    return web.json_response(
        {
            "id": ws.arm_id,
            "name": ws.name,
            "type": f"{PROVIDER}/workspaces",
            "location": ws.region,
            "properties": {
                "discoveryUrl": f"{site.region_base(ws.region)}/discovery",
                "workspaceId": ws.workspace_id,
                "friendlyName": ws.name,
                "provisioningState": "Succeeded",
            },
        }
    )


async def discovery(request: web.Request) -> web.Response:
    """The regional discovery document: every service of the region at one base URL."""
    base = site_of(request).region_base(request.match_info["region"])
    names = ("api", "modelmanagement", "experimentation", "history", "catalog")
    return web.json_response({name: base for name in names})


def require_api_version(request: web.Request) -> str:
    """The request's api-version; 400 MissingApiVersionParameter without one."""
    version = request.query.get("api-version")
    if not version:
        raise arm_error(
            400,
            "MissingApiVersionParameter",
            "The api-version query parameter (?api-version=) is required for all requests.",
        )
    return version


def arm_request_caller(request: web.Request) -> Caller:
    """The caller; 401 InvalidAuthenticationToken without a valid resource-manager token."""
    try:
        return arm_caller(request)
    except TokenRejected as exc:
        raise arm_error(401, "InvalidAuthenticationToken", str(exc)) from None


def require_action(
    request: web.Request, caller: Caller, ws: Workspace, action: str, scope: str
) -> None:
    """403 AuthorizationFailed, naming `action` and `scope`, unless the caller may act."""
    if not state_of(request).may_perform(caller.app_id, ws, action):
        raise arm_error(
            403,
            "AuthorizationFailed",
            f"The client '{caller.app_id}' with object id '{caller.object_id}' does not have "
            f"authorization to perform action '{action}' over scope '{scope}' "
            "or the scope is invalid.",
        )


def workspace_of(request: web.Request) -> Workspace:
    """The workspace the path names; 404 ResourceNotFound if there is none."""
    info = request.match_info
    ws = state_of(request).workspace(info["sub"], info["rg"], info["ws"])
    if ws is None:
        raise arm_error(
            404,
            "ResourceNotFound",
            f"The Resource '{PROVIDER}/workspaces/{info['ws']}' under resource group "
            f"'{info['rg']}' was not found.",
        )
    return ws
