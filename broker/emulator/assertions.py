"""Verification of client assertions, as Entra ID does it for the token endpoint.

Two kinds: a certificate assertion (signed by the app's own certificate key, `iss` =
`sub` = client id, `aud` = the token endpoint; RS256 or PS256, as MSAL sends), and a
federated assertion (a workload-identity token signed by the emulated issuer whose `sub`
must match the app's federated credential). Failures raise `CredentialRejected` with the
AADSTS code Entra would send; nothing of the assertion itself is ever echoed.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa

from broker.emulator.records import Client
from broker.emulator.signing import SigningKey, verify_without_time
from broker.emulator.state import FEDERATED_AUDIENCE

CLOCK_SKEW_S = 300.0  # Entra tolerates five minutes of clock skew on assertions


class CredentialRejected(Exception):
    """Entra's refusal of a credential: HTTP status, OAuth error and AADSTS description."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = description


def verify_certificate_assertion(
    assertion: str, client: Client, token_endpoints: set[str], now: float
) -> None:
    """Accept `assertion` only if the client's registered certificate signed it for us."""
    if client.certificate is None:
        raise _cert_failure(
            "The certificate with identifier used to sign the client assertion is not "
            "registered on application. [Reason - The key was not found., "
            f"App Id: '{client.client_id}']"
        )
    _check_thumbprint(jwt.get_unverified_header(assertion), client.certificate)
    public_key = client.certificate.public_key()
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise _cert_failure("Only RSA certificates are supported by the emulator.")
    try:
        claims = verify_without_time(assertion, public_key, algorithms=("RS256", "PS256"))
    except jwt.InvalidTokenError as exc:
        raise _cert_failure("Client assertion failed signature validation.") from exc
    _check_certificate_claims(claims, client, token_endpoints, now)


def _check_thumbprint(header: dict[str, Any], certificate: x509.Certificate) -> None:
    """A thumbprint in the header, if any, must name the registered certificate."""
    expected = {
        "x5t#S256": certificate.fingerprint(hashes.SHA256()),
        "x5t": certificate.fingerprint(hashes.SHA1()),  # noqa: S303 - x5t is SHA-1 by RFC 7515
    }
    for name, digest in expected.items():
        sent = header.get(name)
        if isinstance(sent, str) and sent.rstrip("=") != _b64url(digest):
            raise _cert_failure(
                "The certificate with identifier used to sign the client assertion is not "
                "registered on application. [Reason - The key was not found.]"
            )


def _check_certificate_claims(
    claims: dict[str, Any], client: Client, token_endpoints: set[str], now: float
) -> None:
    if not (claims.get("iss") == claims.get("sub") == client.client_id):
        raise _cert_failure("The client assertion's iss and sub claims must both be the client id.")
    audiences = claims.get("aud")
    audiences = [audiences] if isinstance(audiences, str) else audiences or []
    if not {str(a).lower() for a in audiences} & token_endpoints:
        raise _cert_failure("The client assertion's audience is not this token endpoint.")
    if float(claims["exp"]) + CLOCK_SKEW_S <= now:
        raise _cert_failure(f"The client assertion expired at {_utc(float(claims['exp']))}.")


def verify_federated_assertion(
    assertion: str, client: Client, issuer_key: SigningKey, now: float
) -> None:
    """Accept a workload-identity token whose subject matches the app's federated record."""
    try:
        claims = issuer_key.verify(assertion)
    except jwt.InvalidTokenError as exc:
        raise _no_federated_match({}) from exc
    _check_federated_time(claims, now)
    audiences = claims.get("aud")
    audiences = [audiences] if isinstance(audiences, str) else audiences or []
    if (
        client.federated_subject is None
        or claims.get("sub") != client.federated_subject
        or FEDERATED_AUDIENCE not in audiences
    ):
        raise _no_federated_match(claims)


def _check_federated_time(claims: dict[str, Any], now: float) -> None:
    exp = float(claims["exp"])
    nbf = float(claims.get("nbf", claims.get("iat", exp)))
    if exp <= now or nbf > now + CLOCK_SKEW_S:
        raise CredentialRejected(
            400,
            "invalid_client",
            "AADSTS700024: Client assertion is not within its valid time range. "
            f"Current time: {_utc(now)}, assertion valid from {_utc(nbf)}, "
            f"expiry time of assertion {_utc(exp)}.",
        )


def _no_federated_match(claims: dict[str, Any]) -> CredentialRejected:
    return CredentialRejected(
        400,
        "invalid_request",
        "AADSTS70021: No matching federated identity record found for presented assertion. "
        f"Assertion Issuer: '{claims.get('iss', '')}'. "
        f"Assertion Subject: '{claims.get('sub', '')}'. "
        f"Assertion Audience: '{claims.get('aud', '')}'.",
    )


def _cert_failure(reason: str) -> CredentialRejected:
    return CredentialRejected(401, "invalid_client", f"AADSTS700027: {reason}")


def _b64url(digest: bytes) -> str:
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def _utc(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat()
