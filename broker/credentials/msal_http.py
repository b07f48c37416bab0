"""The requests session MSAL signs in through: every call bounded by the broker's timeout,
Entra's 429s remembered as MSAL's own throttle cache replays them. Imported with MSAL, on
the first sign-in, not when the broker starts."""

from __future__ import annotations

from typing import Any

import requests

from broker.config import CloudProfile
from broker.models import wall_clock

_MSAL_THROTTLE_S, _MSAL_THROTTLE_MAX_S = 5.0, 3600.0  # how long MSAL replays a 429 itself


class BoundedSession(requests.Session):
    """A requests session whose every call has a timeout.

    MSAL passes its own timeout to the token request but not to every call (the
    OpenID discovery in its constructor has none), and a call without one can
    hang a worker thread forever on a peer that accepted but never answers.
    """

    def __init__(self, timeout_s: float) -> None:
        super().__init__()
        self.timeout_s = timeout_s
        # When Entra's last 429 asked us to wait until, on the wall clock MSAL's own throttle
        # cache keeps: MSAL answers the same 429 from it until then, without calling, and
        # without saying it was one.
        self.throttled_until: float | None = None
        self.retry_after_s: float | None = None

    def request(self, method: str | bytes, url: str | bytes, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        kwargs["timeout"] = self.timeout_s  # ours, so that a reload can change it
        response = super().request(method, url, **kwargs)
        if response.status_code == 429:
            self.retry_after_s = _seconds(response.headers.get("Retry-After"))
            wait = self.retry_after_s if self.retry_after_s is not None else _MSAL_THROTTLE_S
            self.throttled_until = wall_clock() + min(wait, _MSAL_THROTTLE_MAX_S)
        elif method in ("POST", b"POST"):
            self.throttled_until = None  # Entra answered a sign-in otherwise since
        return response

    def throttled(self) -> bool:
        """Whether Entra's last 429 still stands (MSAL would answer it again)."""
        until = self.throttled_until
        return until is not None and wall_clock() <= until


def http_session(cloud: CloudProfile, timeout_s: float = 30.0) -> requests.Session:
    """A requests session trusting exactly the cloud profile's CA, with bounded calls.

    `trust_env` is off so REQUESTS_CA_BUNDLE or a proxy variable in the daemon's
    environment cannot silently replace the CA we were told to trust.
    """
    session = BoundedSession(timeout_s)
    session.trust_env = False
    session.verify = str(cloud.ca_bundle) if cloud.ca_bundle else True
    return session


def _seconds(value: str | None) -> float | None:
    """A `Retry-After` in seconds, the only form Entra sends; None when absent or other."""
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())
