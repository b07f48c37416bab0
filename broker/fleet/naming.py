"""Where a service's shared state lives in Redis: three keys under one hash tag.

    {prefix}{<first 32 hex digits of the service's identity>}:credential   the sealed entry
    {prefix}{…}:lease                                                       the refresh lease
    {prefix}{…}:notices                                                     the pub/sub channel

and where a principal's hold-back on a subscription does (a 429's Retry-After), and a
fact the providers learnt of Azure (a workspace's discovery, a service's description):

    {prefix}{<first 32 hex digits of a digest of principal and subscription>}:holdback
    {prefix}{<first 32 hex digits of a digest of the fact's name>}:fact

The identity (`Config.service_identity`) digests the cloud, the principal and the Azure
coordinates, so brokers of different principals or services never share an entry, and
the prefix keeps deployments sharing one Redis apart. The braces are a Redis Cluster hash
tag: a script that touches a service's keys touches one hash slot.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.models import fingerprint

IDENTITY_DIGITS = 32  # 128 bits of the digest: collisions are not a concern


@dataclass(frozen=True, slots=True)
class ServiceKeys:
    """The Redis keys and channel of one service."""

    credential: str
    lease: str
    notices: str

    @classmethod
    def of(cls, prefix: str, identity: str) -> ServiceKeys:
        tag = f"{prefix}{{{identity[:IDENTITY_DIGITS]}}}"
        return cls(f"{tag}:credential", f"{tag}:lease", f"{tag}:notices")


def holdback_key(prefix: str, principal: str, subscription: str) -> str:
    """The key of a principal's hold-back on a subscription ("" for Entra alone): digested,
    like a service's, so that Redis's key space names no principal or subscription."""
    digest = fingerprint("holdback", principal.lower(), subscription.lower())
    return f"{prefix}{{{digest[:IDENTITY_DIGITS]}}}:holdback"


def fact_key(prefix: str, name: tuple[str, ...]) -> str:
    """The key of a fact: digested, so that Redis's key space names no workspace."""
    return f"{prefix}{{{fingerprint('fact', *name)[:IDENTITY_DIGITS]}}}:fact"
