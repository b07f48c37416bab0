"""Who we are: the service principal's own Entra ID token, through MSAL."""

from __future__ import annotations

from broker.credentials.principal import Credential, ServicePrincipalCredential

__all__ = ["Credential", "ServicePrincipalCredential"]
