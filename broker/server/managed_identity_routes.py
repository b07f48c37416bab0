"""Managed-identity compatible routes: unmodified Azure SDKs get the principal's tokens.

Two protocols, as `ManagedIdentityCredential` speaks them:

    IMDS         GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=R
                 with `Metadata: true`; clients find it through
                 AZURE_POD_IDENTITY_AUTHORITY_HOST=http://127.0.0.1:8765
    App Service  GET /msi/token?api-version=2019-08-01&resource=R
                 with `X-IDENTITY-HEADER: <secret>`; clients find it through
                 IDENTITY_ENDPOINT=http://127.0.0.1:8765/msi/token and IDENTITY_HEADER

Only resources on the configured allowlist are served. Tokens come from MSAL's cache
for `R/.default`, so a crowd of SDK clients costs Azure one sign-in per token lifetime.
When a sign-in fails — Entra down, or answering a token that cannot be used — the last
token served for the resource goes on being served while it is valid, as for services.
"""

from __future__ import annotations

import hmac
import json

from aiohttp import web

from broker.config import CompatConfig
from broker.credentials import Credential
from broker.errors import BadRequestError, ForbiddenError, NotReadyError, UpstreamError
from broker.log import get_logger
from broker.models import AccessToken, Clock, system_clock

log = get_logger("broker.compat")

IMDS_PATH = "/metadata/identity/oauth2/token"
APP_SERVICE_PATH = "/msi/token"
IDENTITY_HEADER = "X-IDENTITY-HEADER"


class Compat:
    """What the compatible routes serve: the allowlist and the principal behind them."""

    def __init__(
        self,
        config: CompatConfig,
        credential: Credential | None,
        client_id: str,
        *,
        clock: Clock = system_clock,
        clock_skew_s: float = 30.0,
    ) -> None:
        self._clock = clock  # the broker's: token expiry times are on it
        self.clock_skew_s = clock_skew_s  # a fallback token is served only outside it
        self._last: dict[str, AccessToken] = {}  # resource -> the last token served for it
        self._credential: Credential | None = None
        self.update(config, credential, client_id)

    def update(self, config: CompatConfig, credential: Credential | None, client_id: str) -> None:
        """Serve a new `[compat]` table (on reload); requests under way finish with the old."""
        self.config = config
        if credential is not self._credential:
            self._last = {}  # another principal's tokens are not this one's fallback
        self._credential = credential
        self._client_id = client_id

    async def token(self, request: web.Request) -> tuple[str, AccessToken]:
        resource = request.query.get("resource", "")
        if not resource:
            raise BadRequestError(
                "the resource query parameter is required", code="invalid_request"
            )
        if resource.rstrip("/") not in self.config.resources or self._credential is None:
            log.warning("access.denied", route=request.path, resource=resource[:200])
            raise ForbiddenError(
                f"resource {resource[:200]!r} is not on the broker's [compat] resources list",
                code="invalid_resource",
            )
        try:
            token = await self._credential.get_token(resource.rstrip("/") + "/.default")
        except UpstreamError as exc:
            previous = self._last.get(resource)
            now = self._clock()
            if previous is not None and previous.unusable_reason(now, self.clock_skew_s) is None:
                return resource, previous
            raise NotReadyError(
                f"no token for {resource!r}: {exc.message}", retry_after=5
            ) from None
        self._last[resource] = token
        return resource, token

    def body(self, resource: str, token: AccessToken, *, imds: bool) -> bytes:
        expires_on = int(token.expires_on or 0)
        now = int(self._clock())
        expires_in = max(0, expires_on - now)
        fields: dict[str, str] = {
            "access_token": token.value,
            "client_id": self._client_id,
            "expires_on": str(expires_on),
            "resource": resource,
            "token_type": token.token_type,
        }
        if imds:
            fields |= {
                "expires_in": str(expires_in),
                "ext_expires_in": str(expires_in),
                "not_before": str(now),
            }
        return json.dumps(fields).encode()


COMPAT = web.AppKey("compat", Compat)


async def imds(request: web.Request) -> web.Response:
    compat = request.app[COMPAT]
    if not compat.config.imds:
        raise web.HTTPNotFound
    if "api-version" not in request.query:
        raise BadRequestError("the api-version query parameter is required", code="invalid_request")
    resource, token = await compat.token(request)
    return web.Response(
        body=compat.body(resource, token, imds=True), content_type="application/json"
    )


async def app_service(request: web.Request) -> web.Response:
    compat = request.app[COMPAT]
    expected = compat.config.app_service_header
    if expected is None:
        raise web.HTTPNotFound
    presented = request.headers.get(IDENTITY_HEADER, "")
    # aiohttp keeps a header's undecodable bytes as surrogates: encoded back, never an error.
    sent = presented.encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(sent, expected.reveal().encode()):
        log.warning("access.denied", route=request.path, reason="identity header missing or wrong")
        raise ForbiddenError(
            f"send the identity header ({IDENTITY_HEADER}) given to this app", code="access_denied"
        )
    if request.query.get("api-version") != "2019-08-01":
        raise BadRequestError("api-version must be 2019-08-01", code="invalid_request")
    resource, token = await compat.token(request)
    return web.Response(
        body=compat.body(resource, token, imds=False), content_type="application/json"
    )
