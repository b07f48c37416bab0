"""`token-broker once`: sign in, fetch every service (or those named), deliver, report, exit.

For Kubernetes init containers that put credentials on a shared volume before the app
starts, for CI jobs and for cron: what Vault Agent calls `exit_after_auth`. It is built
from the daemon's own parts (`broker.assembly`): the same store with the refresh policy
and the call budget, the same sign-ins, providers, persisted cache and file sinks. It
never listens.

Each service is fetched through the store, so pacing and the call budget hold. A failure
a retry can heal is retried on the daemon's backoff (Azure's `Retry-After` a floor) until
the deadline; one only an operator can fix (a sign-in Entra refuses, a missing role, a
service that does not exist) fails at once, and so does one whose next retry would come
after the deadline. At the deadline each unfinished service fails "timed out after S s".
Then every credential obtained is written to its sink and the sink's command run, to its
end or its own `command_timeout_s`, before the run returns.

With `[cache]` on, still-valid credentials are restored first and only the rest are asked
of Azure (a key is listed again: it may have been rotated); what is fetched is saved for
the daemon that starts next. A run of some services (`--service`) only reads the file:
saving would drop the others' credentials from it.

With `[fleet]` on, each service is asked of the fleet first, as a starting daemon asks it:
a credential the fleet holds that is not yet due is adopted with no Azure call, and what
it lacks is fetched under the service's lease and shared, so a run beside running brokers
costs Azure nothing. A fetch takes the fleet's workspace discovery and describe results,
and waits out a 429's hold-back that another broker shared. With Redis down the run fetches
alone, as without a fleet, and the report says so (`fleet: down`). The run does not
subscribe to the fleet's notices: a broker waiting on another's lease polls, every
`lease_s / 10` (at most 1 s).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from broker.assembly import Sources, new_fleet, new_store, persisted_sync, register_secrets
from broker.cache import Entry, Store
from broker.cache.store import FLEET
from broker.config import Config, ServiceConfig
from broker.delivery import Delivery, FileSinks
from broker.errors import ConfigError, ConfigProblem, UpstreamError
from broker.log import get_logger, scrub
from broker.models import AuthKind, Clock, Sleep, system_clock, system_sleep

log = get_logger("broker.oneshot")

DEFAULT_TIMEOUT_S = 60.0

# The states of a service in the report: its credential is fresh (fetched now, or restored
# and not yet due); stale (restored, its refresh failed: the restored one was delivered);
# failed (none: the fetch failed); timed_out (none by the deadline).
FRESH, STALE, FAILED, TIMED_OUT = "fresh", "stale", "failed", "timed_out"


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one service ended: never the credential, only what an operator needs."""

    service: str
    ok: bool
    state: str
    auth: str | None = None  # token, key or entra; None without a credential
    expires_on: float | None = None  # None for keys and without a credential
    source: str | None = None  # azure, fleet or cache; None without a credential
    sink: str | None = None  # the sink's file, when the service has one
    attempts: int = 0  # fetches asked of Azure (not those the fleet answered)
    reason: str | None = None  # why it failed; None when it succeeded
    status: int | None = None  # the HTTP status of the last failure, when it had one
    aad_code: str | None = None  # the AADSTS code of the last failure, when it had one


@dataclass(frozen=True, slots=True)
class Report:
    """Every selected service's outcome, in the configuration's order."""

    outcomes: tuple[Outcome, ...]
    timeout_s: float
    elapsed_s: float
    fleet: str | None = None  # the fleet's health at the end (up, down, unknown); None: off
    fleet_problem: str | None = None  # why the fleet could not be used, when it could not

    @property
    def ok(self) -> bool:
        return all(outcome.ok for outcome in self.outcomes)

    @property
    def failed(self) -> tuple[Outcome, ...]:
        return tuple(outcome for outcome in self.outcomes if not outcome.ok)

    @property
    def timed_out(self) -> bool:
        return any(outcome.state == TIMED_OUT for outcome in self.outcomes)


def select(config: Config, names: Sequence[str]) -> tuple[ServiceConfig, ...]:
    """The services named (all when none is), in the configuration's order; an unknown
    name is a configuration error."""
    if not names:
        return config.services
    known = ", ".join(service.name for service in config.services)
    problems = [
        ConfigProblem(
            str(config.path),
            "--service",
            f"no service named {name!r} in the configuration",
            f"name one of: {known}",
        )
        for name in dict.fromkeys(names)
        if config.service(name) is None
    ]
    if problems:
        raise ConfigError(problems)
    return tuple(service for service in config.services if service.name in names)


async def run_once(
    config: Config,
    services: Sequence[str] = (),
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    clock: Clock = system_clock,
    sleep: Sleep = system_sleep,
) -> Report:
    """Fetch the services named (all when none is), deliver them, and say how each ended."""
    chosen = select(config, services)
    # No single call to Azure may outlast the whole run.
    refresh = dataclasses.replace(
        config.refresh, timeout_s=min(config.refresh.timeout_s, timeout_s)
    )
    config = dataclasses.replace(config, refresh=refresh)
    register_secrets(config)
    started = clock()
    store = new_store(config.refresh, clock, sleep=sleep)
    sources = Sources(config, clock)
    store.reconcile([sources.wanted(service) for service in chosen])
    persisted = persisted_sync(
        config, store, clock, config.service_identity, saving=len(chosen) == len(config.services)
    )
    sinks = FileSinks(store, chosen)
    fetches = FirstFetches(store, sleep)
    fleet = new_fleet(config, config.service_identity)
    store.share(fleet)  # each fetch asks the fleet first, and shares what Azure gave
    sources.join(fleet)  # and the fleet's hold-backs, discoveries and describe results
    try:
        restored: set[str] = set()
        if persisted is not None:
            persisted.restore()
            restored = {entry.service for entry in store.entries if entry.token is not None}
        lacking = [entry.service for entry in store.entries if not _current(store, entry)]
        await fetches.run(lacking, deadline=started + timeout_s)
        sinks.start()  # after the fetches: each file is written once, with what the run got
        await sinks.idle()
    finally:
        await sinks.close(0.0)
        if persisted is not None:
            await persisted.close()
        if fleet is not None:
            await fleet.close()
        await sources.close()
    outcomes = tuple(
        _outcome(store, entry, fetches, sinks, restored, timeout_s) for entry in store.entries
    )
    report = Report(
        outcomes,
        timeout_s,
        round(clock() - started, 3),
        fleet=None if fleet is None else fleet.health,
        fleet_problem=None if fleet is None else fleet.problem,
    )
    log.info(
        "once.finished",
        ok=report.ok,
        services=len(outcomes),
        failed=[outcome.service for outcome in report.failed],
        elapsed_s=report.elapsed_s,
        fleet=report.fleet,
    )
    return report


def _current(store: Store, entry: Entry) -> bool:
    """Whether a restored credential may be delivered without asking Azure, as the daemon
    judges it (`Refresher.track`): usable, not yet due for refresh, and not a key."""
    token = entry.token
    if token is None or entry.obtained_at is None or not store.usable(entry):
        return False
    due = store.policy.refresh_at(token, entry.obtained_at)
    return token.auth is not AuthKind.KEY and due > store.clock()


class FirstFetches:
    """Each service's first credential through the store: retried on the policy's backoff
    while a retry can help and can start before the deadline, cut at the deadline."""

    def __init__(self, store: Store, sleep: Sleep = system_sleep) -> None:
        self._store = store
        self._sleep = sleep
        self.attempts: dict[str, int] = {}
        self.gave_up: dict[str, str] = {}  # service -> why no retry was made
        self.cut: set[str] = set()  # services still fetching at the deadline

    async def run(self, services: Iterable[str], *, deadline: float) -> None:
        tasks = [asyncio.ensure_future(self._fetch(name, deadline)) for name in services]
        if not tasks:
            return
        timer = asyncio.ensure_future(self._sleep(max(deadline - self._store.clock(), 0.0)))
        pending = set(tasks)
        try:
            while pending and not timer.done():
                _, pending = await asyncio.wait(
                    pending | {timer}, return_when=asyncio.FIRST_COMPLETED
                )
                pending.discard(timer)
        finally:
            timer.cancel()
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _fetch(self, service: str, deadline: float) -> None:
        entry = self._store.entry(service)
        try:
            while True:
                self.attempts[service] = self.attempts.get(service, 0) + 1
                try:
                    await self._store.fetch(service)
                except UpstreamError as exc:
                    delay = self._retry_in(service, exc, deadline)
                    if delay is None:
                        return
                    await self._sleep(delay)
                else:
                    if entry.origin == FLEET:  # adopted: this try asked Azure nothing
                        self.attempts[service] -= 1
                    return
        except asyncio.CancelledError:
            self.cut.add(service)
            if entry.inflight is not None:
                entry.inflight.cancel()
            raise

    def _retry_in(self, service: str, exc: UpstreamError, deadline: float) -> float | None:
        """When to try the service again, or None (and why, in `gave_up`) when not."""
        if not exc.retryable:
            self.gave_up[service] = "not retried: only an operator can fix this"
            return None
        store = self._store
        delay = store.policy.retry_in(store.entry(service).failures, exc.retry_after, True)
        if store.clock() + delay >= deadline:
            self.gave_up[service] = (
                f"not retried: the next try, in {delay:.1f} s, would come after the deadline"
            )
            return None
        return delay


def _outcome(
    store: Store,
    entry: Entry,
    fetches: FirstFetches,
    sinks: FileSinks,
    restored: set[str],
    timeout_s: float,
) -> Outcome:
    name = entry.service
    token = entry.token if store.usable(entry) else None
    error = entry.last_error
    sink = sinks.delivery(name)
    facts: dict[str, Any] = {
        "auth": token.auth.value if token else None,
        "expires_on": token.expires_on if token else None,
        "source": _source(entry, token, error, restored, fetches),
        "sink": None if sink is None else str(sink.path),
        "attempts": fetches.attempts.get(name, 0),
        "status": error.status if error else None,
        "aad_code": error.aad_code if error else None,
    }
    if name in fetches.cut:
        reason = f"timed out after {timeout_s:g} s"
        if error is not None:
            reason += f"; the last attempt failed: {error.message}"
        return _failed(name, TIMED_OUT, _delivered_meanwhile(reason, token), facts)
    if error is not None:
        reason = error.message
        if name in fetches.gave_up:
            reason += f" ({fetches.gave_up[name]})"
        state = STALE if token is not None else FAILED
        return _failed(name, state, _delivered_meanwhile(reason, token), facts)
    if token is None:  # the store let the fetch end without a credential: never expected
        return _failed(name, FAILED, "no credential was obtained", facts)
    problem = None if sink is None else _sink_problem(sink, entry)
    if problem is not None:
        return _failed(name, FRESH, problem, facts)
    return Outcome(name, True, FRESH, **facts)


def _source(
    entry: Entry, token: object, error: object, restored: set[str], fetches: FirstFetches
) -> str | None:
    """Where the credential delivered came from: Azure or the fleet when this run got it,
    else the persisted cache."""
    if token is None:
        return None
    name = entry.service
    fetched = name in fetches.attempts and name not in fetches.cut and error is None
    if name in restored and not fetched:
        return "cache"
    return "fleet" if entry.origin == FLEET else "azure"


def _failed(name: str, state: str, reason: str, facts: dict[str, Any]) -> Outcome:
    return Outcome(name, False, state, reason=scrub(reason), **facts)


def _delivered_meanwhile(reason: str, token: object) -> str:
    if token is None:
        return reason
    return reason + "; the credential restored from the cache was delivered, still valid"


def _sink_problem(delivery: Delivery, entry: Entry) -> str | None:
    """Why the sink did not deliver the entry's credential, or None when it did."""
    path = delivery.path
    if delivery.write_error is not None:
        return f"the credential could not be written to {path}: {delivery.write_error}"
    if delivery.written != entry.generation:
        return f"the credential was not written to {path}"
    command = delivery.command
    if command is None:
        return None
    if command.error is not None:
        return f"the sink's command could not start: {command.error}"
    if command.timed_out:
        return "the sink's command was killed at its command_timeout_s"
    if command.status != 0:
        return f"the sink's command exited with status {command.status}"
    return None


def as_json(report: Report) -> dict[str, Any]:
    """The report as `token-broker once --json` prints it (README: "One-shot runs")."""
    return {
        "ok": report.ok,
        "timeout_s": report.timeout_s,
        "elapsed_s": report.elapsed_s,
        "fleet": report.fleet,
        "services": [
            {
                "service": o.service,
                "ok": o.ok,
                "state": o.state,
                "auth": o.auth,
                "expires_on": _iso(o.expires_on),
                "source": o.source,
                "sink": o.sink,
                "attempts": o.attempts,
                "reason": o.reason,
                "status": o.status,
                "aad_code": o.aad_code,
            }
            for o in report.outcomes
        ],
    }


def as_text(report: Report) -> str:
    """The report as a table: service, state, expiry, source, reason."""
    columns = ("SERVICE", "STATE", "EXPIRES", "SOURCE", "REASON")
    rows = [
        (
            o.service,
            o.state,
            _iso(o.expires_on) or ("never (key)" if o.auth == AuthKind.KEY.value else "-"),
            o.source or "-",
            o.reason or "-",
        )
        for o in report.outcomes
    ]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns[:-1])]
    lines = []
    for row in (columns, *rows):
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    if report.fleet == "down":
        lines += ["", f"fleet: down, fetched alone: {report.fleet_problem or 'Redis failed'}"]
    return "\n".join(lines)


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")
