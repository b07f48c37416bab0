"""Every error the broker raises on purpose.

    BrokerError
    ├── ConfigError                 the configuration file cannot be used (CLI exit code 2)
    ├── UpstreamError               an Azure call failed; carries status, AADSTS code, retry hint
    │   ├── SignInError             Entra refused the service principal (AADSTS…)
    │   ├── PermissionDeniedError   403: the principal lacks a role on the workspace
    │   ├── NotFoundError           404: workspace or service does not exist
    │   ├── UnsupportedAuthError    the service's auth settings break Azure's rules
    │   ├── ThrottledError          429: Azure asks us to slow down
    │   ├── UnavailableError        5xx, reset, timeout: worth retrying soon
    │   ├── MalformedResponseError  a body we cannot trust; never half-served
    │   ├── UnusableCredentialError well-formed, but dead, not yet valid or dying first
    │   └── KeyRotationError        Azure's key regeneration ended Failed/Cancelled/TimedOut
    ├── FleetUnavailableError       Redis (fleet mode) did not answer in time, or refused us
    └── LocalRequestError           a local client's request is refused (HTTP status)
        ├── UnknownServiceError     404: no such service in the configuration
        ├── NotReadyError           503: no valid credential yet (Retry-After)
        ├── BadRequestError         400: the request itself is wrong
        ├── ForbiddenError          403: a guard or the service's access list refuses it
        ├── UpstreamFailedError     502: an operation asked of Azure failed
        │   ├── UpstreamUnreachableError  502: a proxied call got no usable answer
        │   └── UpstreamTimeoutError      504: a proxied call got no answer in time
        ├── PayloadTooLargeError    413: a proxied request's body is over the limit
        ├── NoScoringUriError       409: a proxied service has no scoring URI
        └── LeaseBusyError          409: another broker of the fleet holds the service's lease

Foreign exceptions (aiohttp, requests, MSAL, redis-py) are translated into these where
they enter, in `broker.credentials`, `broker.providers` and `broker.fleet`; nothing above
sees them.
Messages never contain a token, key or secret.
"""

from __future__ import annotations

from dataclasses import dataclass


class BrokerError(Exception):
    """Base of every error the broker raises on purpose."""


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One thing wrong with the configuration, said so an operator can fix it."""

    file: str
    key: str
    message: str
    fix: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        key = f" [{self.key}]" if self.key else ""
        return f"{where}:{key} {self.message} — {self.fix}"


class ConfigError(BrokerError):
    """Raised when the configuration file is unreadable, malformed or inconsistent."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class UpstreamError(BrokerError):
    """Raised when a call to Entra ID, ARM or Azure ML fails.

    `retryable` is False when retrying cannot help without an operator (bad secret,
    missing role, unknown service); the refresher then backs off long.
    """

    retryable = True

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        aad_code: str | None = None,
        retry_after: float | None = None,
        route: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.aad_code = aad_code
        self.retry_after = retry_after
        self.route = route


class SignInError(UpstreamError):
    """Raised when Entra ID refuses the service principal's sign-in."""

    retryable = False


class PermissionDeniedError(UpstreamError):
    """Raised on a 403: the principal lacks the role the call needs."""

    retryable = False


class NotFoundError(UpstreamError):
    """Raised on a 404 for the workspace or the web service."""

    retryable = False


class UnsupportedAuthError(UpstreamError):
    """Raised when a service's auth settings cannot work under Azure's rules."""

    retryable = False


class ThrottledError(UpstreamError):
    """Raised on a 429; `retry_after` holds Azure's hint when it gave one."""


class UnavailableError(UpstreamError):
    """Raised on 5xx answers, resets and timeouts."""


class MalformedResponseError(UpstreamError):
    """Raised when an answer cannot be parsed or lacks a field we need."""


class UnusableCredentialError(UpstreamError):
    """Raised when Azure's answer parses but its credential cannot be served on arrival:
    already expired, expiring within the clock-skew allowance, not yet valid, not
    printable, or a token that would expire before the one being served. The credential
    being served stays in place."""


class KeyRotationError(UpstreamError):
    """Raised when Azure's key regeneration operation ends without success."""

    retryable = False


class FleetUnavailableError(BrokerError):
    """Raised by `broker.fleet` when Redis cannot be used for an `operation` (read, lease,
    write, …): refused connections, timeouts, a refused login or ACL, a failed script.
    The broker then refreshes on its own, as without a fleet."""

    def __init__(self, message: str, *, operation: str) -> None:
        super().__init__(message)
        self.message = message
        self.operation = operation


class LocalRequestError(BrokerError):
    """Raised by local-API handlers; the error middleware turns it into JSON."""

    status = 400
    code = "bad_request"

    def __init__(
        self, message: str, *, retry_after: float | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        if code is not None:
            self.code = code


class UnknownServiceError(LocalRequestError):
    """Raised when a client names a service that is not configured."""

    status = 404
    code = "unknown_service"


class NotReadyError(LocalRequestError):
    """Raised when a service has no credential that may be served right now."""

    status = 503
    code = "not_ready"


class BadRequestError(LocalRequestError):
    """Raised when a client's request is malformed."""

    status = 400
    code = "bad_request"


class ForbiddenError(LocalRequestError):
    """Raised when a guard or a service's access list refuses the caller."""

    status = 403
    code = "forbidden"


class UpstreamFailedError(LocalRequestError):
    """Raised when an operation a client asked for (a key rotation) failed at Azure."""

    status = 502
    code = "upstream_failed"


class UpstreamUnreachableError(UpstreamFailedError):
    """Raised when a proxied call cannot connect, is cut off, or gets an answer that is not
    valid HTTP."""

    code = "upstream_unreachable"


class UpstreamTimeoutError(UpstreamFailedError):
    """Raised when a proxied call gets no answer within the proxy's timeout."""

    status = 504
    code = "upstream_timeout"


class PayloadTooLargeError(LocalRequestError):
    """Raised when a proxied request's body is longer than `[proxy] max_body_bytes`."""

    status = 413
    code = "payload_too_large"


class NoScoringUriError(LocalRequestError):
    """Raised when a proxied service has no scoring URI to forward to (an Entra scope,
    or a web service Azure described without one)."""

    status = 409
    code = "no_scoring_uri"


class LeaseBusyError(LocalRequestError):
    """Raised when an operation that must be the fleet's only one (a key rotation) cannot
    take the service's lease: another broker holds it, rotating or refreshing."""

    status = 409
    code = "lease_busy"
