"""The service principal's Entra ID token, acquired by MSAL off the event loop.

MSAL is synchronous (it uses `requests`), so every call runs in a worker thread.
It reports OAuth errors as a dict and transport or 5xx failures as exceptions;
both become one `UpstreamError` here, with the AADSTS code kept and secrets never.
MSAL keeps its own token cache for the client-credentials grant. We only remember,
per scope, the token it gave us for as long as MSAL itself would answer from that cache
(5 minutes before expiry, and not past its `refresh_on`): asking again meant a worker
thread per fetch whose Python work competed for the GIL with the event loop serving
tokens, for the same answer.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from broker.config import CloudProfile, IdentityConfig
from broker.credentials.jwt_claims import jwt_times
from broker.errors import (
    SignInError,
    ThrottledError,
    UnavailableError,
    UnusableCredentialError,
    UpstreamError,
)
from broker.log import get_logger, register_secret, scrub
from broker.models import AccessToken, AuthKind, Clock, system_clock, wall_clock

if TYPE_CHECKING:
    import msal
    import requests

    from broker.credentials.msal_http import BoundedSession

log = get_logger("broker.credentials")

_AADSTS = re.compile(r"\b(AADSTS\d+)\b")
# AADSTS codes that a retry can heal (throttling, service trouble, clock skew).
_TRANSIENT_AADSTS = frozenset({"AADSTS50196", "AADSTS90033", "AADSTS50058", "AADSTS500133"})
_MSAL_EXPIRY_BUFFER_S = 300  # MSAL treats a cached token this close to expiry as expired


class Credential(Protocol):
    """Anything that hands out an Entra ID access token for a scope."""

    @property
    def principal(self) -> str:
        """Who signs in, for messages: the client id, never a secret."""

    async def get_token(self, scope: str) -> AccessToken: ...


class ServicePrincipalCredential:
    """One identity of the configuration, signed in through MSAL."""

    def __init__(
        self,
        identity: IdentityConfig,
        cloud: CloudProfile,
        session: requests.Session | None = None,
        timeout_s: float = 30.0,
        clock: Clock = system_clock,
        clock_skew_s: float = 30.0,
    ) -> None:
        self.identity = identity
        self._clock = clock  # Entra gives lifetimes; they are placed on the broker's clock
        self._cloud = cloud
        self._session = session  # built with MSAL's application, on the first sign-in
        self._timeout_s = timeout_s
        self._clock_skew_s = clock_skew_s
        self._app: msal.ConfidentialClientApplication | None = None
        self._lock = asyncio.Lock()
        # scope -> (the token MSAL gave, the wall-clock time until which it would give it again)
        self._held: dict[str, tuple[AccessToken, float]] = {}

    @property
    def principal(self) -> str:
        return self.identity.client_id

    def close(self) -> None:
        """Close MSAL's pooled HTTPS connections."""
        if self._session is not None:
            self._session.close()

    def configure(self, timeout_s: float, clock_skew_s: float) -> None:
        """Apply a reloaded `[refresh]`: later sign-ins are bounded and judged by these."""
        self._clock_skew_s = clock_skew_s
        self._timeout_s = timeout_s
        bounded = _bounded(self._session)
        if bounded is not None:
            bounded.timeout_s = timeout_s

    async def get_token(self, scope: str) -> AccessToken:
        held = self._still_held(scope)
        if held is not None:
            return held
        async with self._lock:  # MSAL's app is not built for concurrent first use
            held = self._still_held(scope)  # fetched while this caller waited
            if held is not None:
                return held
            asked_at = self._clock()
            token, reusable_s = await asyncio.to_thread(self._acquire, scope)
            reason = token.unusable_reason(self._clock(), self._clock_skew_s)
            if reason is not None:
                await asyncio.to_thread(self._evict, scope)
                raise UnusableCredentialError(
                    f"entra.token: the token Entra ID gave identity {self.identity.name!r} "
                    f"for scope {scope} cannot be used: {reason}",
                    route="entra.token",
                )
            if reusable_s > 0:
                self._held[scope] = (token, asked_at + reusable_s)
            return token

    def _still_held(self, scope: str) -> AccessToken | None:
        held = self._held.get(scope)
        if held is None or self._clock() >= held[1]:
            return None
        return held[0]

    def _evict(self, scope: str) -> None:
        """Drop MSAL's cached token for `scope`, so that the next sign-in asks Entra again
        instead of answering the token just refused from MSAL's cache."""
        if self._app is None:
            return
        import msal  # loaded already: the application exists

        cache = self._app.token_cache
        for item in list(cache.search(msal.TokenCache.CredentialType.ACCESS_TOKEN)):
            if scope.lower() in str(item.get("target", "")).lower().split():
                cache.remove_at(item)

    def _acquire(self, scope: str) -> tuple[AccessToken, float]:
        try:
            app = self._application()
            result = app.acquire_token_for_client(scopes=[scope])
        except UpstreamError:
            raise
        except Exception as exc:  # noqa: BLE001 — requests', OSError, MSAL's own: all transport
            raise self._transport_error(exc) from None
        return self._token_from(result, scope), _reusable_s(result)

    def _application(self) -> msal.ConfidentialClientApplication:
        """MSAL's application, built on first use in a worker thread: MSAL and requests are
        loaded then, not while the broker starts listening (about 50 ms and 6 MiB)."""
        if self._app is None:
            import msal

            from broker.credentials.msal_http import http_session

            if self._session is None:
                self._session = http_session(self._cloud, self._timeout_s)
            identity = self.identity
            self._app = msal.ConfidentialClientApplication(
                identity.client_id,
                client_credential=self._client_credential(),
                authority=f"{self._cloud.authority_host.rstrip('/')}/{identity.tenant_id}",
                instance_discovery=False,
                http_client=self._session,  # which bounds every call by the current timeout
            )
        return self._app

    def _client_credential(self) -> Any:
        identity = self.identity
        if identity.kind == "secret" and identity.client_secret is not None:
            secret = identity.client_secret.reveal()
            register_secret(secret)
            return secret
        if identity.kind == "certificate" and identity.certificate_file is not None:
            return _certificate_credential(identity)
        if identity.kind == "federated" and identity.federated_token_file is not None:
            return {"client_assertion": _FederatedAssertion(identity.federated_token_file)}
        raise SignInError(f"identity {identity.name!r} has no usable credential")

    def _token_from(self, result: dict[str, Any] | None, scope: str) -> AccessToken:
        if not result or "access_token" not in result:
            raise self._sign_in_error(result or {}, scope)
        value = str(result["access_token"])
        register_secret(value)
        expires_in = float(result.get("expires_in", 0))
        # MSAL turns Entra's `refresh_in` into `refresh_on`, a time on the wall clock.
        refresh_on = result.get("refresh_on")
        now = self._clock()
        expires_on = now + expires_in
        # The JWT's times are on Entra's clock: placed on ours through the answer's expiry.
        times = jwt_times(value)
        offset = expires_on - times.expires if times and times.expires else None
        return AccessToken(
            value=value,
            auth=AuthKind.ENTRA,
            expires_on=expires_on,
            refresh_after=now + float(refresh_on) - wall_clock() if refresh_on else None,
            token_type=str(result.get("token_type", "Bearer")),
            issued_at=_moved(times.issued_at if times else None, offset),
            not_before=_moved(times.not_before if times else None, offset),
        )

    def _sign_in_error(self, result: dict[str, Any], scope: str) -> UpstreamError:
        description = scrub(str(result.get("error_description") or result.get("error") or ""))
        first_line = description.splitlines()[0] if description else "no description"
        match = _AADSTS.search(description)
        code = match.group(1) if match else None
        message = (
            f"sign-in of identity {self.identity.name!r} "
            f"(client {self.identity.client_id}, tenant {self.identity.tenant_id}) "
            f"for scope {scope} failed: {result.get('error', 'error')}: {first_line}"
        )
        session = _bounded(self._session)
        if session is not None and session.throttled():
            return ThrottledError(
                f"{message} (HTTP 429)",
                status=429,
                aad_code=code,
                retry_after=_remaining(session.throttled_until, session.retry_after_s),
                route="entra.token",
            )
        if code in _TRANSIENT_AADSTS:
            return UnavailableError(message, aad_code=code, route="entra.token")
        return SignInError(message + _sign_in_hint(code), aad_code=code, route="entra.token")

    def _transport_error(self, exc: BaseException) -> UpstreamError:
        detail = scrub(f"{type(exc).__name__}: {exc}")
        return UnavailableError(
            f"cannot reach Entra ID at {self._cloud.authority_host} for identity "
            f"{self.identity.name!r}: {detail}",
            route="entra.token",
        )


def _bounded(session: requests.Session | None) -> BoundedSession | None:
    """`session` when it is the broker's own (built once MSAL is loaded), else None."""
    if session is None:
        return None
    from broker.credentials.msal_http import BoundedSession

    return session if isinstance(session, BoundedSession) else None


def _remaining(until: float | None, retry_after_s: float | None) -> float | None:
    """What is left of Entra's Retry-After (None when it named none)."""
    if until is None or retry_after_s is None:
        return None
    return max(until - wall_clock(), 0.0)


def _moved(when: float | None, offset: float | None) -> float | None:
    return None if when is None or offset is None else when + offset


def _reusable_s(result: dict[str, Any]) -> float:
    """For how long from before the call MSAL would hand out the same token from its cache:
    until 5 minutes before expiry, and not past its `refresh_on` (0: ask every time)."""
    try:
        window = float(result["expires_in"]) - _MSAL_EXPIRY_BUFFER_S
        refresh_on = result.get("refresh_on")
        if refresh_on is not None:
            window = min(window, float(refresh_on) - wall_clock())
    except (KeyError, TypeError, ValueError):
        return 0.0
    return max(window, 0.0)


def _sign_in_hint(code: str | None) -> str:
    hints = {
        "AADSTS7000215": " — the client secret is wrong; put the secret's value (not its ID) "
        "in the configured source",
        "AADSTS7000222": " — the client secret has expired; create a new one",
        "AADSTS700016": " — check client_id and tenant_id of the identity",
        "AADSTS90002": " — check tenant_id of the identity",
        "AADSTS700027": " — the certificate is not registered on the application",
        "AADSTS70021": " — no federated credential on the application matches the token's "
        "issuer and subject",
        "AADSTS700024": " — the federated token file holds an expired token",
    }
    return hints.get(code or "", "")


def _certificate_credential(identity: IdentityConfig) -> dict[str, Any]:
    assert identity.certificate_file is not None
    path = identity.certificate_file
    password = identity.certificate_password.reveal() if identity.certificate_password else None
    if path.suffix.lower() in {".pfx", ".p12"}:
        credential: dict[str, Any] = {"private_key_pfx_path": str(path), "public_certificate": True}
        if password:
            credential["passphrase"] = password
        return credential
    pem = path.read_text(encoding="ascii")
    credential = {"private_key": pem, "public_certificate": pem}
    if password:
        credential["passphrase"] = password
    return credential


class _FederatedAssertion:
    """Reads the projected workload-identity token afresh on every acquisition."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def __call__(self) -> str:
        try:
            token = self._path.read_text(encoding="ascii").strip()
        except OSError as exc:
            raise SignInError(
                f"cannot read federated token file {self._path}: {exc.strerror}"
            ) from None
        if not token:
            raise SignInError(f"federated token file {self._path} is empty")
        register_secret(token)
        return token
