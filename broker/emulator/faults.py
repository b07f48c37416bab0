"""Injected faults: make an emulated route fail (or slow down) on purpose.

A `Fault` is matched against each request by route name and, optionally, by web-service
name. Faults are taken in the order they were added, so `fail(route, status=500,
times=2)` then `fail(route, status=429)` answers two 500s and then 429s.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Final

ROUTES: Final = (
    "entra.openid",
    "entra.keys",
    "entra.token",
    "arm.workspace",
    "discovery",
    "mms.describe",
    "mms.token",
    "mms.listkeys",
    "mms.regenerate",
    "mms.operation",
    "score",
)

_NUMBER = (int, float)


@dataclass(slots=True)
class Fault:
    """One injected fault.

    `status` None means "only delay, then answer normally". `body` None means an error
    body in Azure's shape for the route; a `str` is sent verbatim (malformed JSON
    included); anything else is sent as JSON. `times` None means until cleared.
    """

    route: str
    status: int | None = 500
    times: int | None = None
    service: str | None = None
    body: object = None
    retry_after: float | str | None = None
    delay_s: float = 0.0

    def __post_init__(self) -> None:
        if self.route not in ROUTES:
            raise ValueError(f"unknown route {self.route!r}; known routes: {', '.join(ROUTES)}")
        if self.status is not None and not 100 <= self.status <= 599:
            raise ValueError(f"status must be an HTTP status code, not {self.status}")
        if self.times is not None and self.times < 1:
            raise ValueError("times must be at least 1, or None for until cleared")
        if self.delay_s < 0:
            raise ValueError("delay_s must not be negative")

    @property
    def spent(self) -> bool:
        return self.times is not None and self.times <= 0

    def matches(self, route: str, service: str | None) -> bool:
        if route != self.route or self.spent:
            return False
        return self.service is None or (service or "").lower() == self.service.lower()

    def consume(self) -> None:
        if self.times is not None:
            self.times -= 1

    def retry_after_header(self) -> str | None:
        if self.retry_after is None or isinstance(self.retry_after, str):
            return self.retry_after
        if float(self.retry_after).is_integer():
            return str(int(self.retry_after))
        return f"{self.retry_after:g}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object) -> Fault:
        """A fault from the control API's JSON body; `ValueError` names what is wrong."""
        if not isinstance(data, dict):
            raise ValueError("the body must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown fields: {', '.join(unknown)}")
        _check_types(data)
        return cls(**data)


def _check_types(data: dict[str, Any]) -> None:
    expected: dict[str, tuple[type, ...]] = {
        "route": (str,),
        "status": (int, type(None)),
        "times": (int, type(None)),
        "service": (str, type(None)),
        "retry_after": (*_NUMBER, str, type(None)),
        "delay_s": _NUMBER,
    }
    if "route" not in data:
        raise ValueError("route is required")
    for name, types in expected.items():
        value = data.get(name)
        if name in data and (isinstance(value, bool) or not isinstance(value, types)):
            raise ValueError(f"{name} has the wrong type")


class FaultBook:
    """The faults in force, in the order they were added."""

    def __init__(self) -> None:
        self._faults: list[Fault] = []

    def add(self, fault: Fault) -> Fault:
        self._faults.append(fault)
        return fault

    def take(self, route: str, service: str | None) -> Fault | None:
        """The first fault matching this request, its use counted; None when none does."""
        for fault in self._faults:
            if fault.matches(route, service):
                fault.consume()
                if fault.spent:
                    self._faults.remove(fault)
                return fault
        return None

    def clear(self) -> int:
        cleared = len(self._faults)
        self._faults.clear()
        return cleared

    def active(self) -> list[Fault]:
        return [fault for fault in self._faults if not fault.spent]
