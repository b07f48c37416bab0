"""Entra ID scopes as services: the principal's own token for any Azure API.

For APIs that take the service principal's Entra token directly — Azure ML v2
endpoints in `AADToken` mode (`https://ml.azure.com/.default`), Azure Storage, Key
Vault … — the credential is MSAL's token for the configured scope. MSAL keeps it
cached and renews it near its expiry; the broker's refreshes ask MSAL, which answers
from its cache until then. Entra's 429 holds the principal back, as ARM's does.
"""

from __future__ import annotations

from broker.config import EntraScopeConfig
from broker.credentials import Credential
from broker.errors import ThrottledError
from broker.models import AccessToken
from broker.providers.throttle import Throttles


class EntraProvider:
    """Serves the principal's Entra token for one scope."""

    has_scoring_host = False
    scoring_uri: str | None = None
    clock_skew_s: float | None = None

    def __init__(
        self, config: EntraScopeConfig, credential: Credential, throttles: Throttles | None = None
    ) -> None:
        self._config = config
        self._scope = config.scope
        self._credential = credential
        self._throttles = throttles or Throttles()
        # Entra throttles the principal, in no subscription (as the call budget counts it)
        self._throttle_key = (credential.principal, "")

    @property
    def service(self) -> str:
        return self._config.name

    async def fetch(self) -> AccessToken:
        await self._throttles.check(self._throttle_key, "entra.token")
        try:
            return await self._credential.get_token(self._scope)
        except ThrottledError as exc:
            await self._throttles.note(self._throttle_key, exc.retry_after)
            raise
