"""The demo cloud: one tenant, one service principal with a (fake) secret and Reader on
one workspace in eastus, two v1 web services — `fraud-aks` (AKS, token auth, short-lived
tokens so refreshes are visible) and `churn-aci` (ACI, key auth) — and three v2 online
endpoints — `fraud-v2` (AMLToken, the same short-lived tokens), `churn-v2` (Key) and
`sentiment-v2` (AADToken). Reader alone cannot fetch a v2 token or key, so the principal
is also granted the endpoints' token and listKeys actions.

Every value here is a demo-only fake that exists nowhere but in the emulator.
"""

from __future__ import annotations

from broker.emulator.records import ENDPOINT_LIST_KEYS_ACTION, ENDPOINT_TOKEN_ACTION
from broker.emulator.state import EmulatorState

TENANT_ID = "00000000-0000-0000-0000-0000000000aa"
CLIENT_ID = "11111111-1111-1111-1111-111111111111"
CLIENT_SECRET = "demo-client-secret"  # noqa: S105 - a fake the emulator alone accepts
SUBSCRIPTION_ID = "00000000-0000-0000-0000-000000000001"
RESOURCE_GROUP = "demo-rg"
WORKSPACE = "demo-ws"
REGION = "eastus"
TOKEN_SERVICE = "fraud-aks"  # noqa: S105 - a service name, not a password
KEY_SERVICE = "churn-aci"
ENDPOINT_TOKEN = "fraud-v2"  # noqa: S105 - an endpoint name, not a password
ENDPOINT_KEY = "churn-v2"
ENDPOINT_AAD = "sentiment-v2"


def demo_state(
    *,
    token_lifetime_s: float = 20.0,
    refresh_after_s: float = 8.0,
    refresh_placement: str = "normal",
) -> EmulatorState:
    """A fresh state holding the demo cloud; the token lifetimes and the refreshAfter
    placement (see `EmulatorState.set_token_lifetime`) apply to `fraud-aks`, the
    lifetimes to `fraud-v2` too."""
    state = EmulatorState()
    state.add_client(TENANT_ID, CLIENT_ID, secret=CLIENT_SECRET)
    workspace = (SUBSCRIPTION_ID, RESOURCE_GROUP, WORKSPACE)
    state.add_workspace(*workspace, region=REGION)
    state.grant_role(CLIENT_ID, *workspace, role="Reader")
    state.add_web_service(
        *workspace,
        TOKEN_SERVICE,
        compute_type="AKS",
        auth_enabled=False,
        aad_auth_enabled=True,
        token_lifetime_s=token_lifetime_s,
        refresh_after_s=refresh_after_s,
        refresh_placement=refresh_placement,
    )
    state.add_web_service(
        *workspace,
        KEY_SERVICE,
        compute_type="ACI",
        auth_enabled=True,
        aad_auth_enabled=False,
    )
    state.add_online_endpoint(
        *workspace,
        ENDPOINT_TOKEN,
        auth_mode="AMLToken",
        token_lifetime_s=token_lifetime_s,
        refresh_after_s=refresh_after_s,
    )
    state.add_online_endpoint(*workspace, ENDPOINT_KEY, auth_mode="Key")
    state.add_online_endpoint(*workspace, ENDPOINT_AAD, auth_mode="AADToken")
    for action in (ENDPOINT_TOKEN_ACTION, ENDPOINT_LIST_KEYS_ACTION):
        state.grant_action(CLIENT_ID, *workspace, action)
    return state
