"""The seam between the cache and whatever mints a service's credential."""

from __future__ import annotations

from typing import Protocol

from broker.models import AccessToken


class TokenProvider(Protocol):
    """Fetches a fresh credential for one configured service."""

    @property
    def service(self) -> str: ...

    @property
    def scoring_uri(self) -> str | None:
        """Where clients send scoring requests, once the service has been described."""

    @property
    def clock_skew_s(self) -> float | None:
        """Azure's clock minus ours, as last seen in a `Date` header; None before any."""

    async def fetch(self) -> AccessToken: ...
