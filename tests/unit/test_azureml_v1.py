"""Parsing MMS answers and choosing the auth mode follow Azure's rules and never half-parse."""

from __future__ import annotations

import jwt
import pytest

from broker.config import WebServiceConfig
from broker.errors import MalformedResponseError, UnsupportedAuthError
from broker.models import AuthKind
from broker.providers.azureml_v1 import Description, choose_auth, parse_token
from broker.providers.upstream import azure_message, retry_after

pytestmark = pytest.mark.timeout(5)


def service(auth: str = "auto") -> WebServiceConfig:
    return WebServiceConfig(
        name="svc",
        identity="main",
        subscription_id="sub",
        resource_group="rg",
        workspace="ws",
        web_service="web",
        auth=auth,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("compute", "keys", "tokens", "auth", "expected"),
    [
        ("AKS", False, True, "auto", AuthKind.TOKEN),
        ("AKS", True, False, "auto", AuthKind.KEY),
        ("ACI", True, False, "auto", AuthKind.KEY),
        ("AKS", False, True, "token", AuthKind.TOKEN),
        ("AKS", True, False, "key", AuthKind.KEY),
    ],
)
def test_auth_mode_chosen(
    compute: str, keys: bool, tokens: bool, auth: str, expected: AuthKind
) -> None:
    """`auto` follows what the service has enabled; explicit modes are honoured when possible."""
    assert choose_auth(service(auth), Description(compute, keys, tokens, None)) is expected


@pytest.mark.parametrize(
    ("compute", "keys", "tokens", "auth", "phrase"),
    [
        ("ACI", False, False, "token", "ACI does not support"),
        ("AKS", True, True, "auto", "cannot both be enabled"),
        ("AKS", False, False, "auto", "key auth disabled"),
        ("ACI", False, False, "auto", "the ACI default"),
        ("AKS", True, False, "token", "does not have token auth enabled"),
    ],
)
def test_auth_rules_refused(compute: str, keys: bool, tokens: bool, auth: str, phrase: str) -> None:
    """Settings Azure does not allow are refused with the rule in the message."""
    with pytest.raises(UnsupportedAuthError, match=phrase):
        choose_auth(service(auth), Description(compute, keys, tokens, None))


def test_token_parsed_with_its_numbers() -> None:
    """accessToken, expiryOn and refreshAfter become an AccessToken."""
    token = parse_token(
        {"accessToken": "abc", "tokenType": "Bearer", "refreshAfter": 150, "expiryOn": 200}
    )
    assert (token.value, token.expires_on, token.refresh_after) == ("abc", 200, 150)


def test_missing_expiry_falls_back_to_jwt_exp() -> None:
    """With no expiryOn, the JWT's exp claim (unverified) is the last resort."""
    value = jwt.encode({"exp": 4_000_000_000}, "k" * 32, algorithm="HS256")
    assert parse_token({"accessToken": value}).expires_on == 4_000_000_000


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        {},
        {"accessToken": ""},
        {"accessToken": 5, "expiryOn": 10},
        {"accessToken": "opaque"},
        {"accessToken": "abc", "expiryOn": "soon"},
        {"accessToken": "abc", "expiryOn": True},
        {"accessToken": "two words", "expiryOn": 10},
    ],
)
def test_malformed_token_answers_are_refused(body: object) -> None:
    """A body lacking a usable field is MalformedResponseError, never a half-parsed token."""
    with pytest.raises(MalformedResponseError):
        parse_token(body)


def test_description_requires_compute_type() -> None:
    """A describe answer without computeType cannot be trusted."""
    with pytest.raises(MalformedResponseError):
        Description.parse({"name": "x"}, "svc")


def test_azure_error_shapes() -> None:
    """ARM's nested error, MMS's flat error and OAuth's error are all read."""
    assert azure_message(b'{"error":{"code":"AuthorizationFailed","message":"no"}}') == (
        "AuthorizationFailed",
        "no",
    )
    assert azure_message(b'{"code":"Forbidden","statusCode":403,"message":"m"}') == (
        "Forbidden",
        "m",
    )
    assert azure_message(b"not json") == (None, "not json")


def test_retry_after_both_forms() -> None:
    """Retry-After is read as seconds or as an HTTP date."""
    assert retry_after({"Retry-After": "7"}) == 7
    assert retry_after({"Retry-After": "Thu, 01 Jan 1970 00:01:40 GMT"}, now=40) == 60
    assert retry_after({"Retry-After": "garbage"}) is None
    assert retry_after({}) is None
