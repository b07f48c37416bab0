"""Azure ML v1 web services (AKS and ACI deployments): tokens and keys from MMS.

First contact finds the workspace's regional Model Management Service (from the
configured region, or through ARM and the workspace's discovery URL) and describes
the service to learn its compute type and auth modes; both are cached, and shared with
the fleet in fleet mode (`broker.providers.facts`). Then each fetch is one
`POST …/token` or `POST …/listkeys` with the principal's ARM token.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from broker.config import CloudProfile, WebServiceConfig
from broker.credentials import Credential
from broker.credentials.jwt_claims import JwtTimes, jwt_times
from broker.errors import (
    MalformedResponseError,
    UnsupportedAuthError,
    UpstreamError,
)
from broker.log import get_logger, register_secret
from broker.models import AccessToken, AuthKind
from broker.providers.azure_calls import AzureCalls
from broker.providers.base import KeyName
from broker.providers.facts import Fact, FactName, Facts, text
from broker.providers.long_running import wait_for_regeneration
from broker.providers.throttle import Throttles
from broker.providers.upstream import Reply, Upstream

log = get_logger("broker.providers.azureml_v1")

API_VERSION = "2024-04-01"
_WORKSPACE = (
    "/subscriptions/{sub}/resourceGroups/{rg}"
    "/providers/Microsoft.MachineLearningServices/workspaces/{ws}"
)


@dataclass(frozen=True, slots=True)
class Description:
    """What `describe` told us about a web service."""

    compute_type: str
    auth_enabled: bool
    aad_auth_enabled: bool
    scoring_uri: str | None

    @classmethod
    def parse(cls, body: Any, service: str) -> Description:
        if not isinstance(body, dict) or not isinstance(body.get("computeType"), str):
            raise MalformedResponseError(
                f"mms.describe: the description of {service!r} lacks computeType",
                route="mms.describe",
            )
        uri = body.get("scoringUri")
        return cls(
            compute_type=body["computeType"],
            auth_enabled=body.get("authEnabled") is True,
            aad_auth_enabled=body.get("aadAuthEnabled") is True,
            scoring_uri=uri if isinstance(uri, str) else None,
        )


def choose_auth(config: WebServiceConfig, desc: Description) -> AuthKind:
    """Token or key, by the configuration and Azure's rules for web services."""
    where = f"web service {config.web_service!r} in workspace {config.workspace!r}"
    if desc.auth_enabled and desc.aad_auth_enabled:
        raise UnsupportedAuthError(
            f"{where} has both key and token auth enabled; Azure ML allows only one "
            "(token auth and key auth cannot both be enabled) — disable one on the service"
        )
    wants_token = config.auth == "token" or (config.auth == "auto" and desc.aad_auth_enabled)
    if wants_token:
        if desc.compute_type.upper() != "AKS":
            raise UnsupportedAuthError(
                f"{where} runs on {desc.compute_type}; token auth exists only for AKS "
                'deployments (ACI does not support it) — set auth = "key" and enable keys'
            )
        if not desc.aad_auth_enabled:
            raise UnsupportedAuthError(
                f"{where} does not have token auth enabled — enable it "
                '(token_auth_enabled=True) or set auth = "key"'
            )
        return AuthKind.TOKEN
    if not desc.auth_enabled:
        raise UnsupportedAuthError(
            f"{where} has key auth disabled"
            + (" (the ACI default)" if desc.compute_type.upper() == "ACI" else "")
            + " — enable it (auth_enabled=True) or use token auth on AKS"
        )
    return AuthKind.KEY


WorkspaceKey = tuple[str, str, str]


class Workspaces:
    """Each workspace's regional MMS base URL, discovered once and shared by its services."""

    def __init__(self) -> None:
        self._bases: dict[WorkspaceKey, asyncio.Task[str]] = {}

    async def mms_base(
        self, key: WorkspaceKey, discover: Callable[[], Coroutine[Any, Any, str]]
    ) -> str:
        task = self._bases.get(key)
        if task is None or (task.done() and task.exception() is not None):
            task = self._bases[key] = asyncio.create_task(discover())
        return await asyncio.shield(task)


class WebServiceProvider:
    """Fetches one v1 web service's token or key."""

    has_scoring_host = True

    def __init__(
        self,
        config: WebServiceConfig,
        cloud: CloudProfile,
        credential: Credential,
        upstream: Upstream,
        workspaces: Workspaces | None = None,
        throttles: Throttles | None = None,
        facts: Facts | None = None,
    ) -> None:
        self._config = config
        self._cloud = cloud
        self._credential = credential
        self._upstream = upstream
        self._workspaces = workspaces or Workspaces()
        self._facts = facts or Facts()
        self._recall = True  # take the fleet's description, until Azure says it is stale
        self._calls = AzureCalls(
            config.name,
            upstream,
            throttles or Throttles(),
            credential.principal,
            config.subscription_id,
            lambda _: (
                f"the Reader role on workspace {config.workspace!r} (resource group "
                f"{config.resource_group!r}) — grant Reader on the workspace"
            ),
        )
        self.serve_key: KeyName = "primary"  # which key a key service hands out
        self._mms_base: str | None = None
        self._description: Description | None = None
        self._restored_scoring_uri: str | None = None  # from the persisted cache
        self.auth: AuthKind | None = None

    @property
    def service(self) -> str:
        return self._config.name

    @property
    def scoring_uri(self) -> str | None:
        if self._description is not None:
            return self._description.scoring_uri
        return self._restored_scoring_uri

    def restore_scoring_uri(self, uri: str) -> None:
        """Serve `uri`, saved before a restart, until the service is described again."""
        self._restored_scoring_uri = uri

    async def fetch(self) -> AccessToken:
        arm_token = await self._arm_bearer()
        auth = await self._auth(arm_token)
        if auth is AuthKind.TOKEN:
            return await self._token(arm_token)
        return await self._keys(arm_token)

    async def _auth(self, arm_token: str) -> AuthKind:
        if self.auth is None:
            source = "fleet"
            description = await self._recalled_description() if self._recall else None
            if description is None:
                source = "azure"
                description = await self._describe(arm_token)
                await self._facts.remember(self._fact_name("webservice"), _fact_of(description))
            self._description = description
            self.auth = choose_auth(self._config, description)
            log.info(
                "service.described",
                service=self.service,
                compute_type=description.compute_type,
                auth=self.auth.value,
                source=source,
            )
        return self.auth

    async def _recalled_description(self) -> Description | None:
        fact = await self._facts.recall(self._fact_name("webservice"))
        if fact is None:
            return None
        try:
            return Description.parse(fact, self.service)
        except MalformedResponseError:
            return None  # not what this broker would have written: describe it ourselves

    def _fact_name(self, kind: str) -> FactName:
        """What a shared fact is about: this service ("webservice") or its workspace."""
        c = self._config
        parts: tuple[str, ...] = (
            self._cloud.resource_manager,
            c.subscription_id,
            c.resource_group,
            c.workspace,
        )
        if kind == "webservice":
            parts = (*parts, c.web_service)
        return (kind, *(part.lower() for part in parts))

    def _workspace_path(self) -> str:
        c = self._config
        return _WORKSPACE.format(sub=c.subscription_id, rg=c.resource_group, ws=c.workspace)

    async def _service_url(self, arm_token: str) -> str:
        if self._mms_base is None:
            c = self._config
            key = (c.subscription_id.lower(), c.resource_group.lower(), c.workspace.lower())
            self._mms_base = await self._workspaces.mms_base(key, lambda: self._find_mms(arm_token))
        return (
            f"{self._mms_base}/modelmanagement/v1.0{self._workspace_path()}"
            f"/services/{self._config.web_service}"
        )

    async def _find_mms(self, arm_token: str) -> str:
        if self._config.region:
            return self._cloud.region_base(self._config.region)
        recalled = text(await self._facts.recall(self._fact_name("workspace")), "mms")
        if recalled is not None and recalled.startswith("https://"):
            log.info("workspace.discovered", service=self.service, mms=recalled, source="fleet")
            return recalled
        url = (
            f"{self._cloud.resource_manager.rstrip('/')}{self._workspace_path()}"
            f"?api-version={API_VERSION}"
        )
        workspace = await self._call("GET", url, "arm.workspace", arm_token)
        discovery_url = _field(workspace.body, ("properties", "discoveryUrl"), "arm.workspace")
        discovery = await self._call("GET", discovery_url, "discovery", None)
        base = _field(discovery.body, ("modelmanagement",), "discovery").rstrip("/")
        log.info("workspace.discovered", service=self.service, mms=base, source="azure")
        await self._facts.remember(self._fact_name("workspace"), {"mms": base})
        return base

    async def _describe(self, arm_token: str) -> Description:
        reply = await self._call(
            "GET", await self._service_url(arm_token), "mms.describe", arm_token
        )
        return Description.parse(reply.body, self.service)

    async def _token(self, arm_token: str) -> AccessToken:
        url = await self._service_url(arm_token) + "/token"
        reply = await self._call("POST", url, "mms.token", arm_token)
        return parse_token(reply.body, skew_s=self._calls.skew_to_apply())

    async def _keys(self, arm_token: str) -> AccessToken:
        url = await self._service_url(arm_token) + "/listkeys"
        reply = await self._call("POST", url, "mms.listkeys", arm_token)
        return parse_keys(reply.body, self.serve_key, route="mms.listkeys")

    async def regenerate(
        self, which: KeyName, *, poll_s: float = 2.0, within_s: float = 600.0
    ) -> None:
        """Regenerate one key through MMS and wait for the operation to end.

        Raises `KeyRotationError` with Azure's error when the operation ends `Failed`,
        `Cancelled` or `TimedOut`, and `UnavailableError` when it outlasts `within_s`.
        """
        arm_token = await self._arm_bearer()
        url = await self._service_url(arm_token) + "/regenerateKeys"
        body = {"keyType": which.capitalize(), "keyValue": None}
        reply = await self._call("POST", url, "mms.regenerate", arm_token, json_body=body)
        location = reply.headers.get("Operation-Location")
        if location is None:
            return  # answered at once: nothing to wait for
        await wait_for_regeneration(
            self._call,
            self._arm_bearer,
            location,
            lambda reply: reply.body.get("state") if isinstance(reply.body, dict) else None,
            service=self.service,
            which=which,
            route="mms.operation",
            poll_s=poll_s,
            within_s=within_s,
            clock=self._calls.clock,
        )

    async def _arm_bearer(self) -> str:
        return (await self._calls.sign_in(self._credential, self._cloud.arm_scope)).value

    @property
    def clock_skew_s(self) -> float | None:
        return self._calls.clock_skew_s

    async def _call(
        self,
        method: str,
        url: str,
        route: str,
        bearer: str | None,
        json_body: object = None,
    ) -> Reply:
        try:
            return await self._calls.call(
                method, url, route, bearer, what=self._role_hint(route), json_body=json_body
            )
        except UpstreamError as exc:
            if self._description is not None and exc.status == 404:
                self.auth = None  # the service may have been redeployed: describe again,
                self._recall = False  # from Azure (the fleet's description may be as stale)
            raise

    def _role_hint(self, route: str) -> str:
        if route.startswith("mms.") or route == "arm.workspace":
            return f"service {self.service!r}"
        return ""


def _fact_of(description: Description) -> Fact:
    """A description as the fleet shares it: in Azure's own fields, parsed the same way."""
    fact: Fact = {
        "computeType": description.compute_type,
        "authEnabled": description.auth_enabled,
        "aadAuthEnabled": description.aad_auth_enabled,
    }
    if description.scoring_uri is not None:
        fact["scoringUri"] = description.scoring_uri
    return fact


def parse_keys(body: Any, which: KeyName, *, route: str) -> AccessToken:
    """The `which` key from a `{primaryKey, secondaryKey}` answer (v1 and v2 alike).

    Both keys are registered as secrets, so neither can be printed, whichever is served.
    """
    keys = body if isinstance(body, dict) else {}
    for field in ("primaryKey", "secondaryKey"):
        if isinstance(keys.get(field), str) and keys[field]:
            register_secret(keys[field])
    value = keys.get(f"{which}Key")
    if not isinstance(value, str) or not value.strip():
        raise MalformedResponseError(f"{route}: the answer has no {which}Key", route=route)
    return _valid(lambda: AccessToken(value, AuthKind.KEY, None), route)


def parse_token(
    body: Any,
    skew_s: float = 0.0,
    *,
    route: str = "mms.token",
    expiry_field: str = "expiryOn",
    refresh_field: str = "refreshAfter",
) -> AccessToken:
    """A token from Azure ML's answer, or `MalformedResponseError`; never half of one.

    v1 web services name the times `expiryOn`/`refreshAfter`, v2 endpoints
    `expiryTimeUtc`/`refreshAfterTimeUtc`. Azure's times are moved onto our clock by
    `skew_s` (Azure's clock minus ours), so a token is never served past its real expiry
    when the local clock is behind.
    """
    if not isinstance(body, dict):
        raise MalformedResponseError(f"{route}: the answer is not a JSON object", route=route)
    value = body.get("accessToken")
    if not isinstance(value, str) or not value.strip():
        raise MalformedResponseError(f"{route}: the answer has no accessToken", route=route)
    register_secret(value)
    times = jwt_times(value) or JwtTimes()
    expiry = _epoch(body.get(expiry_field))
    if expiry is None or (times.expires is not None and times.expires < expiry):
        expiry = times.expires  # the earlier of the two is when the token really dies
    if expiry is None:
        raise MalformedResponseError(
            f"{route}: the answer has no usable {expiry_field}", route=route
        )
    refresh = _epoch(body.get(refresh_field))
    token_type = body.get("tokenType") if isinstance(body.get("tokenType"), str) else "Bearer"
    return _valid(
        lambda: AccessToken(
            value,
            AuthKind.TOKEN,
            expiry - skew_s,
            _moved(refresh, skew_s),
            str(token_type),
            issued_at=_moved(times.issued_at, skew_s),
            not_before=_moved(times.not_before, skew_s),
        ),
        route,
    )


def _moved(when: float | None, skew_s: float) -> float | None:
    """An Azure time moved onto the broker's clock."""
    return None if when is None else when - skew_s


def _valid(build: Callable[[], AccessToken], route: str) -> AccessToken:
    try:
        token: AccessToken = build()
    except ValueError as exc:
        raise MalformedResponseError(f"{route}: {exc}", route=route) from None
    return token


def _epoch(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and number > 0 else None


def _field(body: Any, path: tuple[str, ...], route: str) -> str:
    node = body
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, str) or not node:
        raise MalformedResponseError(f"{route}: the answer lacks {'.'.join(path)}", route=route)
    return node
