"""RSA signing keys: the stand-ins for Entra ID's token-signing key and for the issuer
of federated (workload-identity) tokens that Kubernetes would project into a pod.

Time claims are never checked here: the emulator checks them against its own clock,
which tests move, not against the wall clock PyJWT would use.
"""

from __future__ import annotations

import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

if TYPE_CHECKING:
    from jwt.types import Options


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One RSA key pair that signs RS256 JWTs and publishes itself as a JWK."""

    private_key: rsa.RSAPrivateKey
    kid: str

    @classmethod
    def generate(cls) -> SigningKey:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return cls(private_key=key, kid=secrets.token_urlsafe(16))

    @property
    def public_key(self) -> rsa.RSAPublicKey:
        return self.private_key.public_key()

    def sign(self, claims: Mapping[str, object]) -> str:
        headers = {"kid": self.kid, "typ": "JWT"}
        return jwt.encode(dict(claims), self.private_key, algorithm="RS256", headers=headers)

    def verify(self, token: str, *, audience: Collection[str] | None = None) -> dict[str, Any]:
        """The claims of `token` if this key signed it (and its `aud` is one of `audience`).

        Raises `jwt.InvalidTokenError` (or a subclass) otherwise.
        """
        options = _without_time_checks()
        if audience is None:
            options["verify_aud"] = False
        return jwt.decode(
            token,
            self.public_key,
            algorithms=["RS256"],
            audience=list(audience) if audience is not None else None,
            options=options,
        )

    def jwk(self) -> dict[str, object]:
        """The public half as a JSON Web Key, as Entra publishes it at `jwks_uri`."""
        jwk: dict[str, object] = RSAAlgorithm.to_jwk(self.public_key, as_dict=True)
        return {**jwk, "kid": self.kid, "use": "sig", "alg": "RS256"}


def verify_without_time(
    token: str, key: rsa.RSAPublicKey, *, algorithms: Collection[str]
) -> dict[str, Any]:
    """The claims of `token` signed by `key`; audience and time are left to the caller."""
    options = _without_time_checks()
    options["verify_aud"] = False
    return jwt.decode(token, key, algorithms=list(algorithms), options=options)


def unverified_claims(token: str) -> dict[str, Any]:
    """The claims of `token` without any check; only to decide how to verify it."""
    return jwt.decode(token, options={"verify_signature": False})


def _without_time_checks() -> Options:
    return {"verify_exp": False, "verify_nbf": False, "verify_iat": False, "require": ["exp"]}
