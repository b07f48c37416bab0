"""The seam between the cache and whatever mints a service's credential."""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

from broker.models import AccessToken

KeyName = Literal["primary", "secondary"]


class TokenProvider(Protocol):
    """Fetches a fresh credential for one configured service."""

    @property
    def service(self) -> str: ...

    @property
    def has_scoring_host(self) -> bool:
        """Whether the service is a deployment that scoring requests can be forwarded to
        (False for an Entra scope, which is only a token)."""

    @property
    def scoring_uri(self) -> str | None:
        """Where clients send scoring requests, once the service has been described."""

    @property
    def clock_skew_s(self) -> float | None:
        """Azure's clock minus ours, as last seen in a `Date` header; None before any."""

    async def fetch(self) -> AccessToken: ...


@runtime_checkable
class RestoresScoringUri(Protocol):
    """A provider that can be told its scoring URI, saved with its credential before a
    restart, so that proxy mode forwards at once; its next describe replaces it."""

    def restore_scoring_uri(self, uri: str) -> None: ...


@runtime_checkable
class KeyRotator(Protocol):
    """A provider of a key service that can regenerate one key while serving the other."""

    serve_key: KeyName

    async def regenerate(self, which: KeyName, *, poll_s: float = 2.0) -> None: ...
