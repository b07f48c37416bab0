"""Injected faults: make an emulated route fail, slow down or misbehave on purpose.

A `Fault` is matched against each request by route name and, optionally, by the name of
the web service or online endpoint (`service`) and by region (requests under
`/regions/{region}/`). Faults are taken in the order they were added, so
`fail(route, status=500, times=2)` then `fail(route, status=429)` answers two 500s and
then 429s. A region outage (`FaultBook.darken`) beats every fault:
while a region is dark, each of its requests fails and no fault is consumed.

How each kind looks on the wire is `broker.emulator.sabotage`'s business.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Final

ROUTES: Final = (
    "entra.openid",
    "entra.keys",
    "entra.token",
    "arm.workspace",
    "arm.endpoint",
    "arm.endpoint_token",
    "arm.endpoint_keys",
    "arm.endpoint_regenerate",
    "arm.operation",
    "discovery",
    "mms.describe",
    "mms.token",
    "mms.listkeys",
    "mms.regenerate",
    "mms.operation",
    "score",
)
REGIONAL_ROUTES: Final = frozenset(
    r for r in ROUTES if r.split(".")[0] in ("discovery", "mms", "score")
)
# Kinds that shape the token a token route issues instead of breaking the answer.
VALIDITY_KINDS: Final = ("expired", "expiring", "not_yet_valid")
KINDS: Final = (
    "status",
    "reset",
    "hang",
    "slow",
    "malformed",
    "partial",
    "cut",
    "missing_fields",
    *VALIDITY_KINDS,
)
OUTAGE_KINDS: Final = ("reset", "hang", "status", "malformed")

_NUMBER = (int, float)


@dataclass(slots=True)
class Fault:
    """One injected fault.

    `kind` says how the request fails (see `sabotage`); `status`, `body` and
    `retry_after` shape the answer of kind "status" only, and `status` is None for every
    other kind (`status=None` with kind "status" is the old spelling of kind "slow").
    `body` None means an error body in Azure's shape for the route; a `str` is sent
    verbatim (malformed JSON included); anything else is sent as JSON. Kind "malformed"
    sends `body` too when it is a `str`. `delay_s` is waited before any kind acts.
    `times` None means until cleared. `region` limits the fault to requests under
    `/regions/{region}/`. The validity kinds answer a well-formed token that cannot be
    used on arrival: "expired" (a minute ago), "expiring" (`expires_in_s` after it is
    issued, as if issued a lifetime earlier) and "not_yet_valid" (its `nbf` half a
    lifetime away); on other routes they answer normally.
    """

    route: str
    status: int | None = 500
    times: int | None = None
    service: str | None = None
    body: object = None
    retry_after: float | str | None = None
    delay_s: float = 0.0
    kind: str = "status"
    region: str | None = None
    expires_in_s: float = 1.0

    def __post_init__(self) -> None:
        if self.route not in ROUTES:
            raise ValueError(f"unknown route {self.route!r}; known routes: {', '.join(ROUTES)}")
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}; known kinds: {', '.join(KINDS)}")
        if self.status is not None and not 100 <= self.status <= 599:
            raise ValueError(f"status must be an HTTP status code, not {self.status}")
        if self.times is not None and self.times < 1:
            raise ValueError("times must be at least 1, or None for until cleared")
        if self.delay_s < 0:
            raise ValueError("delay_s must not be negative")
        if self.expires_in_s < 0:
            raise ValueError("expires_in_s must not be negative")
        if self.kind == "status" and self.status is None:
            self.kind = "slow"
        if self.kind != "status":
            self.status = None

    @property
    def spent(self) -> bool:
        return self.times is not None and self.times <= 0

    def matches(self, route: str, service: str | None, region: str | None = None) -> bool:
        if route != self.route or self.spent:
            return False
        return _same(self.service, service) and _same(self.region, region)

    def consume(self) -> None:
        if self.times is not None:
            self.times -= 1

    def retry_after_header(self) -> str | None:
        """`Retry-After` as sent: seconds as given, or a string (e.g. an `http_date`)."""
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
            raise ValueError("the body must be a JSON object")  # noqa: TRY004 — a 400, like the rest
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown fields: {', '.join(unknown)}")
        _check_types(data)
        return cls(**data)


def _same(wanted: str | None, actual: str | None) -> bool:
    """A scope of None matches everything; names compare case-insensitively, as Azure's."""
    return wanted is None or (actual or "").lower() == wanted.lower()


def _check_types(data: dict[str, Any]) -> None:
    expected: dict[str, tuple[type, ...]] = {
        "route": (str,),
        "status": (int, type(None)),
        "times": (int, type(None)),
        "service": (str, type(None)),
        "retry_after": (*_NUMBER, str, type(None)),
        "delay_s": _NUMBER,
        "kind": (str,),
        "region": (str, type(None)),
        "expires_in_s": _NUMBER,
    }
    if "route" not in data:
        raise ValueError("route is required")
    for name, types in expected.items():
        value = data.get(name)
        if name in data and (isinstance(value, bool) or not isinstance(value, types)):
            raise ValueError(f"{name} has the wrong type")


@dataclass(frozen=True, slots=True)
class Outage:
    """A dark region: every request under `/regions/{region}/` fails as `kind` says."""

    region: str
    kind: str = "reset"
    status: int = 503

    def __post_init__(self) -> None:
        if not self.region or "/" in self.region:
            raise ValueError(f"region must be a region name, not {self.region!r}")
        if self.kind not in OUTAGE_KINDS:
            raise ValueError(
                f"an outage's kind must be one of {', '.join(OUTAGE_KINDS)}, not {self.kind!r}"
            )
        if not 100 <= self.status <= 599:
            raise ValueError(f"status must be an HTTP status code, not {self.status}")

    def fault(self, route: str) -> Fault:
        """The fault this outage inflicts on one request of `route`."""
        return Fault(route, status=self.status, kind=self.kind, region=self.region)

    def to_json(self) -> dict[str, Any]:
        return {"region": self.region, "kind": self.kind, "status": self.status}


class FaultBook:
    """The faults in force, in the order they were added, and the dark regions."""

    def __init__(self) -> None:
        self._faults: list[Fault] = []
        self._outages: dict[str, Outage] = {}

    def add(self, fault: Fault) -> Fault:
        self._faults.append(fault)
        return fault

    def take(self, route: str, service: str | None, region: str | None = None) -> Fault | None:
        """The outage or first fault matching this request, its use counted; else None."""
        outage = self._outages.get((region or "").lower())
        if outage is not None and route in REGIONAL_ROUTES:
            return outage.fault(route)
        for fault in self._faults:
            if fault.matches(route, service, region):
                fault.consume()
                if fault.spent:
                    self._faults.remove(fault)
                return fault
        return None

    def darken(self, outage: Outage) -> Outage:
        self._outages[outage.region.lower()] = outage
        return outage

    def lighten(self, region: str) -> bool:
        """End the outage of `region`; whether there was one."""
        return self._outages.pop(region.lower(), None) is not None

    def outages(self) -> list[Outage]:
        return list(self._outages.values())

    def clear(self) -> int:
        """Drop every fault and end every outage; the number of faults dropped."""
        cleared = len(self._faults)
        self._faults.clear()
        self._outages.clear()
        return cleared

    def active(self) -> list[Fault]:
        return [fault for fault in self._faults if not fault.spent]
