"""The emulator's in-memory cloud: who may sign in, which workspaces, web services and
online endpoints exist, who holds which role or action, what was issued, what was called
and which faults are armed.

Plain Python, no I/O: build it before the server starts, change it while it runs.
"""

from __future__ import annotations

import secrets
import time
from collections import Counter
from collections.abc import Callable
from typing import Literal, TypeAlias

from cryptography import x509

from broker.emulator.faults import Fault, FaultBook, Outage
from broker.emulator.records import (
    AUTH_MODES,
    PLACEMENTS,
    Client,
    IssuedToken,
    KeyHolder,
    OnlineEndpoint,
    Operation,
    ServiceKey,
    WebService,
    Workspace,
    WorkspaceKey,
    workspace_key,
)
from broker.emulator.signing import SigningKey

Clock = Callable[[], float]

FEDERATED_ISSUER = "https://oidc.emulator.invalid/workload-identity"
FEDERATED_AUDIENCE = "api://AzureADTokenExchange"
AUTHORISING_ROLES = frozenset({"reader", "contributor", "owner"})
# Reader may do every `…/read`; Contributor and Owner may also do every `…/action`.
ACTING_ROLES = frozenset({"contributor", "owner"})

Happening: TypeAlias = Literal["called", "abandoned"]
Listener: TypeAlias = Callable[[Happening, str], None]


class EmulatorState:
    """Everything the fake Entra ID, ARM and Azure ML know, plus call counts and faults."""

    def __init__(self, clock: Clock = time.time) -> None:
        self.clock = clock
        self.entra_token_lifetime_s = 3600.0
        self.calls: Counter[str] = Counter()
        self.faults = FaultBook()
        self.token_key = SigningKey.generate()
        self._federated_key: SigningKey | None = None
        self._clients: dict[tuple[str, str], Client] = {}
        self._workspaces: dict[WorkspaceKey, Workspace] = {}
        self._roles: dict[tuple[str, WorkspaceKey], set[str]] = {}
        self._actions: dict[tuple[str, WorkspaceKey], set[str]] = {}
        self._services: dict[ServiceKey, WebService] = {}
        self._endpoints: dict[ServiceKey, OnlineEndpoint] = {}
        self._service_calls: Counter[tuple[str, str]] = Counter()
        self._issued: dict[str, IssuedToken] = {}
        self._listeners: list[Listener] = []
        self._operations: dict[str, Operation] = {}

    # -- setting up the cloud -------------------------------------------------------------

    def add_client(
        self,
        tenant_id: str,
        client_id: str,
        *,
        secret: str | None = None,
        certificate_pem: str | bytes | None = None,
        federated_subject: str | None = None,
    ) -> None:
        """Register a service principal; `certificate_pem` is its public certificate."""
        certificate = None
        if certificate_pem is not None:
            pem = certificate_pem.encode() if isinstance(certificate_pem, str) else certificate_pem
            certificate = x509.load_pem_x509_certificate(pem)
        client = Client(tenant_id, client_id, secret, certificate, federated_subject)
        self._clients[(tenant_id.lower(), client_id.lower())] = client

    def add_workspace(
        self, subscription_id: str, resource_group: str, workspace: str, *, region: str = "eastus"
    ) -> None:
        ws = Workspace(subscription_id, resource_group, workspace, region)
        self._workspaces[ws.key] = ws

    def grant_role(
        self,
        client_id: str,
        subscription_id: str,
        resource_group: str,
        workspace: str,
        role: str = "Reader",
    ) -> None:
        key = (client_id.lower(), workspace_key(subscription_id, resource_group, workspace))
        self._roles.setdefault(key, set()).add(role.lower())

    def revoke_role(
        self,
        client_id: str,
        subscription_id: str,
        resource_group: str,
        workspace: str,
        role: str = "Reader",
    ) -> None:
        key = (client_id.lower(), workspace_key(subscription_id, resource_group, workspace))
        self._roles.get(key, set()).discard(role.lower())

    def grant_action(
        self,
        client_id: str,
        subscription_id: str,
        resource_group: str,
        workspace: str,
        action: str,
    ) -> None:
        """Grant one ARM action on the workspace (a custom role holding just that action),
        e.g. `Microsoft.MachineLearningServices/workspaces/onlineEndpoints/token/action`."""
        key = (client_id.lower(), workspace_key(subscription_id, resource_group, workspace))
        self._actions.setdefault(key, set()).add(action.lower())

    def revoke_action(
        self,
        client_id: str,
        subscription_id: str,
        resource_group: str,
        workspace: str,
        action: str,
    ) -> None:
        key = (client_id.lower(), workspace_key(subscription_id, resource_group, workspace))
        self._actions.get(key, set()).discard(action.lower())

    def add_web_service(
        self,
        subscription_id: str,
        resource_group: str,
        workspace: str,
        name: str,
        *,
        compute_type: str = "AKS",
        auth_enabled: bool = False,
        aad_auth_enabled: bool = True,
        token_lifetime_s: float = 3600.0,
        refresh_after_s: float | None = None,
        refresh_placement: str = "normal",
    ) -> None:
        """Deploy a web service into an existing workspace, with fresh random keys;
        `refresh_placement` is `set_token_lifetime`'s `placement`."""
        ws = self._workspaces.get(workspace_key(subscription_id, resource_group, workspace))
        if ws is None:
            raise ValueError(f"workspace {workspace!r} does not exist: call add_workspace first")
        if token_lifetime_s <= 0:
            raise ValueError("token_lifetime_s must be positive")
        _check_placement(refresh_placement)
        service = WebService(
            workspace=ws,
            name=name,
            compute_type=compute_type,
            auth_enabled=auth_enabled,
            aad_auth_enabled=aad_auth_enabled,
            token_lifetime_s=token_lifetime_s,
            refresh_after_s=token_lifetime_s / 2 if refresh_after_s is None else refresh_after_s,
            primary_key=secrets.token_urlsafe(32),
            secondary_key=secrets.token_urlsafe(32),
            refresh_placement=refresh_placement,
        )
        self._services[service.key] = service

    def add_online_endpoint(
        self,
        subscription_id: str,
        resource_group: str,
        workspace: str,
        name: str,
        *,
        auth_mode: str = "Key",
        token_lifetime_s: float = 3600.0,
        refresh_after_s: float | None = None,
    ) -> None:
        """Create a v2 managed online endpoint in an existing workspace, with fresh random
        keys; `auth_mode` is one of `AUTH_MODES`, the token times apply to AMLTokens
        (refreshAfter defaults to half the lifetime)."""
        ws = self._workspaces.get(workspace_key(subscription_id, resource_group, workspace))
        if ws is None:
            raise ValueError(f"workspace {workspace!r} does not exist: call add_workspace first")
        mode = {m.lower(): m for m in AUTH_MODES}.get(auth_mode.lower())
        if mode is None:
            raise ValueError(f"auth_mode must be one of {', '.join(AUTH_MODES)}, not {auth_mode!r}")
        if token_lifetime_s <= 0:
            raise ValueError("token_lifetime_s must be positive")
        taken = self.endpoint_at(ws.region, name)
        if taken is not None and taken.workspace is not ws:
            raise ValueError(f"an online endpoint {name!r} already exists in {ws.region!r}")
        endpoint = OnlineEndpoint(
            workspace=ws,
            name=name,
            auth_mode=mode,
            token_lifetime_s=token_lifetime_s,
            refresh_after_s=token_lifetime_s / 2 if refresh_after_s is None else refresh_after_s,
            primary_key=secrets.token_urlsafe(32),
            secondary_key=secrets.token_urlsafe(32),
        )
        self._endpoints[endpoint.key] = endpoint

    def set_token_lifetime(
        self,
        lifetime_s: float,
        *,
        refresh_after_s: float | None = None,
        service: str | None = None,
        placement: str = "normal",
    ) -> int:
        """Change the MMS token lifetime (and refreshAfter offset, default half of it) of
        every web service, or of the services named `service`; later tokens only. Returns
        how many services changed.

        `placement` puts refreshAfter where a misbehaving Azure might: "normal" (issue +
        offset), "past" (before issue), "after_expiry" (after expiryOn) or "absent".
        """
        if lifetime_s <= 0:
            raise ValueError("lifetime_s must be positive")
        _check_placement(placement)
        changed = 0
        for svc in self._services.values():
            if service is None or svc.name.lower() == service.lower():
                svc.token_lifetime_s = lifetime_s
                svc.refresh_after_s = lifetime_s / 2 if refresh_after_s is None else refresh_after_s
                svc.refresh_placement = placement
                changed += 1
        return changed

    # -- faults, counts and helpers for tests ---------------------------------------------

    def fail(
        self,
        route: str,
        *,
        status: int | None = 500,
        times: int | None = None,
        service: str | None = None,
        body: object = None,
        retry_after: float | str | None = None,
        delay_s: float = 0.0,
        kind: str = "status",
        region: str | None = None,
        expires_in_s: float = 1.0,
    ) -> Fault:
        """Make `route` answer `status`, or fail as `kind` says (see `Fault`); returns the
        armed fault."""
        fault = Fault(
            route, status, times, service, body, retry_after, delay_s, kind, region, expires_in_s
        )
        return self.faults.add(fault)

    def region_down(self, region: str, *, kind: str = "reset", status: int = 503) -> Outage:
        """Fail every request under `/regions/{region}/` (discovery, MMS, scoring) as
        `kind` says ("reset", "hang", "malformed", or "status" answering `status`) until
        `region_up` or `clear_faults`. Entra ID and ARM are global and stay up."""
        return self.faults.darken(Outage(region, kind, status))

    def region_up(self, region: str) -> bool:
        """End the outage of `region`; whether it was down."""
        return self.faults.lighten(region)

    def clear_faults(self) -> None:
        """Drop every armed fault and bring every dark region back."""
        self.faults.clear()

    def count(self, route: str, service: str | None = None) -> int:
        """Requests received on `route` (for one web service when `service` is given)."""
        if service is None:
            return self.calls[route]
        return self._service_calls[(route, service.lower())]

    def calls_by_service(self) -> dict[str, dict[str, int]]:
        by_route: dict[str, dict[str, int]] = {}
        for (route, service), n in self._service_calls.items():
            by_route.setdefault(route, {})[service] = n
        return by_route

    def record_call(self, route: str, service: str | None) -> None:
        self.calls[route] += 1
        if service is not None:
            self._service_calls[(route, service.lower())] += 1
        self.tell("called", route)

    def listen(self, listener: Listener) -> Callable[[], None]:
        """Tell `listener(what, route)` of each request counted ("called") and of each
        hung request its client gave up on ("abandoned"); returns what removes it. A way
        for tests to know what reached the emulator without sleeping."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def tell(self, what: Happening, route: str) -> None:
        for listener in list(self._listeners):
            listener(what, route)

    @property
    def federated_key(self) -> SigningKey:
        """The key of the emulated workload-identity issuer (made on first use)."""
        if self._federated_key is None:
            self._federated_key = SigningKey.generate()
        return self._federated_key

    def mint_federated_token(
        self, subject: str, *, audience: str = FEDERATED_AUDIENCE, lifetime_s: float = 3600
    ) -> str:
        """A workload-identity JWT as Kubernetes would project it into a pod."""
        now = self.clock()
        claims = {
            "iss": FEDERATED_ISSUER,
            "sub": subject,
            "aud": audience,
            "iat": int(now),
            "nbf": int(now),
            "exp": int(now + lifetime_s),
            "jti": secrets.token_urlsafe(12),
        }
        return self.federated_key.sign(claims)

    def current_keys(
        self, subscription_id: str, resource_group: str, workspace: str, name: str
    ) -> tuple[str, str]:
        service = self.web_service(subscription_id, resource_group, workspace, name)
        if service is None:
            raise KeyError(name)
        return service.primary_key, service.secondary_key

    def current_endpoint_keys(
        self, subscription_id: str, resource_group: str, workspace: str, name: str
    ) -> tuple[str, str]:
        endpoint = self.online_endpoint(subscription_id, resource_group, workspace, name)
        if endpoint is None:
            raise KeyError(name)
        return endpoint.primary_key, endpoint.secondary_key

    # -- lookups the handlers make --------------------------------------------------------

    def has_tenant(self, tenant_id: str) -> bool:
        return any(tenant == tenant_id.lower() for tenant, _ in self._clients)

    def client(self, tenant_id: str, client_id: str) -> Client | None:
        return self._clients.get((tenant_id.lower(), client_id.lower()))

    def workspace(
        self, subscription_id: str, resource_group: str, workspace: str
    ) -> Workspace | None:
        return self._workspaces.get(workspace_key(subscription_id, resource_group, workspace))

    def may_read(self, client_id: str, workspace: Workspace) -> bool:
        roles = self._roles.get((client_id.lower(), workspace.key), set())
        return bool(roles & AUTHORISING_ROLES)

    def may_perform(self, client_id: str, workspace: Workspace, action: str) -> bool:
        """Whether a role or a granted action lets the client do `action` on the workspace."""
        key = (client_id.lower(), workspace.key)
        roles = self._roles.get(key, set())
        if roles & ACTING_ROLES or action.lower() in self._actions.get(key, set()):
            return True
        return action.lower().endswith("/read") and bool(roles & AUTHORISING_ROLES)

    def web_service(
        self, subscription_id: str, resource_group: str, workspace: str, name: str
    ) -> WebService | None:
        key = (*workspace_key(subscription_id, resource_group, workspace), name.lower())
        return self._services.get(key)

    def scoring_target(self, region: str, workspace: str, name: str) -> WebService | None:
        """The service a scoring URI points at (the URI names no subscription or group)."""
        for service in self._services.values():
            ws = service.workspace
            if (ws.region.lower(), ws.name.lower(), service.name.lower()) == (
                region.lower(),
                workspace.lower(),
                name.lower(),
            ):
                return service
        return None

    def online_endpoint(
        self, subscription_id: str, resource_group: str, workspace: str, name: str
    ) -> OnlineEndpoint | None:
        key = (*workspace_key(subscription_id, resource_group, workspace), name.lower())
        return self._endpoints.get(key)

    def endpoint_at(self, region: str, name: str) -> OnlineEndpoint | None:
        """The endpoint a v2 scoring URI points at: its name is unique in its region."""
        for endpoint in self._endpoints.values():
            if (endpoint.workspace.region.lower(), endpoint.name.lower()) == (
                region.lower(),
                name.lower(),
            ):
                return endpoint
        return None

    # -- what the handlers hand out -------------------------------------------------------

    def remember_token(self, token: str, service: KeyHolder, expires_at: float) -> None:
        now = self.clock()
        self._issued = {t: i for t, i in self._issued.items() if i.expires_at > now}
        self._issued[token] = IssuedToken(service.service_id, expires_at)

    def token_is_valid(self, token: str, service: KeyHolder) -> bool:
        issued = self._issued.get(token)
        if issued is None or issued.service_id != service.service_id:
            return False
        return self.clock() < issued.expires_at

    def start_key_rotation(self, service: KeyHolder, key_type: str, value: str) -> Operation:
        operation = Operation(secrets.token_hex(16), service, key_type, value)
        self._operations[operation.id] = operation
        return operation

    def operation(self, operation_id: str) -> Operation | None:
        return self._operations.get(operation_id)

    def poll_operation(self, operation: Operation) -> Operation:
        """Advance a rotation: Running on the first poll, Succeeded (key replaced) after."""
        operation.polls += 1
        if operation.polls >= 2 and operation.state == "Running":
            service = operation.service
            if operation.key_type == "Primary":
                service.primary_key = operation.new_value
            else:
                service.secondary_key = operation.new_value
            operation.state = "Succeeded"
        return operation


def _check_placement(placement: str) -> None:
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, not {placement!r}")
