"""The records of the fake cloud: service principals, workspaces, v1 web services, v2
online endpoints, and the tokens and key-rotation operations the emulator has handed out.

Azure resource names are case-insensitive, so lookups use lower-cased keys while the
records keep the spelling they were created with.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from typing import Final

from cryptography import x509

WorkspaceKey = tuple[str, str, str]
ServiceKey = tuple[str, str, str, str]

PROVIDER = "Microsoft.MachineLearningServices"
PLACEMENTS: Final = ("normal", "past", "after_expiry", "absent")
AUTH_MODES: Final = ("Key", "AMLToken", "AADToken")

ENDPOINT_READ_ACTION: Final = f"{PROVIDER}/workspaces/onlineEndpoints/read"
ENDPOINT_TOKEN_ACTION: Final = f"{PROVIDER}/workspaces/onlineEndpoints/token/action"
ENDPOINT_LIST_KEYS_ACTION: Final = f"{PROVIDER}/workspaces/onlineEndpoints/listKeys/action"
ENDPOINT_REGENERATE_ACTION: Final = f"{PROVIDER}/workspaces/onlineEndpoints/regenerateKeys/action"


def workspace_key(subscription_id: str, resource_group: str, workspace: str) -> WorkspaceKey:
    return (subscription_id.lower(), resource_group.lower(), workspace.lower())


def stable_id(*parts: str) -> str:
    """A GUID derived from `parts`, the same in every run (object ids, workspace ids)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "token-broker-emulator:" + "/".join(parts)))


@dataclass(slots=True)
class Client:
    """A service principal (app registration) of one tenant and its credentials."""

    tenant_id: str
    client_id: str
    secret: str | None = field(repr=False)
    certificate: x509.Certificate | None
    federated_subject: str | None

    @property
    def object_id(self) -> str:
        return stable_id("oid", self.tenant_id.lower(), self.client_id.lower())


@dataclass(slots=True)
class Workspace:
    """An Azure ML workspace: an ARM resource that lives in one region."""

    subscription_id: str
    resource_group: str
    name: str
    region: str

    @property
    def key(self) -> WorkspaceKey:
        return workspace_key(self.subscription_id, self.resource_group, self.name)

    @property
    def workspace_id(self) -> str:
        return stable_id("workspace", *self.key)

    @property
    def arm_id(self) -> str:
        return (
            f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}"
            f"/providers/{PROVIDER}/workspaces/{self.name}"
        )


@dataclass(slots=True)
class WebService:
    """A v1 web service (AKS or ACI deployment) with its auth settings and keys."""

    workspace: Workspace
    name: str
    compute_type: str
    auth_enabled: bool
    aad_auth_enabled: bool
    token_lifetime_s: float
    refresh_after_s: float
    primary_key: str = field(repr=False)
    secondary_key: str = field(repr=False)
    refresh_placement: str = "normal"

    @property
    def key(self) -> ServiceKey:
        return (*self.workspace.key, self.name.lower())

    @property
    def service_id(self) -> str:
        """The service's own id: the audience of the tokens MMS issues for it."""
        return stable_id("service", *self.key)

    @property
    def supports_token(self) -> bool:
        return self.compute_type.upper() == "AKS" and self.aad_auth_enabled

    def refresh_after(self, issued_at: float, expires_at: int) -> int | None:
        """The `refreshAfter` of a token, whole epoch seconds, where the placement puts it:
        `refresh_after_s` past issue ("normal"), a minute before issue ("past"), a minute
        after expiry ("after_expiry"), or nowhere ("absent": the key is left out)."""
        if self.refresh_placement == "past":
            return math.floor(issued_at) - 60
        if self.refresh_placement == "after_expiry":
            return expires_at + 60
        if self.refresh_placement == "absent":
            return None
        return math.floor(issued_at + self.refresh_after_s)


@dataclass(slots=True)
class OnlineEndpoint:
    """A v2 managed online endpoint: an ARM resource of a workspace with one auth mode
    (`AUTH_MODES`); it has keys whatever the mode, but only `Key` lets them score."""

    workspace: Workspace
    name: str
    auth_mode: str
    token_lifetime_s: float
    refresh_after_s: float
    primary_key: str = field(repr=False)
    secondary_key: str = field(repr=False)

    @property
    def key(self) -> ServiceKey:
        return (*self.workspace.key, self.name.lower())

    @property
    def service_id(self) -> str:
        """The endpoint's own id: the audience of the AMLTokens ARM issues for it."""
        return stable_id("online-endpoint", *self.key)

    @property
    def arm_id(self) -> str:
        return f"{self.workspace.arm_id}/onlineEndpoints/{self.name}"


KeyHolder = WebService | OnlineEndpoint


@dataclass(slots=True)
class Operation:
    """An asynchronous key rotation: it runs on its first poll and succeeds on the next.
    `service` is the v1 web service or v2 online endpoint whose key it replaces."""

    id: str
    service: KeyHolder
    key_type: str  # "Primary" or "Secondary"
    new_value: str = field(repr=False)
    polls: int = 0
    state: str = "Running"


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """What the scoring endpoint needs to know about an MMS token or AMLToken it is shown:
    the `service_id` of the service or endpoint it was issued for, and its expiry."""

    service_id: str
    expires_at: float
