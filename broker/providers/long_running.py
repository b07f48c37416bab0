"""Waiting for Azure's long-running operations: a key regeneration, v1 or v2.

Both APIs answer `regenerateKeys` with an operation to poll; they differ in where it
is (`Operation-Location` for MMS, `Azure-AsyncOperation` or `Location` for ARM) and in
how it reports its end (`state` for MMS, `status` for ARM). The loop is the same: poll
after Azure's `Retry-After` or our interval, until it ends or a deadline passes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from broker.errors import KeyRotationError, UnavailableError
from broker.log import get_logger, scrub
from broker.models import Clock, system_clock
from broker.providers.upstream import Reply, retry_after

log = get_logger("broker.providers.operations")

SUCCEEDED = frozenset({"Succeeded"})
ENDED_BADLY = frozenset({"Failed", "Cancelled", "Canceled", "TimedOut"})


async def wait_for_regeneration(
    call: Callable[[str, str, str, str], Awaitable[Reply]],
    bearer: Callable[[], Awaitable[str]],
    location: str,
    state_of: Callable[[Reply], str | None],
    *,
    service: str,
    which: str,
    route: str,
    poll_s: float,
    within_s: float,
    clock: Clock,
) -> None:
    """Poll a key regeneration's `location` until it ends, as `wait_for_operation` does,
    with a fresh ARM token for each poll (a regeneration may outlast one); log its end.
    `call(method, url, route, bearer)` is the provider's own call to Azure."""

    async def poll() -> Reply:
        return await call("GET", location, route, await bearer())

    await wait_for_operation(
        poll,
        state_of,
        what=f"regenerating the {which} key of {service!r}",
        route=route,
        poll_s=poll_s,
        within_s=within_s,
        clock=clock,
    )
    log.info("keys.regenerated", service=service, key=which)


async def wait_for_operation(
    poll: Callable[[], Awaitable[Reply]],
    state_of: Callable[[Reply], str | None],
    *,
    what: str,
    route: str,
    poll_s: float,
    within_s: float,
    clock: Clock = system_clock,
) -> None:
    """Poll until the operation succeeds; raise `KeyRotationError` with Azure's error when
    it ends badly and `UnavailableError` when it outlasts `within_s`. `what` names the
    operation in messages ("regenerating the primary key of 'x'")."""
    deadline = clock() + within_s
    while True:
        reply = await poll()
        state = state_of(reply)
        if state in SUCCEEDED:
            return
        if state in ENDED_BADLY:
            raise KeyRotationError(
                f"{what} ended {state}: {operation_error(reply.body)}", route=route
            )
        if clock() >= deadline:
            raise UnavailableError(
                f"{what} did not finish within {within_s:.0f} s (last state {state!r})",
                route=route,
            )
        await asyncio.sleep(retry_after(reply.headers, clock()) or poll_s)


def operation_error(body: Any) -> str:
    """Azure's reason for an operation that ended badly, scrubbed of anything secret."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code, message = error.get("code"), error.get("message")
        return scrub(f"{code}: {message}" if code else str(message))
    return "Azure gave no reason"
