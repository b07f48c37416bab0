"""One entry per service, and at most one upstream fetch in flight per service.

An entry keeps the last credential Azure gave us and what happened since; its
`State` is derived from those facts, never stored. A failed fetch leaves a still
valid credential in place: it is served, and the entry reports `stale`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from broker.cache.budget import CallBudget, PrincipalKey
from broker.cache.policy import Policy
from broker.cache.sharing import Lease, SharedCredentials
from broker.errors import (
    FleetUnavailableError,
    NotReadyError,
    UnknownServiceError,
    UnusableCredentialError,
    UpstreamError,
)
from broker.log import forget_secret, get_logger
from broker.models import AccessToken, Clock, Sleep, State, system_clock, system_sleep
from broker.providers import RestoresScoringUri, TokenProvider
from broker.saved_credentials import Saved

log = get_logger("broker.cache")

_COLD_WAIT_S = 30.0  # how long a client waits for a first fetch before getting 503
# Where a credential came from, as status and metrics say it.
AZURE, FLEET, CACHE = "azure", "fleet", "cache"
ORIGINS = (AZURE, FLEET)  # what a fetch ends with (a restore from the cache is not one)
_LEASE_WAITS = 2  # a broker waits at most this many lease_s on another's lease, then goes alone
# Unique across entries, so a service removed and added again by a reload can never
# be mistaken for its former self by a reader that caches renderings by generation.
_generations = itertools.count(1)


@dataclass(slots=True)
class Entry:
    """A service's cached credential and the record of its refreshes."""

    service: str
    provider: TokenProvider
    token: AccessToken | None = None
    obtained_at: float | None = None
    last_success_at: float | None = None
    last_error: UpstreamError | None = None
    last_error_at: float | None = None
    failures: int = 0
    next_attempt_at: float | None = None
    last_attempt_at: float | None = None  # when the latest fetch started
    last_call_at: float | None = None  # when the provider was last asked (after pacing)
    generation: int = 0  # changes whenever `token` changes; lets readers cache renderings
    inflight: asyncio.Task[AccessToken] | None = None
    principal: PrincipalKey = ("", "")  # whose call budget its fetches spend
    budget_waits: int = 0  # fetches that waited for the call budget
    due_at_once: int = 0  # successes in a row whose credential asked to be refreshed at once
    target: object = None  # which Azure service, fetched how (see `Wanted`)
    signer: object = None  # who signs in to fetch it
    origin: str | None = None  # where `token` came from: AZURE, FLEET or CACHE

    def saved(self) -> Saved | None:
        """The credential as it is shared or saved, with when it came and where to call."""
        if self.token is None or self.obtained_at is None:
            return None
        return Saved(self.token, self.obtained_at, self.provider.scoring_uri)


@dataclass(frozen=True, slots=True)
class Wanted:
    """A service as a configuration defines it, for `Store.reconcile`.

    `target` says which Azure service is fetched and how (equal targets share a
    credential); `signer` says who signs in for it (a new signer keeps the credential
    and fetches again at once); `principal` is whose call budget its fetches spend.
    """

    provider: TokenProvider
    target: object
    signer: object
    principal: PrincipalKey = ("", "")

    @property
    def service(self) -> str:
        return self.provider.service


@dataclass(frozen=True, slots=True)
class Reconciled:
    """What `Store.reconcile` did to each service, by name."""

    added: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()  # same target and signer: credential and schedule stay
    resigned: tuple[str, ...] = ()  # same target, new signer: credential stays, fetch now
    replaced: tuple[str, ...] = ()  # another target under the same name: starts from nothing
    removed: tuple[str, ...] = ()

    @property
    def changed(self) -> tuple[str, ...]:
        return self.resigned + self.replaced


class Store:
    """The in-memory cache of every service's credential."""

    def __init__(
        self,
        providers: Iterable[TokenProvider],
        policy: Policy | None = None,
        clock: Clock = system_clock,
        max_concurrency: int = 4,
        client_refresh_window_s: float = 10.0,
        *,
        sleep: Sleep = system_sleep,
        budget: CallBudget | None = None,
    ) -> None:
        self.policy = policy or Policy()
        self.clock = clock
        self.sleep = sleep
        self.client_refresh_window_s = client_refresh_window_s
        self.budget = budget
        self._entries = {p.service: Entry(p.service, p) for p in providers}
        self._listeners: list[Callable[[Entry], None]] = []
        self._waiters: list[asyncio.Future[None]] = []
        # Bounds calls to Azure, which throttles per principal and per subscription:
        # a thousand services starting at once queue here instead of bursting.
        self.max_concurrency = max_concurrency
        self._upstream_slots = asyncio.Semaphore(max_concurrency)
        self.shared: SharedCredentials | None = None
        self._adoptions: set[asyncio.Task[None]] = set()

    def share(self, shared: SharedCredentials | None) -> None:
        """Refresh through a fleet from now on (None: alone again)."""
        self.shared = shared
        if shared is not None:
            shared.on_notice(self._noticed)

    def configure(
        self, policy: Policy, max_concurrency: int, client_refresh_window_s: float
    ) -> None:
        """Apply a reloaded `[refresh]`: fetches under way finish under the old bounds."""
        self.policy = policy
        self.client_refresh_window_s = client_refresh_window_s
        self.max_concurrency = max_concurrency
        self._upstream_slots = asyncio.Semaphore(max_concurrency)

    def add(self, provider: TokenProvider) -> Entry:
        """Serve a new service (one with no target or signer to reconcile against)."""
        return self._add(Wanted(provider, None, None))

    def _add(self, wanted: Wanted) -> Entry:
        entry = Entry(wanted.service, wanted.provider)
        entry.target, entry.signer, entry.principal = wanted.target, wanted.signer, wanted.principal
        self._entries[wanted.service] = entry
        return entry

    def reconcile(self, wanted: Sequence[Wanted]) -> Reconciled:
        """Make the entries those of `wanted`: add, keep, re-sign, replace or remove each."""
        names = {w.service for w in wanted}
        removed = [name for name in self._entries if name not in names]
        for name in removed:
            self.remove(name)
        verdicts: dict[str, list[str]] = {"added": [], "kept": [], "resigned": [], "replaced": []}
        for want in wanted:
            verdicts[self._reconcile_one(want)].append(want.service)
        return Reconciled(
            **{verdict: tuple(names) for verdict, names in verdicts.items()},
            removed=tuple(removed),
        )

    def _reconcile_one(self, want: Wanted) -> str:
        entry = self._entries.get(want.service)
        if entry is None:
            self._add(want)
            return "added"
        if entry.target != want.target:
            self.remove(want.service)
            self._add(want)
            return "replaced"
        entry.principal = want.principal
        if entry.signer == want.signer:
            return "kept"
        entry.provider, entry.signer = want.provider, want.signer
        return "resigned"

    def restore(self, service: str, token: AccessToken, obtained_at: float) -> Entry | None:
        """Put a credential saved before a restart back in place, as if just fetched; None
        when it cannot be served now (the same judgement as for a fetched one)."""
        entry = self.entry(service)
        reason = self.policy.unusable_reason(token, self.clock())
        if reason is None and not self.policy.servable(token, obtained_at, self.clock()):
            reason = "it is within its clock-skew allowance of expiry"
        if reason is not None:
            log.warning("cache.restore_refused", service=service, reason=reason)
            return None
        entry.token, entry.obtained_at, entry.last_success_at = token, obtained_at, obtained_at
        entry.generation = next(_generations)
        entry.origin = CACHE
        return entry

    def remove(self, service: str) -> Entry | None:
        """Forget a service; a fetch under way is cancelled and its credential forgotten."""
        entry = self._entries.pop(service, None)
        if entry is not None:
            if entry.inflight is not None:
                entry.inflight.cancel()
            if entry.token is not None:
                forget_secret(entry.token.value)
            if self.budget is not None:
                self.budget.forget(service)
        return entry

    def on_result(self, listener: Callable[[Entry], None]) -> None:
        """Call `listener` after every fetch, successful or not."""
        self._listeners.append(listener)

    @property
    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def has(self, service: str) -> bool:
        return service in self._entries

    def find(self, service: str) -> Entry | None:
        """The service's entry; None when no such service is configured."""
        return self._entries.get(service)

    def entry(self, service: str) -> Entry:
        try:
            return self._entries[service]
        except KeyError:
            raise UnknownServiceError(f"no service named {service!r} is configured") from None

    def state(self, entry: Entry) -> State:
        if self.usable(entry):
            if entry.last_error is not None:
                return State.STALE
            return State.REFRESHING if entry.inflight else State.FRESH
        if entry.token is not None:
            return State.EXPIRED
        if entry.last_error is not None:
            return State.FAILED
        return State.REFRESHING

    def usable(self, entry: Entry) -> bool:
        """Whether the entry's credential may be served now: before `serve_until`."""
        return self.clock() < self.serve_until(entry)

    def serve_until(self, entry: Entry) -> float:
        """The last moment, on the store's clock, the entry's credential may be served
        (infinite for keys, which do not expire)."""
        if entry.token is None or entry.obtained_at is None:
            return -math.inf
        until = self.policy.serve_until(entry.token, entry.obtained_at)
        return math.inf if until is None else until

    def refresh_by(self, entry: Entry) -> float | None:
        if entry.token is None or entry.obtained_at is None:
            return None
        return self.policy.refresh_by(entry.token, entry.obtained_at)

    async def refresh_now(self, service: str) -> Entry:
        """A client-requested refresh, at most one per service per window; then the credential.

        For clients whose call was refused with the token they had. A crowd of them
        asking at once shares one fetch, and asking again inside the window only
        returns what the last fetch produced, so clients cannot stampede Azure. In fleet
        mode the window is the fleet's: a credential another broker fetched since is
        adopted, one fetched anywhere within the window is kept, and the refresh itself
        is made under the service's lease.
        """
        entry = self.entry(service)
        last = entry.last_attempt_at
        if entry.inflight is None and (
            last is None or self.clock() - last >= self.client_refresh_window_s
        ):
            log.info("token.refresh_requested", service=service)
            self.fetch(service, requested=True)
        return await self._await_usable(entry)

    async def credential(self, service: str) -> Entry:
        """The entry with a servable credential, waiting for a first fetch if one is due."""
        entry = self.entry(service)
        if self.usable(entry):
            return entry
        if entry.inflight is None and entry.last_error is None:
            self.fetch(service)
        return await self._await_usable(entry)

    async def _await_usable(self, entry: Entry) -> Entry:
        if entry.inflight is not None:
            with contextlib.suppress(UpstreamError, TimeoutError):
                await asyncio.wait_for(asyncio.shield(entry.inflight), _COLD_WAIT_S)
        if self.usable(entry):
            return entry
        raise self._not_ready(entry)

    def fetch(
        self, service: str, *, requested: bool = False, leased: bool = False
    ) -> asyncio.Task[AccessToken]:
        """Start a fetch, or join the one in flight; the task's outcome is recorded.

        `requested`: a client asked for it (`refresh_now`), and in fleet mode the fleet's
        window applies. `leased`: the caller holds the service's fleet lease (a key
        rotation): fetch from Azure and share, adopting nothing."""
        entry = self.entry(service)
        if entry.inflight is None:
            entry.last_attempt_at = self.clock()
            entry.inflight = asyncio.create_task(
                self._fetch(entry, requested, leased), name=f"fetch:{service}"
            )
            entry.inflight.add_done_callback(_consume)
        return entry.inflight

    async def _fetch(
        self, entry: Entry, requested: bool = False, leased: bool = False
    ) -> AccessToken:
        try:
            answered = None
            if requested and self.shared is not None:
                answered = await self._answered_by_fleet(entry, self.shared)
            if answered is not None:
                got, origin = answered
            else:
                await self._pace(entry)
                if self.shared is None:
                    got, origin = Saved(await self._from_azure(entry), self.clock()), AZURE
                elif leased:
                    got, origin = await self._fetch_and_share(entry, self.shared), AZURE
                else:
                    got, origin = await self._through_fleet(entry, self.shared)
        except UpstreamError as exc:
            self._record_failure(entry, exc)
            raise
        except Exception as exc:  # a bug must cost one refresh, never the daemon
            log.exception("token.fetch_crashed", service=entry.service)
            error = UpstreamError(f"internal error while fetching: {type(exc).__name__}")
            self._record_failure(entry, error)
            raise error from None
        finally:
            entry.inflight = None
        if got.token is not entry.token:  # else the fleet's window kept what is served
            self._record_success(entry, got, origin)
        return got.token

    async def _from_azure(self, entry: Entry) -> AccessToken:
        async with self._upstream_slots:
            entry.last_call_at = self.clock()
            token = await entry.provider.fetch()
        self._judge(entry, token)
        return token

    async def _through_fleet(self, entry: Entry, shared: SharedCredentials) -> tuple[Saved, str]:
        """Adopt the fleet's credential when it is newer and not yet due; else refresh
        under the fleet's lease (or alone, when the fleet cannot be used) and share it."""
        lease: Lease | None = None
        alone = False
        try:
            found = await self._adoptable(entry, shared)
            if found is None or self._due(found):
                if found is not None:
                    self._install(entry, found, FLEET)  # served while the fleet refreshes
                waited = await self._lease_or_adoption(entry, shared)
                if isinstance(waited, Saved):
                    found, lease = waited, None
                else:
                    found, lease = None, waited
            if found is not None:
                return found, FLEET
        except FleetUnavailableError:
            alone = True  # the fleet logged it; refresh as without one
        try:
            token = await self._from_azure(entry)
            fresh = Saved(token, self.clock(), entry.provider.scoring_uri)
            if not alone:
                await shared.write(entry.service, fresh, self._shared_for(fresh))
        finally:
            if lease is not None:
                await lease.release()
        return fresh, AZURE

    async def _answered_by_fleet(
        self, entry: Entry, shared: SharedCredentials
    ) -> tuple[Saved, str] | None:
        """For a client's refresh in fleet mode: the fleet's credential when another broker
        fetched a newer one, or the one in place when it was fetched (anywhere) within the
        client refresh window; None to refresh under the lease."""
        try:
            found = await self._adoptable(entry, shared)
        except FleetUnavailableError:
            return None  # refresh alone: the broker's own window applied
        if found is not None and not self._due(found):
            return found, FLEET
        current = entry.saved()
        if current is None or not self.usable(entry):
            return None
        # The credential's obtained_at is the fetching broker's clock: hosts' clocks that
        # differ move the fleet's window by as much, never more.
        age = self.clock() - current.obtained_at
        if age >= self.client_refresh_window_s:
            return None
        log.info(
            "token.refresh_within_window",
            service=entry.service,
            refreshed_s_ago=round(age, 1),
            window_s=self.client_refresh_window_s,
            note="refreshed in the fleet within the window: serving that credential",
        )
        return current, entry.origin or FLEET

    async def _fetch_and_share(self, entry: Entry, shared: SharedCredentials) -> Saved:
        """Fetch from Azure under a lease the caller holds, and share what came."""
        token = await self._from_azure(entry)
        fresh = Saved(token, self.clock(), entry.provider.scoring_uri)
        await shared.write(entry.service, fresh, self._shared_for(fresh))
        return fresh

    async def _lease_or_adoption(
        self, entry: Entry, shared: SharedCredentials
    ) -> Lease | Saved | None:
        """The service's lease, or the credential its holder shared meanwhile; None when
        the holder took too long (it may be slower than lease_s: refresh alone)."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + _LEASE_WAITS * shared.lease_s
        while True:
            lease = await shared.lease(entry.service)
            if lease is not None:
                # Read again under the lease: a holder may have shared and released it
                # between this broker's last read and its taking the lease.
                found = await self._adoptable_or_release(entry, shared, lease)
                return lease if found is None else found
            if loop.time() >= give_up_at:
                log.warning(
                    "fleet.lease_wait_over",
                    service=entry.service,
                    waited_s=round(_LEASE_WAITS * shared.lease_s, 1),
                    note="another broker holds the refresh lease but shared nothing: "
                    "refreshing alone",
                )
                return None
            await shared.wait(entry.service, shared.poll_s)
            found = await self._adoptable(entry, shared)
            if found is not None and not self._due(found):
                return found

    async def _adoptable_or_release(
        self, entry: Entry, shared: SharedCredentials, lease: Lease
    ) -> Saved | None:
        """A credential to adopt after all (the lease released), or None to fetch."""
        try:
            found = await self._adoptable(entry, shared)
        except FleetUnavailableError:
            found = None
        if found is None or self._due(found):
            return None
        await lease.release()
        return found

    async def _adoptable(self, entry: Entry, shared: SharedCredentials) -> Saved | None:
        """The fleet's credential if it is newer than the entry's and may be served now,
        judged as a fetched one is."""
        found = await shared.read(entry.service)
        if found is None:
            return None
        current = entry.saved()
        if current is not None and found.stamp <= current.stamp:
            return None
        now = self.clock()
        reason = self.policy.unusable_reason(found.token, now)
        if reason is None and not self.policy.servable(found.token, found.obtained_at, now):
            reason = "it is within its clock-skew allowance of expiry"
        if reason is not None:
            log.info("fleet.entry_unusable", service=entry.service, reason=reason)
            return None
        return found

    def _due(self, saved: Saved) -> bool:
        return self.policy.refresh_by(saved.token, saved.obtained_at) <= self.clock()

    def _shared_for(self, saved: Saved) -> float:
        """How long the fleet keeps an entry: while it may be served (tokens), or until it
        is due (keys, which are re-listed to pick up rotations)."""
        now = self.clock()
        until = self.policy.serve_until(saved.token, saved.obtained_at)
        if until is None:
            until = self.policy.refresh_by(saved.token, saved.obtained_at)
        return until - now

    def _noticed(self, service: str) -> None:
        """Another broker shared `service` anew: adopt it unless a fetch is under way
        (which reads the fleet itself)."""
        entry = self._entries.get(service)
        if entry is None or entry.inflight is not None or self.shared is None:
            return
        task = asyncio.get_running_loop().create_task(self._adopt_noticed(entry, self.shared))
        self._adoptions.add(task)
        task.add_done_callback(self._adoptions.discard)

    async def _adopt_noticed(self, entry: Entry, shared: SharedCredentials) -> None:
        try:
            found = await self._adoptable(entry, shared)
        except FleetUnavailableError:
            return
        if found is not None and entry.inflight is None and self._entries.get(entry.service):
            self._record_success(entry, found, FLEET)

    async def _pace(self, entry: Entry) -> None:
        """Hold a fetch until `retry_min_s` after the service's last call, then until the
        call budget has room: whatever asked for it, Azure never sees a burst."""
        if entry.last_call_at is not None:
            wait = entry.last_call_at + self.policy.config.retry_min_s - self.clock()
            if wait > 0:
                await self.sleep(wait)
        if self.budget is not None and await self.budget.spend(entry.service, entry.principal):
            entry.budget_waits += 1

    def _judge(self, entry: Entry, token: AccessToken) -> None:
        """Refuse a credential that cannot be served on arrival, or that would be served for
        less time than the one it replaces, so that it never replaces the one being served."""
        reason = self.policy.unusable_reason(token, self.clock()) or _outlived(entry, token)
        if reason is not None:
            raise UnusableCredentialError(
                f"the {token.auth.value} Azure gave for {entry.service!r} cannot be used: "
                f"{reason}; the previous credential is served while it is valid"
            )

    def _install(self, entry: Entry, saved: Saved, origin: str) -> bool:
        """Put a credential in place; whether it is another than the one served."""
        old = entry.token
        changed = old is None or old.value != saved.token.value
        entry.token, entry.obtained_at = saved.token, saved.obtained_at
        entry.origin = origin
        provider = entry.provider
        uri = None if provider.scoring_uri is not None else saved.scoring_uri
        if uri and isinstance(provider, RestoresScoringUri):  # its own describe replaces it
            provider.restore_scoring_uri(uri)
        if changed:
            entry.generation = next(_generations)
            if old is not None:
                forget_secret(old.value)
        return changed

    def _record_success(self, entry: Entry, got: Saved, origin: str) -> None:
        now = self.clock()
        token = got.token
        changed = self._install(entry, got, origin)
        entry.last_success_at = now
        entry.last_error, entry.last_error_at, entry.failures = None, None, 0
        log.info(
            "token.refreshed",
            service=entry.service,
            auth=token.auth.value,
            changed=changed,
            source=origin,
            expires_in_s=None if token.expires_on is None else round(token.expires_on - now, 1),
        )
        self._notify(entry)

    def _record_failure(self, entry: Entry, exc: UpstreamError) -> None:
        entry.last_error, entry.last_error_at = exc, self.clock()
        entry.failures += 1
        log.warning(
            "token.refresh_failed",
            service=entry.service,
            reason=type(exc).__name__,
            error=exc.message,
            status=exc.status,
            aad_code=exc.aad_code,
            retryable=exc.retryable,
            failures=entry.failures,
            serving=self.usable(entry),
        )
        self._notify(entry)

    def _notify(self, entry: Entry) -> None:
        if self._entries.get(entry.service) is not entry:
            return  # removed by a reload while its fetch finished
        for listener in self._listeners:
            listener(entry)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def changed(self) -> None:
        """Return after the next fetch of any service finishes (for push to clients)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    def _not_ready(self, entry: Entry) -> NotReadyError:
        now = self.clock()
        wait = 1.0
        if entry.next_attempt_at is not None:
            wait = max(1.0, entry.next_attempt_at - now)
        if entry.last_error is not None:
            reason = f"no valid credential for {entry.service!r}: {entry.last_error.message}"
        else:
            reason = f"no credential for {entry.service!r} yet; the first fetch is under way"
        return NotReadyError(reason, retry_after=wait)


def _consume(task: asyncio.Task[AccessToken]) -> None:
    """Mark a fetch's exception as seen: it is recorded on the entry, not lost."""
    if not task.cancelled():
        task.exception()


def _outlived(entry: Entry, token: AccessToken) -> str | None:
    """Why `token` would be served for less time than the token being served, if it would:
    a token Azure gave that dies first is worse than none (the refresh failed)."""
    current = entry.token
    if current is None or current.expires_on is None or token.expires_on is None:
        return None
    if token.expires_on >= current.expires_on:
        return None
    earlier = current.expires_on - token.expires_on
    return f"it expires {earlier:.1f} s before the {current.auth.value} being served"
