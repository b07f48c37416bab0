"""Many light brokers in one process, for `make bench`'s fleet section beyond what real
`token-broker run` processes fit on the machine.

    python bench/swarm.py CONFIG COUNT [--ramp-s S] [--ready-timeout S]

Each instance is what a daemon refreshes with, built by `broker.assembly` as the daemon
builds it: its own sign-in and Azure client (`Sources`), its own store under the
configuration's refresh policy and call budget, its own refresher (APScheduler), and, when
the configuration has `[fleet]`, its own `Fleet` (its own Redis connections, notices, lease
holder and jitter). What is left out is what serves clients: listeners, metrics, sinks.

The instances start one after another over `--ramp-s` seconds, as a rolling update brings
pods up (all at once in one process would be a thousand brokers' start-up on one CPU).
Prints one JSON line once every instance has a usable credential for every service
(`{"ready_s": …, "instances": …}`), or when the timeout passes (`"waiting"`: how many
instances are not ready), then runs until SIGTERM or SIGINT, looking every half second for
instances without a usable credential for some service, and stops every instance; a last
JSON line says what it saw (`{"samples": …, "unready_samples": …, "most_unready": …,
"most_lag_s": …, "lag_when_unready_s": …}`: the lags are how late a look woke, the shared
event loop's delay).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from broker import log
from broker.assembly import Sources, new_fleet, new_store
from broker.cache import Refresher, Store
from broker.config import Config, load_config
from broker.fleet import Fleet
from broker.models import system_clock

_SAMPLE_S = 0.5  # how often the running instances are looked at


@dataclass
class Instance:
    """One light broker: what fetches and keeps its credentials, and its fleet."""

    sources: Sources
    store: Store
    refresher: Refresher
    fleet: Fleet | None

    @classmethod
    def build(cls, config: Config) -> Instance:
        sources = Sources(config, system_clock)
        store = new_store(config.refresh, system_clock)
        store.reconcile([sources.wanted(service) for service in config.services])
        fleet = new_fleet(config, config.service_identity)
        store.share(fleet)
        sources.join(fleet)
        return cls(sources, store, Refresher(store), fleet)

    def start(self, services: list[str]) -> None:
        if self.fleet is not None:
            self.fleet.watch(services)
        self.refresher.start()

    def ready(self) -> bool:
        return all(self.store.usable(entry) for entry in self.store.entries)

    async def stop(self) -> None:
        await self.refresher.stop(1.0)
        if self.fleet is not None:
            await self.fleet.close()
        await self.sources.close()


async def run(config_path: Path, count: int, ramp_s: float, ready_timeout_s: float) -> None:
    config = load_config(config_path)
    services = [service.name for service in config.services]
    instances = [Instance.build(config) for _ in range(count)]
    started = time.perf_counter()
    for n, instance in enumerate(instances):
        await asyncio.sleep(max(0.0, started + n * ramp_s / count - time.perf_counter()))
        instance.start(services)
    deadline = started + ready_timeout_s
    while (waiting := sum(not i.ready() for i in instances)) and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
    report = {"ready_s": time.perf_counter() - started, "instances": count, "waiting": waiting}
    print(json.dumps(report), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    samples = unready_samples = most_unready = 0
    most_lag_s = lag_when_unready_s = 0.0  # how late the look woke: the shared loop's lag
    while not stop.is_set():
        asked = loop.time()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), _SAMPLE_S)
        lag_s = max(0.0, loop.time() - asked - _SAMPLE_S) if not stop.is_set() else 0.0
        unready = sum(not i.ready() for i in instances)
        samples += 1
        unready_samples += unready > 0
        most_unready = max(most_unready, unready)
        most_lag_s = max(most_lag_s, lag_s)
        if unready:
            lag_when_unready_s = max(lag_when_unready_s, lag_s)
    seen = {
        "samples": samples,
        "unready_samples": unready_samples,
        "most_unready": most_unready,
        "most_lag_s": round(most_lag_s, 3),
        "lag_when_unready_s": round(lag_when_unready_s, 3),
    }
    print(json.dumps(seen), flush=True)
    await asyncio.gather(*(instance.stop() for instance in instances))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("count", type=int)
    parser.add_argument("--ramp-s", type=float, default=0.0)
    parser.add_argument("--ready-timeout", type=float, default=120.0)
    args = parser.parse_args()
    log.configure("json", "warning", stream=sys.stderr)
    asyncio.run(run(args.config, args.count, args.ramp_s, args.ready_timeout))


if __name__ == "__main__":
    main()
