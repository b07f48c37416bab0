"""A bounded chaos run: random faults across services and a region outage in the middle.

Clients hammer the broker throughout. At the end: no response carried an expired token,
no 5xx was answered while a valid token existed, every service is fresh again, and the
upstream calls stayed within the retry policy's own bound (`Policy.max_attempts`). The
figures are printed. The run is seeded (`CHAOS_SEED` picks another seed).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import jwt
import pytest

from broker.cache import Policy
from broker.emulator import Emulator
from broker.emulator import seed as demo
from tests.conftest import config_text
from tests.e2e.conftest import Broker, StartBroker

pytestmark = pytest.mark.timeout(150)

CHAOS_S = 40.0
OUTAGE = (12.0, 21.0)  # seconds into the run: longer than a token's whole life
LIFETIME_S = 6.0
FAULT_EVERY_S = 0.5
CLIENT_PACE_S = 0.01
CLIENTS = 8
RETRY_MIN_S = 0.1
WEST = ("west-ws", "westus")
EAST_SERVICES = {"fraud": demo.TOKEN_SERVICE, "churn": demo.KEY_SERVICE, "a": "a-aks", "b": "b-aks"}
WEST_SERVICES = {"c": "c-aks", "d": "d-aks"}
ROUTES = ("mms.token", "mms.listkeys", "mms.describe", "discovery", "arm.workspace")
KINDS = (
    *("status", "status", "reset", "hang", "slow", "malformed", "partial", "missing_fields"),
    *("expired", "expiring", "not_yet_valid"),
)
DEFAULT_SEED = 20261201
KEY_INTERVAL_S = 5.0
CALLS_PER_ATTEMPT = 4  # the most one fetch makes: workspace, discovery, describe, token


@dataclass
class Tally:
    responses: Counter[int] = field(default_factory=Counter)
    expired_served: int = 0
    errors_while_valid: int = 0
    valid_until: dict[str, float] = field(default_factory=dict)
    faults_armed: int = 0


def stage(emulator: Emulator) -> None:
    state = emulator.state
    for name in ("a-aks", "b-aks"):
        state.add_web_service(demo.SUBSCRIPTION_ID, demo.RESOURCE_GROUP, demo.WORKSPACE, name)
    state.add_workspace(demo.SUBSCRIPTION_ID, demo.RESOURCE_GROUP, WEST[0], region=WEST[1])
    state.grant_role(demo.CLIENT_ID, demo.SUBSCRIPTION_ID, demo.RESOURCE_GROUP, WEST[0])
    for name in WEST_SERVICES.values():
        state.add_web_service(demo.SUBSCRIPTION_ID, demo.RESOURCE_GROUP, WEST[0], name)
    state.set_token_lifetime(LIFETIME_S, refresh_after_s=LIFETIME_S / 2)


def configuration(emulator: Emulator, short_dir: Path) -> str:
    refresh = (
        f"timeout_s = 0.5\nretry_min_s = {RETRY_MIN_S}\nretry_max_s = 1\n"
        f"clock_skew_s = 1\nkey_interval_s = {KEY_INTERVAL_S:g}\nmax_concurrency = 4"
    )
    text = config_text(emulator, short_dir, services=EAST_SERVICES, refresh=refresh)
    for name, web_service in WEST_SERVICES.items():
        text += (
            f'\n[[service]]\nname = "{name}"\nsubscription_id = "{demo.SUBSCRIPTION_ID}"\n'
            f'resource_group = "{demo.RESOURCE_GROUP}"\nworkspace = "{WEST[0]}"\n'
            f'web_service = "{web_service}"\n'
        )
    return text


async def client_loop(
    broker: Broker, tally: Tally, rng: random.Random, stop: asyncio.Event
) -> None:
    client = broker.client(rng.choice(["unix", "tcp"]))
    names = [*EAST_SERVICES, *WEST_SERVICES]
    while not stop.is_set():
        service = rng.choice(names)
        # What was known before asking: a token another client saw while this request was
        # answered may be newer than anything the broker had when it answered.
        known_until = tally.valid_until.get(service, 0.0)
        reply = await client.get(f"/v1/token/{service}")
        now = time.time()
        tally.responses[reply.status] += 1
        if reply.status == 200:
            body = reply.json()
            if body["auth"] == "token":
                exp = jwt.decode(body["access_token"], options={"verify_signature": False})["exp"]
                if exp <= now:
                    tally.expired_served += 1
                tally.valid_until[service] = max(tally.valid_until.get(service, 0.0), exp)
        elif reply.status >= 500 and (
            # A 503 is right only once the last token seen before the request is within the
            # skew allowance (0.6 s here) of its expiry when the answer came; a second of
            # slack covers `exp`'s rounding to whole seconds.
            reply.status != 503 or known_until - now > 1.6
        ):
            tally.errors_while_valid += 1
        await asyncio.sleep(CLIENT_PACE_S)


async def fault_loop(emulator: Emulator, tally: Tally, rng: random.Random, started: float) -> None:
    state = emulator.state
    outage_on = outage_off = False
    while (elapsed := time.time() - started) < CHAOS_S:
        if not outage_on and elapsed >= OUTAGE[0]:
            state.region_down(demo.REGION, kind=rng.choice(["reset", "hang", "status"]))
            outage_on = True
        if outage_on and not outage_off and elapsed >= OUTAGE[1]:
            state.region_up(demo.REGION)
            outage_off = True
        kind = rng.choice(KINDS)
        state.fail(
            rng.choice(ROUTES),
            kind=kind,
            status=rng.choice([429, 500, 502, 503]) if kind == "status" else None,
            retry_after=rng.choice([None, 1]) if kind == "status" else None,
            delay_s=1.0 if kind == "slow" else 0.0,
            times=rng.randint(1, 3),
            service=rng.choice([None, *EAST_SERVICES.values(), *WEST_SERVICES.values()]),
        )
        tally.faults_armed += 1
        await asyncio.sleep(FAULT_EVERY_S)
    state.clear_faults()


async def all_fresh(broker: Broker, within: float) -> float:
    store = broker.daemon.store
    started = time.time()

    async def wait() -> None:
        while stale := [e.service for e in store.entries if store.state(e).value != "fresh"]:
            await broker.next_result(stale[0], within=within)

    await asyncio.wait_for(wait(), within)
    return time.time() - started


async def test_chaos(
    start_broker: StartBroker,
    emulator: Emulator,
    short_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Random faults and a region outage never make the broker serve an expired token."""
    seed = int(os.environ.get("CHAOS_SEED", DEFAULT_SEED))
    rng = random.Random(seed)
    stage(emulator)
    broker = await start_broker(configuration(emulator, short_dir))
    await broker.settled()
    tally = Tally()
    stop = asyncio.Event()
    started = time.time()
    clients = [asyncio.create_task(client_loop(broker, tally, rng, stop)) for _ in range(CLIENTS)]
    await fault_loop(emulator, tally, rng, started)
    recovery_s = await all_fresh(broker, within=30.0)
    stop.set()
    await asyncio.gather(*clients)
    elapsed = time.time() - started

    services = [*EAST_SERVICES.values(), *WEST_SERVICES.values()]
    calls = {s: sum(emulator.state.count(r, service=s) for r in ROUTES) for s in services}
    policy = Policy(broker.daemon.config.refresh)
    shortest = policy.shortest_lead(min(LIFETIME_S / 2, KEY_INTERVAL_S))
    bound = policy.max_attempts(elapsed, shortest) * CALLS_PER_ATTEMPT
    with capsys.disabled():
        print(
            f"\nchaos (seed {seed}): {elapsed:.0f} s, {tally.faults_armed} faults, region "
            f"{demo.REGION} dark {OUTAGE[0]:.0f}-{OUTAGE[1]:.0f} s; responses "
            f"{dict(tally.responses)}; expired tokens served {tally.expired_served}; 5xx while "
            f"a valid token existed {tally.errors_while_valid}; all fresh {recovery_s:.1f} s "
            f"after the faults stopped; upstream calls per service {calls} (bound {bound})"
        )
    assert tally.expired_served == 0
    assert tally.errors_while_valid == 0
    assert sum(tally.responses.values()) > 1000
    assert tally.responses[503] > 0  # the outage outlived the tokens: refusals were due
    assert all(count <= bound for count in calls.values())
    # Fresh, or already into its next routine refresh: a valid token and no error.
    store = broker.daemon.store
    assert all(store.usable(e) and e.last_error is None for e in store.entries)
