"""Azure ML v2 managed online endpoints: tokens, keys or Entra tokens, through ARM.

The endpoint is described once to learn its `authMode` and `scoringUri` (shared with the
fleet in fleet mode, `broker.providers.facts`); then each
fetch is `POST …/token` (`AMLToken`), `POST …/listKeys` (`Key`), or the principal's own
Entra token for `https://ml.azure.com/.default` (`AADToken`). Unlike v1, Reader is not
enough: a 403 names the action the principal lacks.
"""

from __future__ import annotations

from broker.config import CloudProfile, OnlineEndpointConfig
from broker.credentials import Credential
from broker.errors import MalformedResponseError
from broker.log import get_logger
from broker.models import AccessToken
from broker.providers.azure_calls import AzureCalls
from broker.providers.azureml_v1 import API_VERSION, parse_keys, parse_token
from broker.providers.base import KeyName
from broker.providers.facts import FactName, Facts, text
from broker.providers.long_running import wait_for_regeneration
from broker.providers.throttle import Throttles
from broker.providers.upstream import Reply, Upstream

log = get_logger("broker.providers.azureml_v2")

ML_SCOPE = "https://ml.azure.com/.default"
_AUTH_MODES = ("AMLToken", "Key", "AADToken")
_ENDPOINTS = "Microsoft.MachineLearningServices/workspaces/onlineEndpoints"
_ACTIONS = {
    "arm.endpoint": f"{_ENDPOINTS}/read",
    "arm.endpoint_token": f"{_ENDPOINTS}/token/action",
    "arm.endpoint_keys": f"{_ENDPOINTS}/listKeys/action",
    "arm.endpoint_regenerate": f"{_ENDPOINTS}/regenerateKeys/action",
    "arm.operation": f"{_ENDPOINTS}/read",
}


class OnlineEndpointProvider:
    """Fetches one v2 online endpoint's credential, whatever its auth mode."""

    has_scoring_host = True

    def __init__(
        self,
        config: OnlineEndpointConfig,
        cloud: CloudProfile,
        credential: Credential,
        upstream: Upstream,
        throttles: Throttles | None = None,
        facts: Facts | None = None,
    ) -> None:
        self._config = config
        self._cloud = cloud
        self._credential = credential
        self._facts = facts or Facts()
        self._calls = AzureCalls(
            config.name,
            upstream,
            throttles or Throttles(),
            credential.principal,
            config.subscription_id,
            lambda route: (
                f"the permission {_ACTIONS[route]} on workspace {config.workspace!r} — "
                "grant a role that includes it (Reader does not)"
            ),
        )
        self.auth_mode: str | None = None
        self.scoring_uri: str | None = None
        self.serve_key: KeyName = "primary"

    @property
    def clock_skew_s(self) -> float | None:
        return self._calls.clock_skew_s

    def restore_scoring_uri(self, uri: str) -> None:
        """Serve `uri`, saved before a restart, until the endpoint is described again."""
        if self.auth_mode is None:
            self.scoring_uri = uri

    @property
    def service(self) -> str:
        return self._config.name

    def _url(self, suffix: str = "") -> str:
        c = self._config
        return (
            f"{self._cloud.resource_manager.rstrip('/')}/subscriptions/{c.subscription_id}"
            f"/resourceGroups/{c.resource_group}/providers/Microsoft.MachineLearningServices"
            f"/workspaces/{c.workspace}/onlineEndpoints/{c.endpoint}{suffix}"
            f"?api-version={API_VERSION}"
        )

    async def fetch(self) -> AccessToken:
        arm_token = await self._arm_bearer()
        if self.auth_mode is None:
            await self._describe(arm_token)
        if self.auth_mode == "AADToken":
            return await self._calls.sign_in(self._credential, ML_SCOPE)
        if self.auth_mode == "AMLToken":
            reply = await self._call("POST", self._url("/token"), "arm.endpoint_token", arm_token)
            return parse_token(
                reply.body,
                self._calls.skew_to_apply(),
                route="arm.endpoint_token",
                expiry_field="expiryTimeUtc",
                refresh_field="refreshAfterTimeUtc",
            )
        reply = await self._call("POST", self._url("/listKeys"), "arm.endpoint_keys", arm_token)
        return parse_keys(reply.body, self.serve_key, route="arm.endpoint_keys")

    async def regenerate(
        self, which: KeyName, *, poll_s: float = 2.0, within_s: float = 600.0
    ) -> None:
        """Regenerate one key of a `Key` endpoint and wait for ARM's operation to end.

        ARM answers 200 when done at once, or 202 with `Azure-AsyncOperation` (a body
        with `status`) or only `Location` (202 while running, 200/204 when done).
        Raises `KeyRotationError` with Azure's error when it ends badly and
        `UnavailableError` when it outlasts `within_s`.
        """
        arm_token = await self._arm_bearer()
        body = {"keyType": which.capitalize(), "keyValue": None}
        url = self._url("/regenerateKeys")
        reply = await self._calls.call(
            "POST", url, "arm.endpoint_regenerate", arm_token, json_body=body
        )
        async_operation = reply.headers.get("Azure-AsyncOperation")
        location = async_operation or reply.headers.get("Location")
        if reply.status != 202 or location is None:
            return  # answered at once: nothing to wait for

        await wait_for_regeneration(
            self._call,
            self._arm_bearer,
            location,
            _async_operation_status if async_operation else _location_status,
            service=self.service,
            which=which,
            route="arm.operation",
            poll_s=poll_s,
            within_s=within_s,
            clock=self._calls.clock,
        )

    async def _describe(self, arm_token: str) -> None:
        fact = await self._facts.recall(self._fact_name())
        mode = text(fact, "authMode")
        if mode in _AUTH_MODES:
            self.auth_mode, self.scoring_uri = mode, text(fact, "scoringUri")
            log.info("endpoint.described", service=self.service, auth_mode=mode, source="fleet")
            return
        reply = await self._call("GET", self._url(), "arm.endpoint", arm_token)
        properties = reply.body.get("properties") if isinstance(reply.body, dict) else None
        mode = properties.get("authMode") if isinstance(properties, dict) else None
        if mode not in _AUTH_MODES:
            raise MalformedResponseError(
                f"arm.endpoint: endpoint {self._config.endpoint!r} has no known authMode",
                route="arm.endpoint",
            )
        uri = properties.get("scoringUri") if isinstance(properties, dict) else None
        self.auth_mode, self.scoring_uri = mode, uri if isinstance(uri, str) else None
        log.info("endpoint.described", service=self.service, auth_mode=mode, source="azure")
        shared = {"authMode": mode, **({"scoringUri": uri} if isinstance(uri, str) else {})}
        await self._facts.remember(self._fact_name(), shared)

    def _fact_name(self) -> FactName:
        c = self._config
        parts = (self._cloud.resource_manager, c.subscription_id, c.resource_group, c.workspace)
        return ("endpoint", *(part.lower() for part in (*parts, c.endpoint)))

    async def _arm_bearer(self) -> str:
        return (await self._calls.sign_in(self._credential, self._cloud.arm_scope)).value

    async def _call(self, method: str, url: str, route: str, bearer: str) -> Reply:
        return await self._calls.call(method, url, route, bearer)


def _async_operation_status(reply: Reply) -> str | None:
    """An `Azure-AsyncOperation` poll: `{"status": "InProgress"|"Succeeded"|"Failed"|…}`."""
    return reply.body.get("status") if isinstance(reply.body, dict) else None


def _location_status(reply: Reply) -> str | None:
    """A `Location` poll: 202 while running, 200 or 204 once done."""
    return "InProgress" if reply.status == 202 else "Succeeded"
