"""The store, policy and refresher as a state machine, against an upstream whose every
answer Hypothesis draws, in simulated time.

Answers range over good credentials of any lifetime and any `refreshAfter` placement,
tokens already expired, expiring within the skew allowance or not yet valid, malformed and
partial bodies, every error status (429 with `Retry-After` in seconds or as a date),
resets, hangs past the timeout, skewed clocks and rotated keys; they are interleaved with
clients asking, clients asking for refreshes, reloads and time passing. After every step:

- no credential is served at or past its expiry;
- a usable credential is never replaced by an unusable one;
- upstream calls stay within the call budget and `retry_min_s` of each other;
- the last usable answer is what the next client gets;
- the reported state matches the facts;
- no exception escapes, and every service has an attempt in flight or scheduled.

`make test` runs it derandomised and short; `make fuzz` long.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from broker.cache import Allowance, CallBudget, Policy, Refresher, Store, Wanted
from broker.config import RefreshConfig
from broker.errors import LocalRequestError, UnavailableError, UpstreamError
from broker.models import AccessToken, State
from broker.providers.azureml_v1 import parse_keys, parse_token
from broker.providers.upstream import translate
from tests.unit.fakes import SimTime

pytestmark = [pytest.mark.fuzz, pytest.mark.timeout(600)]

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
CONFIG = RefreshConfig(
    clock_skew_s=30.0,
    retry_min_s=1.0,
    retry_max_s=120.0,
    timeout_s=30.0,
    client_refresh_window_s=10.0,
    service_calls_burst=4,
    service_calls_per_minute=3.0,
    principal_calls_burst=6,
    principal_calls_per_minute=5.0,
)
PRINCIPAL = ("client", "subscription")
SERVICES = ("tok", "key")


def jwt(claims: dict[str, float]) -> str:
    """An unsigned JWT carrying `claims` (only its times are read)."""

    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none'})}.{part(claims)}.sig"


@dataclass(frozen=True)
class Answer:
    """One upstream answer, drawn: `kind` and what shapes it."""

    kind: str
    lifetime_s: float = 3600.0
    refresh_at: float | None = None  # share of the lifetime where refreshAfter falls
    offset_s: float = 0.0  # how far past, ahead or not yet valid
    status: int = 500
    retry_after: str | None = None
    skew_s: float = 0.0


lifetimes = st.floats(1.0, 7200.0)
answers = st.one_of(
    st.builds(
        Answer,
        kind=st.just("good"),
        lifetime_s=lifetimes,
        refresh_at=st.one_of(st.none(), st.floats(-1.0, 2.0)),
        skew_s=st.sampled_from([0.0, 0.0, 5.0, -5.0, 600.0, -600.0]),
    ),
    st.builds(Answer, kind=st.just("expired"), offset_s=st.floats(0.0, 7200.0)),
    st.builds(Answer, kind=st.just("expiring"), offset_s=st.floats(0.0, 30.0)),
    st.builds(
        Answer, kind=st.just("not_yet_valid"), lifetime_s=lifetimes, offset_s=st.floats(60, 3600)
    ),
    st.builds(Answer, kind=st.sampled_from(["malformed", "partial", "missing", "reset", "hang"])),
    st.builds(
        Answer,
        kind=st.just("status"),
        status=st.sampled_from([401, 403, 404, 408, 429, 500, 502, 503]),
        retry_after=st.one_of(
            st.none(),
            st.integers(0, 600).map(str),
            st.integers(-60, 600).map(lambda s: f"date:{s}"),
            st.just("garbage"),
        ),
    ),
)


@dataclass
class DrawnUpstream:
    """A provider whose answers are queued by the machine; the real parsers and error
    translation turn each into a credential or an error, as Azure's would be."""

    service: str
    time: SimTime
    keys: bool
    queue: list[Answer] = field(default_factory=list)
    calls: list[float] = field(default_factory=list)
    last_usable: str | None = None  # the last credential returned that could be served
    last_expiry: float | None = None  # and its expiry: one that dies first is refused
    failed_last: bool = False
    has_scoring_host: bool = True
    scoring_uri: str | None = None
    clock_skew_s: float | None = None
    rotation: int = 0

    async def fetch(self) -> AccessToken:
        now = self.time()
        self.calls.append(now)
        answer = self.queue.pop(0) if self.queue else Answer("good")
        self.failed_last = True
        if answer.kind == "hang":
            await self.time.sleep(CONFIG.timeout_s)
            raise UnavailableError("mms.token: no answer within the timeout", route="mms.token")
        if answer.kind == "reset":
            raise UnavailableError("mms.token: cannot reach the host: reset", route="mms.token")
        if answer.kind == "status":
            raise self._status_error(answer, now)
        token = self._parse(answer, now)
        dies_first = (
            token.expires_on is not None
            and self.last_expiry is not None
            and token.expires_on < self.last_expiry
        )
        if token.unusable_reason(self.time(), CONFIG.clock_skew_s) is None and not dies_first:
            self.last_usable, self.last_expiry = token.value, token.expires_on
            self.failed_last = False
        return token

    def _status_error(self, answer: Answer, now: float) -> UpstreamError:
        headers = {"Date": email.utils.formatdate(now, usegmt=True)}
        if answer.retry_after is not None:
            value = answer.retry_after
            if value.startswith("date:"):
                value = email.utils.formatdate(now + int(value[5:]), usegmt=True)
            headers["Retry-After"] = value
        body = json.dumps({"error": {"code": "Fault", "message": "injected"}}).encode()
        return translate(answer.status, body, headers, route="mms.token", what="", now=now)

    def _parse(self, answer: Answer, now: float) -> AccessToken:
        if self.keys:
            self.rotation += 1
            body: Any = {"primaryKey": f"key-{self.service}-{self.rotation:06d}"}
            if answer.kind in ("malformed", "missing"):
                body = "<html>" if answer.kind == "malformed" else {}
            return parse_keys(body, "primary", route="mms.listkeys")
        azure_now = now + answer.skew_s
        issued, lifetime = azure_now, answer.lifetime_s
        if answer.kind == "expired":
            issued = azure_now - lifetime - answer.offset_s
        elif answer.kind == "expiring":
            issued = azure_now - lifetime + answer.offset_s
        claims = {"iat": issued, "nbf": issued, "exp": issued + lifetime}
        if answer.kind == "not_yet_valid":
            claims["nbf"] = azure_now + answer.offset_s
        self.rotation += 1
        claims["jti"] = self.rotation
        body = {"accessToken": jwt(claims), "expiryOn": issued + lifetime}
        if answer.refresh_at is not None:
            body["refreshAfter"] = issued + lifetime * answer.refresh_at
        if answer.kind == "malformed":
            body = "not json"
        elif answer.kind == "missing":
            del body["expiryOn"]
            body["accessToken"] = "opaque"  # and no JWT to fall back on
        elif answer.kind == "partial":
            body = {"accessToken": body["accessToken"][:20]}
        return parse_token(body, skew_s=answer.skew_s)


STATS = {"machines": 0, "steps": 0, "calls": 0, "service_window": 0, "principal_window": 0}
WINDOW_S = 60.0


def busiest_window(calls: list[float]) -> int:
    """The most calls in any `WINDOW_S` seconds."""
    most, start = 0, 0
    for end, when in enumerate(calls):
        while when - calls[start] > WINDOW_S:
            start += 1
        most = max(most, end - start + 1)
    return most


@pytest.fixture(scope="module", autouse=True)
def report(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print what the machine ran and the busiest minute it saw against the budget."""
    yield
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(
            f"\nrefresh machine: {STATS['machines']} examples, {STATS['steps']} steps, "
            f"{STATS['calls']} upstream calls; busiest minute per service "
            f"{STATS['service_window']} (budget allows "
            f"{CONFIG.service_calls_burst + CONFIG.service_calls_per_minute:g}), per principal "
            f"{STATS['principal_window']} (allows "
            f"{CONFIG.principal_calls_burst + CONFIG.principal_calls_per_minute:g})"
        )


class RefreshMachine(RuleBasedStateMachine):
    """The refresh path of one broker with two services of one principal."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _, context: self.errors.append(context))
        self.time = SimTime()
        self.upstreams = {
            name: DrawnUpstream(name, self.time, keys=name == "key") for name in SERVICES
        }
        budget = CallBudget(
            Allowance(CONFIG.service_calls_burst, CONFIG.service_calls_per_minute),
            Allowance(CONFIG.principal_calls_burst, CONFIG.principal_calls_per_minute),
            clock=self.time,
            sleep=self.time.sleep,
        )
        self.policy = Policy(CONFIG)
        self.store = Store(
            [],
            self.policy,
            self.time,
            client_refresh_window_s=CONFIG.client_refresh_window_s,
            sleep=self.time.sleep,
            budget=budget,
        )
        self.signer = 0
        self.store.reconcile(self._wanted())
        self.refresher = Refresher(self.store, self.time)
        self.clients: list[tuple[str, asyncio.Task[Any]]] = []
        self.served: list[tuple[float, AccessToken]] = []
        self.held: dict[str, AccessToken | None] = {name: None for name in SERVICES}
        self._run(self._start())
        STATS["machines"] += 1

    def _wanted(self) -> list[Wanted]:
        return [
            Wanted(up, target=name, signer=self.signer, principal=PRINCIPAL)
            for name, up in self.upstreams.items()
        ]

    async def _start(self) -> None:
        self.refresher.start()

    def _run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        async def stop() -> None:
            for _, task in self.clients:
                task.cancel()
            await self.refresher.stop(grace_s=0)

        self._run(stop())
        self.loop.close()
        everyone = sorted(t for up in self.upstreams.values() for t in up.calls)
        STATS["calls"] += len(everyone)
        STATS["principal_window"] = max(STATS["principal_window"], busiest_window(everyone))
        for upstream in self.upstreams.values():
            STATS["service_window"] = max(STATS["service_window"], busiest_window(upstream.calls))

    @rule(service=st.sampled_from(SERVICES), queued=st.lists(answers, min_size=1, max_size=6))
    def upstream_will_answer(self, service: str, queued: list[Answer]) -> None:
        self.upstreams[service].queue.extend(queued)

    @rule(seconds=st.one_of(st.floats(0.0, 5.0), st.floats(5.0, 900.0), st.just(3600.0)))
    def time_passes(self, seconds: float) -> None:
        self._run(self.time.advance(seconds))
        self._collect()

    @rule(service=st.sampled_from(SERVICES))
    def client_asks(self, service: str) -> None:
        self._start_client(service, self.store.credential(service))

    @rule(service=st.sampled_from(SERVICES))
    def client_asks_for_a_refresh(self, service: str) -> None:
        self._start_client(service, self.store.refresh_now(service))

    @rule(resign=st.booleans())
    def reload(self, resign: bool) -> None:
        """A reload that keeps every service, or signs every one in again."""
        self.signer += resign

        async def apply() -> None:
            self.refresher.reconcile(self._wanted())

        self._run(apply())

    def _start_client(self, service: str, coro: Any) -> None:
        async def ask() -> Any:
            return await coro

        self.clients.append((service, self.loop.create_task(ask())))
        self._run(settle_briefly())
        self._collect()

    def _collect(self) -> None:
        for pair in [pair for pair in self.clients if pair[1].done()]:
            self.clients.remove(pair)
            task = pair[1]
            if task.cancelled():
                continue
            error = task.exception()
            if error is not None:
                assert isinstance(error, LocalRequestError), repr(error)
                continue
            entry = task.result()
            assert entry.token is not None
            self.served.append((self.time(), entry.token))

    @invariant()
    def nothing_served_past_its_expiry(self) -> None:
        STATS["steps"] += 1
        for at, token in self.served:
            assert token.expires_on is None or at < token.expires_on, (at, token)
        self.served.clear()
        for entry in self.store.entries:
            if self.store.usable(entry) and entry.token and entry.token.expires_on:
                assert entry.token.expires_on > self.time()

    @invariant()
    def a_usable_credential_is_never_replaced_by_an_unusable_one(self) -> None:
        for entry in self.store.entries:
            before, token = self.held[entry.service], entry.token
            if token is not None and token is not before:
                assert entry.obtained_at is not None
                assert token.unusable_reason(entry.obtained_at, CONFIG.clock_skew_s) is None
                if before is not None and before.expires_on and token.expires_on:
                    assert token.expires_on >= before.expires_on  # never one that dies first
            self.held[entry.service] = token

    @invariant()
    def calls_stay_within_the_budget_and_the_pacing(self) -> None:
        everyone: list[float] = []
        for upstream in self.upstreams.values():
            calls = upstream.calls
            everyone += calls
            assert within_bucket(calls, CONFIG.service_calls_burst, CONFIG.service_calls_per_minute)
            gaps = [b - a for a, b in itertools.pairwise(calls)]
            assert all(gap >= CONFIG.retry_min_s - 1e-6 for gap in gaps), gaps
        everyone.sort()
        assert within_bucket(
            everyone, CONFIG.principal_calls_burst, CONFIG.principal_calls_per_minute
        )

    @invariant()
    def the_last_usable_answer_is_what_clients_get(self) -> None:
        for entry in self.store.entries:
            upstream = self.upstreams[entry.service]
            if entry.inflight is None and upstream.last_usable is not None and entry.token:
                assert entry.token.value == upstream.last_usable

    @invariant()
    def the_state_matches_the_facts(self) -> None:
        now = self.time()
        for entry in self.store.entries:
            upstream = self.upstreams[entry.service]
            token = entry.token
            usable = (
                token is not None
                and entry.obtained_at is not None
                and self.policy.servable(token, entry.obtained_at, now)
            )
            failed = bool(upstream.calls) and upstream.failed_last and entry.inflight is None
            if usable:
                expected = State.STALE if entry.last_error else State.FRESH
                if entry.inflight is not None and entry.last_error is None:
                    expected = State.REFRESHING
            elif token is not None:
                expected = State.EXPIRED
            elif failed or entry.last_error is not None:
                expected = State.FAILED
            else:
                expected = State.REFRESHING
            assert self.store.state(entry) is expected, (entry.service, expected)
            if entry.inflight is None and upstream.calls:
                assert (entry.last_error is not None) == upstream.failed_last

    @invariant()
    def no_exception_escapes_and_every_service_has_an_attempt_ahead(self) -> None:
        assert not self.errors, self.errors
        for entry in self.store.entries:
            assert entry.inflight is not None or entry.service in self.time.jobs, entry.service


async def settle_briefly() -> None:
    for _ in range(200):
        await asyncio.sleep(0)


def within_bucket(calls: list[float], burst: int, per_minute: float) -> bool:
    """Whether calls at these times fit a token bucket of `burst`, refilled at `per_minute`."""
    tokens, at = float(burst), calls[0] if calls else 0.0
    for when in calls:
        tokens = min(float(burst), tokens + (when - at) * per_minute / 60.0)
        at = when
        if tokens < 1.0 - 1e-6:
            return False
        tokens -= 1.0
    return True


RefreshMachine.TestCase.settings = settings(
    max_examples=1500 if LONG else 60,
    stateful_step_count=60 if LONG else 30,
    derandomize=not LONG,
    deadline=None,
    database=None,
    print_blob=True,
)
TestRefreshMachine = RefreshMachine.TestCase
TestRefreshMachine.__doc__ = "The refresh path holds every invariant under any upstream answers."
