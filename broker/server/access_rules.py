"""Who may fetch which service: peer credentials on the socket, API keys on TCP.

On the Unix socket the kernel tells us the caller's uid, gid, pid and groups
(`SO_PEERCRED`, `SO_PEERGROUPS`); a service with `allow_users`/`allow_groups` is
served only to those. On TCP there is no such truth, so a service with `api_keys`
is served only to a client presenting one of them in `X-Token-Broker-Key`; the
broker holds only their SHA-256 digests and compares in constant time. A service
restricted to users or groups and given no API key is not served on TCP at all.
Every refusal is logged as `access.denied` naming the caller, never a credential.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from broker.config import Config
from broker.errors import ForbiddenError
from broker.log import get_logger
from broker.server.guards import RequestView, header
from broker.server.peers import Peer

log = get_logger("broker.access")

API_KEY_HEADER = "X-Token-Broker-Key"
_API_KEY_NAME = API_KEY_HEADER.lower().encode()


@dataclass(frozen=True, slots=True)
class ServiceAccess:
    """One service's access rules, from its configuration."""

    uids: frozenset[int]
    gids: frozenset[int]
    keys: Mapping[str, bytes]  # key name -> SHA-256 digest

    @property
    def restricts_peers(self) -> bool:
        return bool(self.uids or self.gids)


class AccessRules:
    """Every service's policy; replaced whole on reload, and then whoever asked is told
    (open watch streams are judged again)."""

    def __init__(self, config: Config) -> None:
        self._policies: dict[str, ServiceAccess] = {}
        self._open: frozenset[str] = frozenset()
        self._told: list[Callable[[], None]] = []
        self.update(config)

    def on_update(self, listener: Callable[[], None]) -> None:
        """Call `listener` after every update of the rules."""
        self._told.append(listener)

    def update(self, config: Config) -> None:
        self._replace(config)
        for listener in self._told:
            listener()

    def permits(self, service: str, peer: Peer | None, unix: bool, digest: bytes | None) -> bool:
        """Whether a caller known by its peer credentials (on the socket) or the digest of
        the API key it presented (on TCP) may fetch `service`, by the rules of now: what
        `authorize` decides, without a request and without a log line."""
        if service in self._open:
            return True
        policy = self._policies.get(service)
        if policy is None or not (policy.restricts_peers or policy.keys):
            return True
        if unix:
            return not policy.restricts_peers or _peer_allowed(policy, peer)
        return digest is not None and bool(_matching(policy, digest))

    def _replace(self, config: Config) -> None:
        self._policies = {
            s.name: ServiceAccess(
                frozenset(s.allow_users),
                frozenset(s.allow_groups),
                {name: config.api_keys[name].sha256 for name in s.api_keys},
            )
            for s in config.services
        }
        # Services served to any local caller: the token route's one set lookup.
        self._open = frozenset(
            name for name, p in self._policies.items() if not (p.restricts_peers or p.keys)
        )

    def authorize(self, request: RequestView, service: str) -> None:
        """Return when the caller may fetch `service`; raise `ForbiddenError` otherwise."""
        if service in self._open:
            return
        policy = self._policies.get(service)
        if policy is None or not (policy.restricts_peers or policy.keys):
            return
        if request.unix:
            self._authorize_peer(request, service, policy)
        else:
            self._authorize_key(request, service, policy)

    def _authorize_peer(self, request: RequestView, service: str, policy: ServiceAccess) -> None:
        if not policy.restricts_peers:
            return  # API keys guard TCP; on the socket, its file mode does
        peer = request.peer
        if _peer_allowed(policy, peer):
            return
        caller: dict[str, object] = (
            {"pid": peer.pid, "uid": peer.uid, "gid": peer.gid} if peer else {"peer": "unknown"}
        )
        _deny(request, service, "unix", caller)

    def _authorize_key(self, request: RequestView, service: str, policy: ServiceAccess) -> None:
        digest = presented_digest(request)
        if digest is not None and policy.keys:
            if _matching(policy, digest):
                return
            _deny(request, service, "tcp", {"key": "not recognised"})
        reason = "no API key presented" if digest is None else "no API key is configured"
        _deny(request, service, "tcp", {"key": reason}, socket_only=not policy.keys)


def presented_digest(request: RequestView) -> bytes | None:
    """The SHA-256 of the API key the request presents, if any: all the broker keeps of it."""
    presented = header(request.raw_headers, _API_KEY_NAME)
    if presented is None:
        return None
    return hashlib.sha256(presented).digest()  # the bytes as sent, whatever they are


def _matching(policy: ServiceAccess, digest: bytes) -> list[str]:
    # Compare against every key, always, so timing says nothing about which matched.
    return [name for name, d in policy.keys.items() if hmac.compare_digest(d, digest)]


def _peer_allowed(policy: ServiceAccess, peer: Peer | None) -> bool:
    return peer is not None and bool(
        peer.uid in policy.uids or ({peer.gid} | peer.groups) & policy.gids
    )


def _deny(
    request: RequestView,
    service: str,
    listener: str,
    caller: dict[str, object],
    *,
    socket_only: bool = False,
) -> None:
    log.warning(
        "access.denied",
        service=service,
        route=request.path[:200],
        method=request.method,
        listener=listener,
        **caller,
    )
    if socket_only:
        message = (
            f"service {service!r} is served only to given users on the Unix socket; "
            "connect there, or ask the operator for an API key"
        )
    elif listener == "tcp":
        message = f"service {service!r} needs an API key: send it in the {API_KEY_HEADER} header"
    else:
        message = f"this user or group may not fetch service {service!r}"
    raise ForbiddenError(message, code="access_denied")
