"""Emulated Entra ID (Azure AD) v2.0: OpenID discovery, signing keys, and the token
endpoint's client-credentials grant with secret, certificate or federated assertion.

Every failure answers with the HTTP status, OAuth `error` and AADSTS code Entra uses.
Secrets and assertions are never echoed.
"""

from __future__ import annotations

import hmac
import secrets

import jwt
from aiohttp import web

from broker.emulator.assertions import (
    CredentialRejected,
    verify_certificate_assertion,
    verify_federated_assertion,
)
from broker.emulator.context import site_of, state_of
from broker.emulator.records import Client
from broker.emulator.replies import aad_error
from broker.emulator.sabotage import shaped_times
from broker.emulator.signing import unverified_claims
from broker.emulator.state import FEDERATED_ISSUER

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_OIDC_SCOPES = frozenset({"openid", "profile", "offline_access"})
_REFRESH_IN_FROM_S = 7200  # Entra adds `refresh_in` (half the lifetime) from two hours up


def routes() -> list[web.RouteDef]:
    return [
        web.get(
            "/{tenant}/v2.0/.well-known/openid-configuration",
            openid_configuration,
            name="entra.openid",
        ),
        web.get("/{tenant}/discovery/v2.0/keys", signing_keys, name="entra.keys"),
        web.post("/{tenant}/oauth2/v2.0/token", token, name="entra.token"),
    ]


async def openid_configuration(request: web.Request) -> web.Response:
    """The tenant's OpenID Connect metadata, which MSAL reads before its first token."""
    tenant = _known_tenant(request, error="invalid_tenant")
    base = f"{site_of(request).base_url}/{tenant}"
    return web.json_response(
        {
            "issuer": f"{base}/v2.0",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "jwks_uri": f"{base}/discovery/v2.0/keys",
            "token_endpoint_auth_methods_supported": [
                "client_secret_post",
                "private_key_jwt",
                "client_secret_basic",
            ],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "subject_types_supported": ["pairwise"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "tenant_region_scope": "NA",
            "cloud_instance_name": "emulator.invalid",
        }
    )


async def signing_keys(request: web.Request) -> web.Response:
    """The JWKS that verifies the access tokens this Entra issues."""
    _known_tenant(request, error="invalid_tenant")
    return web.json_response({"keys": [state_of(request).token_key.jwk()]})


async def token(request: web.Request) -> web.Response:
    """The client-credentials grant: authenticate the app, issue an RS256 access token."""
    tenant = _known_tenant(request, error="invalid_request")
    form = await _form(request)
    grant_type = _required(request, form, "grant_type")
    if grant_type != "client_credentials":
        raise aad_error(
            request,
            400,
            "unsupported_grant_type",
            f"AADSTS70003: The app requested an unsupported grant type '{grant_type}'.",
        )
    client_id = _required(request, form, "client_id")
    resource = _resource(request, _required(request, form, "scope"))
    client = state_of(request).client(tenant, client_id)
    if client is None:
        raise aad_error(
            request,
            400,
            "unauthorized_client",
            f"AADSTS700016: Application with identifier '{client_id}' was not found in the "
            f"directory '{tenant}'. This can happen if the application has not been installed "
            "by the administrator of the tenant or consented to by any user in the tenant. "
            "You may have sent your authentication request to the wrong tenant.",
        )
    _authenticate(request, tenant, client, form)
    return web.json_response(_issue(request, client, resource))


def _known_tenant(request: web.Request, *, error: str) -> str:
    tenant = request.match_info["tenant"]
    if not state_of(request).has_tenant(tenant):
        raise aad_error(
            request,
            400,
            error,
            f"AADSTS90002: Tenant '{tenant}' not found. Check to make sure you have the "
            "correct tenant ID and are signing into the correct cloud. Check with your "
            "subscription administrator, this may happen if there are no active "
            "subscriptions for the tenant.",
        )
    return tenant


async def _form(request: web.Request) -> dict[str, str]:
    form = await request.post()
    return {name: value for name, value in form.items() if isinstance(value, str)}


def _required(request: web.Request, form: dict[str, str], name: str) -> str:
    value = form.get(name, "")
    if not value:
        raise aad_error(
            request,
            400,
            "invalid_request",
            f"AADSTS900144: The request body must contain the following parameter: '{name}'.",
        )
    return value


def _resource(request: web.Request, scope: str) -> str:
    """The resource a client-credentials scope names: exactly one `…/.default`."""
    scopes = [s for s in scope.split() if s not in _OIDC_SCOPES]
    if len(scopes) != 1 or not scopes[0].endswith("/.default"):
        raise aad_error(
            request,
            400,
            "invalid_scope",
            f"AADSTS1002012: The provided value for scope {scope} is not valid. Client "
            "credential flows must have a scope value with /.default suffixed to the "
            "resource identifier (application ID URI).",
        )
    return scopes[0].removesuffix("/.default")


def _authenticate(request: web.Request, tenant: str, client: Client, form: dict[str, str]) -> None:
    secret, assertion = form.get("client_secret"), form.get("client_assertion")
    if secret:
        _check_secret(request, client, secret)
    elif assertion:
        _check_assertion(request, tenant, client, form, assertion)
    else:
        raise aad_error(
            request,
            401,
            "invalid_client",
            "AADSTS7000218: The request body must contain the following parameter: "
            "'client_assertion' or 'client_secret'.",
        )


def _check_secret(request: web.Request, client: Client, secret: str) -> None:
    if client.secret is None or not hmac.compare_digest(client.secret.encode(), secret.encode()):
        raise aad_error(
            request,
            401,
            "invalid_client",
            "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in "
            "the request is the client secret value, not the client secret ID, for a secret "
            f"added to app '{client.client_id}'.",
        )


def _check_assertion(
    request: web.Request, tenant: str, client: Client, form: dict[str, str], assertion: str
) -> None:
    if form.get("client_assertion_type") != JWT_BEARER:
        raise aad_error(
            request,
            400,
            "invalid_request",
            f"AADSTS50027: The client_assertion_type must be '{JWT_BEARER}'.",
        )
    state = state_of(request)
    try:
        if _issuer_of(assertion) == FEDERATED_ISSUER:
            verify_federated_assertion(assertion, client, state.federated_key, state.clock())
        else:
            endpoints = _token_endpoints(request, tenant, client)
            verify_certificate_assertion(assertion, client, endpoints, state.clock())
    except CredentialRejected as exc:
        raise aad_error(request, exc.status, exc.error, exc.description) from None


def _issuer_of(assertion: str) -> object:
    try:
        return unverified_claims(assertion).get("iss")
    except jwt.InvalidTokenError:
        raise CredentialRejected(
            400, "invalid_request", "AADSTS50027: JWT token is invalid or malformed."
        ) from None


def _token_endpoints(request: web.Request, tenant: str, client: Client) -> set[str]:
    base = site_of(request).base_url
    return {f"{base}/{t}/oauth2/v2.0/token".lower() for t in (tenant, client.tenant_id)}


def _issue(request: web.Request, client: Client, resource: str) -> dict[str, object]:
    state = state_of(request)
    now = int(state.clock())
    lifetime = int(state.entra_token_lifetime_s)
    iat, nbf, exp = shaped_times(request, now, lifetime)
    claims = {
        "aud": resource,
        "iss": f"{site_of(request).base_url}/{client.tenant_id}/v2.0",
        "tid": client.tenant_id,
        "appid": client.client_id,
        "azp": client.client_id,
        "oid": client.object_id,
        "sub": client.object_id,
        "idtyp": "app",
        "ver": "2.0",
        "uti": secrets.token_urlsafe(16),
        "iat": iat,
        "nbf": nbf,
        "exp": exp,
    }
    answer = {
        "token_type": "Bearer",
        "expires_in": exp - now,
        "ext_expires_in": exp - now,
        "access_token": state.token_key.sign(claims),
    }
    if lifetime >= _REFRESH_IN_FROM_S:  # Entra's hint for long-lived tokens
        answer["refresh_in"] = lifetime // 2
    return answer
