"""A credential is judged before it may replace the one served: dead, dying or not yet
valid on arrival, or not printable, it is refused with a reason that never shows it."""

from __future__ import annotations

import base64
import json

import pytest

from broker.credentials.jwt_claims import jwt_times
from broker.models import AccessToken, AuthKind
from broker.providers.azureml_v1 import parse_token

pytestmark = pytest.mark.timeout(5)

NOW = 1_000_000.0


def jwt(**claims: float) -> str:
    def part(data: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256'})}.{part(claims)}.signature"


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (AccessToken("t" * 20, AuthKind.TOKEN, NOW - 5), "expired 5 s ago"),
        (AccessToken("t" * 20, AuthKind.TOKEN, NOW + 10, issued_at=NOW - 3590), "expires in 10.0"),
        (
            AccessToken("t" * 20, AuthKind.TOKEN, NOW + 3600, not_before=NOW + 600),
            "not valid for another 600 s",
        ),
        (AccessToken("k\x7fey-value", AuthKind.KEY, None), "not printable ASCII"),
        (AccessToken("clé-du-service", AuthKind.KEY, None), "not printable ASCII"),
    ],
)
def test_unusable_credentials_say_why_without_their_value(token: AccessToken, reason: str) -> None:
    """Each way of being unusable on arrival is named, and the value is not in the reason."""
    said = token.unusable_reason(NOW, clock_skew_s=30.0)
    assert said is not None and reason in said
    assert token.value not in said


def test_a_short_real_token_is_usable() -> None:
    """A four-second token is usable: the skew allowance scales with its lifetime."""
    token = AccessToken("t" * 20, AuthKind.TOKEN, NOW + 4, issued_at=NOW)
    assert token.unusable_reason(NOW, clock_skew_s=30.0) is None


def test_the_earlier_of_the_jwt_exp_and_expiry_on_is_the_expiry() -> None:
    """Azure's expiryOn and the JWT's own exp may differ: the token dies at the earlier."""
    value = jwt(iat=NOW, nbf=NOW, exp=NOW + 600)
    token = parse_token({"accessToken": value, "expiryOn": NOW + 3600})
    assert token.expires_on == NOW + 600
    assert token.issued_at == NOW and token.not_before == NOW
    later = parse_token({"accessToken": jwt(exp=NOW + 7200), "expiryOn": NOW + 3600})
    assert later.expires_on == NOW + 3600


def test_jwt_times_read_only_well_formed_tokens() -> None:
    """A key, a truncated JWT or a payload that is not an object has no JWT times."""
    assert jwt_times("a-web-service-key") is None
    assert jwt_times(jwt(exp=NOW)[:25]) is None
    assert jwt_times("a.bm90IGpzb24.c") is None
    times = jwt_times(jwt(exp=NOW, nbf=NOW - 1, iat=NOW - 2))
    assert times is not None and (times.expires, times.not_before, times.issued_at) == (
        NOW,
        NOW - 1,
        NOW - 2,
    )
