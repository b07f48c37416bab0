"""What the providers learn of Azure that is no secret, shared with a fleet when there is one.

A web service's first fetch finds its workspace's regional MMS (ARM, then the discovery
URL) and describes the service; an online endpoint's describes the endpoint. Each broker
keeps what it learnt in memory. In fleet mode the same facts are shared (`SharedFacts`,
which `broker.fleet` implements), so a broker that joins, or restarts, fetches with no
discovery or describe call when another broker of the fleet has made them.

A fact is named by what it is about, the cloud included (`("workspace", resource_manager,
subscription, resource group, workspace)`), and is a small JSON object. It is used only as
the broker's own would be: a web service answered 404 is described again from Azure.
"""

from __future__ import annotations

from typing import Any, Protocol

from broker.log import get_logger

log = get_logger("broker.providers")

FactName = tuple[str, ...]
Fact = dict[str, Any]


class SharedFacts(Protocol):
    """Where a fleet keeps its facts. Both calls are bounded and never raise: a fleet that
    cannot be reached knows nothing, and remembers nothing."""

    async def recall(self, name: FactName) -> Fact | None:
        """The fact of that name another broker shared, or None."""

    async def remember(self, name: FactName, fact: Fact) -> None:
        """Share `fact` under `name` for the other brokers."""


class Facts:
    """The providers' door to the fleet's facts; knows nothing until it `share`s."""

    def __init__(self, shared: SharedFacts | None = None) -> None:
        self.shared = shared

    def share(self, shared: SharedFacts | None) -> None:
        """Share facts with the fleet from now on (None: alone again)."""
        self.shared = shared

    async def recall(self, name: FactName) -> Fact | None:
        if self.shared is None:
            return None
        return await self.shared.recall(name)

    async def remember(self, name: FactName, fact: Fact) -> None:
        if self.shared is not None:
            await self.shared.remember(name, fact)


def text(fact: Fact | None, field: str) -> str | None:
    """A fact's text field, or None when the fact lacks it or it is not text."""
    value = None if fact is None else fact.get(field)
    return value if isinstance(value, str) and value else None
