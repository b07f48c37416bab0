"""The emulator's HTTPS server: one aiohttp app serving Entra ID, ARM (workspaces and
online endpoints), discovery, MMS, scoring and the control API on a single port, so
every host of the cloud profile is the same base URL.

One middleware does what every route shares: count the call, apply an injected fault or
region outage (`sabotage`), turn raised `EmulatorError`s and unknown routes into JSON
answers. Every response carries a `Date` read from the state's clock, so a test that skews
that clock shows the broker a skewed server.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Self

from aiohttp import hdrs, web

from broker.emulator import arm, control, endpoints, entra, mms, sabotage, scoring
from broker.emulator.certs import TlsMaterial, create_tls
from broker.emulator.context import SITE_KEY, STATE_KEY, STOPPING_KEY, Site, state_of
from broker.emulator.faults import ROUTES, Fault
from broker.emulator.replies import EmulatorError, http_date, no_route
from broker.emulator.state import Clock, EmulatorState

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# aiohttp route names are unique; these routes count and take faults as another's.
_COUNTED_AS = {"score.endpoint": "score"}
_WILDCARD_HOSTS = ("", "0.0.0.0", "::")


@web.middleware
async def emulator_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = request.match_info.route.name or ""
    route = _COUNTED_AS.get(route, route)
    if route.startswith("control."):
        try:
            control.require_loopback(request)
        except EmulatorError as exc:
            return exc.response()
    fault = _count_and_take(request, route) if route in ROUTES else None
    if fault is None:
        return await _answer(request, handler)
    return await sabotage.apply(request, route, fault, functools.partial(_answer, request, handler))


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except EmulatorError as exc:
        return exc.response()
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as exc:
        return no_route(request, exc.status)


def _count_and_take(request: web.Request, route: str) -> Fault | None:
    state = state_of(request)
    service = _service_named(request, route)
    state.record_call(route, service)
    return state.faults.take(route, service, _region_of(request.path))


def _region_of(path: str) -> str | None:
    """`eastus` for `/regions/eastus/…`: the region a regional request is served by."""
    parts = path.split("/", 3)
    if len(parts) == 4 and parts[1] == "regions" and parts[2]:
        return parts[2]
    return None


def _service_named(request: web.Request, route: str) -> str | None:
    if route in ("mms.operation", "arm.operation"):
        operation = state_of(request).operation(request.match_info["operation"])
        return operation.service.name if operation is not None else None
    return request.match_info.get("name")


def build_app(state: EmulatorState, site: Site) -> web.Application:
    """The aiohttp application of the whole fake cloud."""
    app = web.Application(middlewares=[emulator_middleware])
    app[STATE_KEY] = state
    app[SITE_KEY] = site
    app[STOPPING_KEY] = asyncio.Event()
    app.on_response_prepare.append(_stamp_date)
    app.on_shutdown.append(_release_waiters)
    for module in (entra, arm, endpoints, mms, scoring, control):
        app.add_routes(module.routes())
    return app


async def _stamp_date(request: web.Request, response: web.StreamResponse) -> None:
    """`Date` from the emulator's clock; aiohttp adds its own only when none is set."""
    response.headers[hdrs.DATE] = http_date(state_of(request).clock())


async def _release_waiters(app: web.Application) -> None:
    """Stopping: hung requests are cut and delays end, so `stop()` is not held up."""
    app[STOPPING_KEY].set()


class Emulator:
    """Fake Entra ID + ARM + Azure ML over real HTTPS on one port.

    `clock`, when given, becomes the state's clock (the state's own otherwise).
    `ca_dir` receives `emulator-ca.pem`; without it a temporary directory is used and
    removed on `stop()`.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        state: EmulatorState | None = None,
        ca_dir: Path | str | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.state = state if state is not None else EmulatorState()
        if clock is not None:
            self.state.clock = clock
        self._host = host
        self._port = port
        self._ca_dir = Path(ca_dir) if ca_dir is not None else None
        self._site = Site()
        self._runner: web.AppRunner | None = None
        self._tls: TlsMaterial | None = None

    async def start(self) -> None:
        """Bind the port, then learn the real port and publish the base URL."""
        if self._runner is not None:
            raise RuntimeError("the emulator is already running")
        self._tls = create_tls(_url_host(self._host).strip("[]"), self._ca_dir)
        # Handler cancellation: a client that gives up on a hung request ends its handler.
        runner = web.AppRunner(
            build_app(self.state, self._site),
            access_log=None,
            shutdown_timeout=1.0,
            handler_cancellation=True,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._port, ssl_context=self._tls.context)
            await site.start()
        except BaseException:
            await runner.cleanup()
            self._tls.close()
            raise
        self._runner = runner
        port = runner.addresses[0][1]
        self._site.base_url = f"https://{_url_host(self._host)}:{port}"
        self._site.ca_path = str(self._tls.ca_path)

    async def stop(self) -> None:
        """Close every connection, then remove the temporary CA (if any)."""
        if self._runner is not None:
            server = self._runner.server
            handlers = server.connections if server is not None else []
            transports = [h.transport for h in handlers if h.transport is not None]
            await self._runner.cleanup()
            self._runner = None
            # A graceful TLS close waits for the peer's close_notify, which an idle pooled
            # client (requests, in another thread) never sends: the socket would outlive
            # the loop. The emulator is going away, so cut what is left.
            for transport in transports:
                transport.abort()
            await asyncio.sleep(0)
        if self._tls is not None:
            self._tls.close()
            self._tls = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        if not self._site.base_url:
            raise RuntimeError("the emulator has not been started")
        return self._site.base_url

    @property
    def ca_path(self) -> Path:
        if self._tls is None:
            raise RuntimeError("the emulator has not been started")
        return self._tls.ca_path

    @property
    def authority_host(self) -> str:
        return self.base_url

    @property
    def resource_manager(self) -> str:
        return self.base_url

    @property
    def region_api(self) -> str:
        return f"{self.base_url}/regions/{{region}}"

    def cloud_profile_toml(self, name: str = "custom") -> str:
        """The `[cloud]` table of broker.toml that points the broker at this emulator."""
        return (
            "[cloud]\n"
            f'name = "{name}"\n'
            f'authority_host = "{self.authority_host}"\n'
            f'resource_manager = "{self.resource_manager}"\n'
            f'region_api = "{self.region_api}"\n'
            f'ca_bundle = "{self.ca_path}"\n'
        )


ReadyCallback = Callable[[Emulator], Awaitable[None] | None]


async def run_emulator(
    host: str,
    port: int,
    ca_dir: Path | str | None,
    state: EmulatorState,
    ready_callback: ReadyCallback | None = None,
) -> None:
    """Serve `state` on `host:port` until cancelled (the `token-broker emulator` command).

    `ca_dir` receives `emulator-ca.pem` (None: a temporary directory, removed on exit).
    `ready_callback(emulator)`, sync or async, runs once the port is bound, e.g. to print
    `emulator.base_url`, `emulator.ca_path` and `emulator.cloud_profile_toml()`.
    Cancelling the task stops the server cleanly.
    """
    async with Emulator(host=host, port=port, state=state, ca_dir=ca_dir) as emulator:
        if ready_callback is not None:
            result = ready_callback(emulator)
            if inspect.isawaitable(result):
                await result
        await asyncio.Event().wait()


def _url_host(host: str) -> str:
    if host in _WILDCARD_HOSTS:
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
