"""The emulated Entra ID over raw HTTP: discovery, keys, token grant and its errors."""

from __future__ import annotations

from typing import Any

import aiohttp
import jwt
import pytest

from broker.emulator import Emulator, EmulatorState
from tests.emulator.conftest import CLIENT, SECRET, TENANT, FakeClock

pytestmark = pytest.mark.timeout(15)


def _form(emu: Emulator, **overrides: str) -> dict[str, str]:
    form = {
        "grant_type": "client_credentials",
        "client_id": CLIENT,
        "client_secret": SECRET,
        "scope": f"{emu.resource_manager}/.default",
    }
    form.update(overrides)
    return {k: v for k, v in form.items() if v}


async def _token_call(
    http: aiohttp.ClientSession, form: dict[str, str], tenant: str = TENANT
) -> tuple[int, dict[str, Any]]:
    async with http.post(f"/{tenant}/oauth2/v2.0/token", data=form) as resp:
        return resp.status, await resp.json()


async def test_openid_configuration_points_at_the_emulator(
    http: aiohttp.ClientSession, emu: Emulator
) -> None:
    """The OpenID metadata names the token endpoint and JWKS under the base URL."""
    async with http.get(f"/{TENANT}/v2.0/.well-known/openid-configuration") as resp:
        assert resp.status == 200
        config = await resp.json()
    assert config["token_endpoint"] == f"{emu.base_url}/{TENANT}/oauth2/v2.0/token"
    assert config["jwks_uri"] == f"{emu.base_url}/{TENANT}/discovery/v2.0/keys"
    assert config["issuer"] == f"{emu.base_url}/{TENANT}/v2.0"
    assert config["authorization_endpoint"].startswith(emu.base_url)


async def test_openid_configuration_of_unknown_tenant_is_400(http: aiohttp.ClientSession) -> None:
    """Discovery for a tenant that does not exist answers AADSTS90002."""
    async with http.get("/nope/v2.0/.well-known/openid-configuration") as resp:
        assert resp.status == 400
        body = await resp.json()
    assert body["error"] == "invalid_tenant"
    assert body["error_description"].startswith("AADSTS90002: Tenant 'nope' not found")


async def test_issued_token_verifies_with_the_published_keys(
    http: aiohttp.ClientSession, emu: Emulator, clock: FakeClock
) -> None:
    """A granted token is an RS256 JWT with the documented claims, verifiable by the JWKS."""
    status, body = await _token_call(http, _form(emu))
    assert status == 200
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == body["ext_expires_in"] == 3600
    async with http.get(f"/{TENANT}/discovery/v2.0/keys") as resp:
        jwks = await resp.json()
    key = jwt.PyJWK(jwks["keys"][0]).key
    claims = jwt.decode(
        body["access_token"], key, algorithms=["RS256"], audience=emu.resource_manager
    )
    assert claims["iss"] == f"{emu.base_url}/{TENANT}/v2.0"
    assert claims["tid"] == TENANT
    assert claims["appid"] == claims["azp"] == CLIENT
    assert claims["sub"] == claims["oid"]
    assert claims["iat"] == claims["nbf"] == int(clock.now)
    assert claims["exp"] == int(clock.now) + 3600


async def test_object_id_is_stable_per_client(http: aiohttp.ClientSession, emu: Emulator) -> None:
    """Two tokens for the same client carry the same oid but are distinct tokens."""
    _, first = await _token_call(http, _form(emu))
    _, second = await _token_call(http, _form(emu))
    claims = [
        jwt.decode(b["access_token"], options={"verify_signature": False}) for b in (first, second)
    ]
    assert claims[0]["oid"] == claims[1]["oid"]
    assert first["access_token"] != second["access_token"]


async def test_token_lifetime_follows_the_state(
    http: aiohttp.ClientSession, emu: Emulator, state: EmulatorState
) -> None:
    """`entra_token_lifetime_s` sets expires_in."""
    state.entra_token_lifetime_s = 120.0
    _, body = await _token_call(http, _form(emu))
    assert body["expires_in"] == 120


@pytest.mark.parametrize(
    ("tenant", "overrides", "status", "error", "code"),
    [
        ("unknown-tenant", {}, 400, "invalid_request", 90002),
        (
            TENANT,
            {"client_id": "33333333-3333-3333-3333-333333333333"},
            400,
            "unauthorized_client",
            700016,
        ),
        (TENANT, {"client_secret": "wrong"}, 401, "invalid_client", 7000215),
        (TENANT, {"client_secret": ""}, 401, "invalid_client", 7000218),
        (TENANT, {"grant_type": "password"}, 400, "unsupported_grant_type", 70003),
        (TENANT, {"scope": ""}, 400, "invalid_request", 900144),
        (
            TENANT,
            {"scope": "https://management.example/user_impersonation"},
            400,
            "invalid_scope",
            1002012,
        ),
        (
            TENANT,
            {
                "client_secret": "",
                "client_assertion": "not-a-jwt",
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            },
            400,
            "invalid_request",
            50027,
        ),
    ],
)
async def test_token_errors_carry_the_aadsts_code(
    http: aiohttp.ClientSession,
    emu: Emulator,
    tenant: str,
    overrides: dict[str, str],
    status: int,
    error: str,
    code: int,
) -> None:
    """Each refusal answers Entra's status, OAuth error and AADSTS code first."""
    got_status, body = await _token_call(http, _form(emu, **overrides), tenant=tenant)
    assert (got_status, body["error"]) == (status, error)
    assert body["error_description"].startswith(f"AADSTS{code}: ")
    assert body["error_codes"] == [code]
    for field in ("timestamp", "trace_id", "correlation_id"):
        assert body[field]


async def test_unknown_client_names_client_and_tenant(
    http: aiohttp.ClientSession, emu: Emulator
) -> None:
    """AADSTS700016 names the application and the directory, as Entra does."""
    other = "33333333-3333-3333-3333-333333333333"
    _, body = await _token_call(http, _form(emu, client_id=other))
    assert body["error_description"].startswith(
        f"AADSTS700016: Application with identifier '{other}' was not found in the "
        f"directory '{TENANT}'."
    )


async def test_wrong_secret_is_never_echoed(http: aiohttp.ClientSession, emu: Emulator) -> None:
    """The wrong secret's answer explains AADSTS7000215 without repeating the secret."""
    async with http.post(
        f"/{TENANT}/oauth2/v2.0/token", data=_form(emu, client_secret="sup3r-s3cret-guess")
    ) as resp:
        text = await resp.text()
    assert "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent" in text
    assert "sup3r-s3cret-guess" not in text
    assert SECRET not in text


async def test_correlation_id_echoes_client_request_id(
    http: aiohttp.ClientSession, emu: Emulator
) -> None:
    """Errors carry the caller's client-request-id as correlation_id, as MSAL expects."""
    async with http.post(
        f"/{TENANT}/oauth2/v2.0/token",
        data=_form(emu, client_secret="wrong"),
        headers={"client-request-id": "corr-123"},
    ) as resp:
        body = await resp.json()
    assert body["correlation_id"] == "corr-123"
    assert "Correlation ID: corr-123" in body["error_description"]


def _assertion(key_pem: str, claims: dict[str, Any], algorithm: str = "RS256") -> str:
    return jwt.encode(claims, key_pem, algorithm=algorithm)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"exp_offset": -400}, "expired"),
        ({"aud": "https://elsewhere/token"}, "audience"),
        ({"iss": "someone-else"}, "iss and sub"),
    ],
)
async def test_bad_certificate_assertions_are_aadsts700027(
    http: aiohttp.ClientSession,
    emu: Emulator,
    state: EmulatorState,
    clock: FakeClock,
    certificate: tuple[str, str],
    change: dict[str, Any],
    reason: str,
) -> None:
    """An assertion that is expired, for another audience or about another client fails."""
    cert_pem, key_pem = certificate
    state.add_client(TENANT, "cert-client", certificate_pem=cert_pem)
    claims = {
        "aud": f"{emu.authority_host}/{TENANT}/oauth2/v2.0/token",
        "iss": "cert-client",
        "sub": "cert-client",
        "exp": clock.now + 600,
        "jti": "1",
    }
    claims.update(change)
    if "exp_offset" in change:
        del claims["exp_offset"]
        claims["exp"] = clock.now + change["exp_offset"]
    form = {
        "grant_type": "client_credentials",
        "client_id": "cert-client",
        "scope": f"{emu.resource_manager}/.default",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": _assertion(key_pem, claims, "PS256"),
    }
    status, body = await _token_call(http, form)
    assert (status, body["error"]) == (401, "invalid_client")
    assert body["error_description"].startswith("AADSTS700027: ")
    assert reason in body["error_description"]


async def test_valid_raw_certificate_assertion_is_accepted(
    http: aiohttp.ClientSession,
    emu: Emulator,
    state: EmulatorState,
    clock: FakeClock,
    certificate: tuple[str, str],
) -> None:
    """An RS256 assertion with the right iss, sub, aud and exp signs the client in."""
    cert_pem, key_pem = certificate
    state.add_client(TENANT, "cert-client", certificate_pem=cert_pem)
    claims = {
        "aud": f"{emu.authority_host}/{TENANT}/oauth2/v2.0/token",
        "iss": "cert-client",
        "sub": "cert-client",
        "exp": clock.now + 600,
    }
    form = {
        "grant_type": "client_credentials",
        "client_id": "cert-client",
        "scope": f"{emu.resource_manager}/.default",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": _assertion(key_pem, claims),
    }
    status, _ = await _token_call(http, form)
    assert status == 200
