"""The command line's spelling of faults and region outages (`--fault`, `--region-down`).

    ROUTE=SPEC[@SERVICE]      SPEC is one of
        STATUS                    answer STATUS (100-599) with Azure's error body
        STATUS:retry-after=SECS   the same, with `Retry-After: SECS`
        reset | hang | malformed | partial | cut | missing_fields
        slow:SECS                 answer normally, SECS seconds late
    REGION[=HOW]              HOW is reset (the default), hang, malformed or a STATUS

Parsing raises `ValueError` with a one-line message that names the accepted forms.
"""

from __future__ import annotations

import re
from typing import Final

from broker.emulator.faults import KINDS, ROUTES, Fault, Outage

FAULT_FORMS: Final = (
    "ROUTE=STATUS, ROUTE=STATUS:retry-after=SECONDS, ROUTE=slow:SECONDS or "
    "ROUTE=KIND with KIND one of reset, hang, malformed, partial, cut, missing_fields, expired, "
    "expiring, not_yet_valid; "
    "optionally @SERVICE at the end (e.g. mms.token=503@fraud-aks)"
)
OUTAGE_FORMS: Final = "REGION or REGION=HOW with HOW one of reset, hang, malformed or a status"

_SECONDS = r"\d+(?:\.\d*)?"
_STATUS = re.compile(rf"(?P<status>\d{{3}})(?::retry-after=(?P<retry_after>{_SECONDS}))?")
_SLOW = re.compile(rf"slow:(?P<delay>{_SECONDS})")
_NAMED_KINDS: Final = tuple(kind for kind in KINDS if kind not in ("status", "slow"))
_NAMED_OUTAGES: Final = ("reset", "hang", "malformed")


def parse_fault(text: str) -> Fault:
    """`mms.token=429:retry-after=5@fraud-aks` → the `Fault` it names."""
    route, equals, rest = text.partition("=")
    spec, at, service = rest.partition("@")
    if not (route and equals and spec) or (at and not service):
        raise _bad("fault", text, f"expected {FAULT_FORMS}")
    if route not in ROUTES:
        known = f"unknown route {route!r} (known: {', '.join(ROUTES)})"
        raise _bad("fault", text, f"{known}; expected {FAULT_FORMS}")
    try:
        return _fault(route, spec, service or None)
    except ValueError as exc:
        raise _bad("fault", text, f"{exc}; expected {FAULT_FORMS}") from None


def _fault(route: str, spec: str, service: str | None) -> Fault:
    if spec in _NAMED_KINDS:
        return Fault(route, service=service, kind=spec)
    if slow := _SLOW.fullmatch(spec):
        return Fault(route, service=service, kind="slow", delay_s=float(slow["delay"]))
    if status := _STATUS.fullmatch(spec):
        retry_after = status["retry_after"]
        return Fault(
            route,
            status=int(status["status"]),
            service=service,
            retry_after=None if retry_after is None else float(retry_after),
        )
    raise ValueError(f"unknown SPEC {spec!r}")


def parse_outage(text: str) -> Outage:
    """`eastus`, `eastus=hang` or `eastus=503` → the `Outage` it names."""
    region, equals, how = text.partition("=")
    if not region or (equals and not how):
        raise _bad("region outage", text, f"expected {OUTAGE_FORMS}")
    try:
        if not how or how in _NAMED_OUTAGES:
            return Outage(region, kind=how or "reset")
        if how.isdigit():
            return Outage(region, kind="status", status=int(how))
    except ValueError as exc:
        raise _bad("region outage", text, f"{exc}; expected {OUTAGE_FORMS}") from None
    raise _bad("region outage", text, f"expected {OUTAGE_FORMS}")


def _bad(what: str, text: str, detail: str) -> ValueError:
    return ValueError(f"{text!r} is not a {what}: {detail}")
