"""The broker as a process: hardening, signals, and systemd's notify protocol.

`serve` runs one `Daemon` until SIGTERM or SIGINT; SIGHUP reloads the configuration
file. Everything here concerns the process the daemon runs in, none of it the credentials.
"""

from __future__ import annotations

import asyncio
import ctypes
import resource
import signal
from collections import Counter
from collections.abc import Callable

from broker.cache import Entry, Store
from broker.config import Config, load_config
from broker.daemon import Daemon
from broker.errors import ConfigError
from broker.log import get_logger
from broker.models import State
from broker.service_manager import Notifier, inherited_sockets

log = get_logger("broker.process")

_PR_SET_DUMPABLE = 4  # from <linux/prctl.h>


def disable_core_dumps() -> None:
    """No core file, and no ptrace by the same user: memory holds live credentials."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("process.not_hardened", errno=ctypes.get_errno())


async def serve(config: Config) -> None:
    """Run the broker until SIGTERM or SIGINT; SIGHUP reloads the configuration file.

    Under systemd (`$NOTIFY_SOCKET`) it reports READY=1 once the listeners accept,
    STATUS= with the services' states, WATCHDOG=1 from the event loop, RELOADING=1
    around reloads and STOPPING=1; with socket activation it serves the passed sockets.
    """
    disable_core_dumps()
    notifier = Notifier()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    daemon = Daemon(config, inherited=inherited_sockets())
    background: set[asyncio.Task[None]] = set()
    started = asyncio.Event()

    def on_hangup() -> None:
        async def reload_when_started() -> None:
            await started.wait()  # a SIGHUP during start-up is applied once started
            await reload_from_disk(daemon, notifier)

        task = loop.create_task(reload_when_started())
        background.add(task)
        task.add_done_callback(background.discard)

    # Handlers first: a signal arriving while the daemon starts must not kill it.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    watchdog = None
    try:
        await daemon.start()
        started.set()
        daemon.store.on_result(_status_updates(daemon.store, notifier))
        notifier.ready(status_line(daemon.store))
        watchdog = loop.create_task(_watchdog(notifier)) if notifier.watchdog_s else None
        await stop.wait()
        log.info("broker.stopping")
        notifier.stopping()
    finally:
        if watchdog is not None:
            watchdog.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        for task in background:
            task.cancel()
        await daemon.stop()
        notifier.close()


def _status_updates(store: Store, notifier: Notifier) -> Callable[[Entry], None]:
    """A store listener sending STATUS= at most once a second: counting every service on
    every fetch would cost O(services²) at start-up."""
    pending: list[asyncio.TimerHandle] = []

    def send() -> None:
        pending.clear()
        notifier.status(status_line(store))

    def on_result(_: Entry) -> None:
        if notifier.active and not pending:
            pending.append(asyncio.get_running_loop().call_later(1.0, send))

    return on_result


def status_line(store: Store) -> str:
    """A one-line summary for `systemctl status`: how many services are in which state."""
    counts = Counter(store.state(e).value for e in store.entries)
    parts = [f"{counts[state.value]} {state.value}" for state in State if counts[state.value]]
    return ", ".join(parts) or "no services"


async def _watchdog(notifier: Notifier) -> None:
    """Ping from the event loop itself, so a hung loop stops the pings and gets restarted."""
    assert notifier.watchdog_s is not None
    while True:
        notifier.watchdog()
        await asyncio.sleep(notifier.watchdog_s)


async def reload_from_disk(daemon: Daemon, notifier: Notifier) -> None:
    path = daemon.config.path
    log.info("config.reloading", config=str(path))
    notifier.reloading()
    try:
        config = await asyncio.to_thread(load_config, path)
    except ConfigError as exc:
        log.error(  # noqa: TRY400 — the problems say it all; a traceback would not help
            "config.reload_rejected",
            config=str(path),
            problems=[str(p) for p in exc.problems],
            note="the running configuration stays in force",
        )
    else:
        await daemon.reload(config)
    notifier.ready(status_line(daemon.store))
