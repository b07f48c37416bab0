"""The aiohttp application: routes, and the one middleware that renders errors."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from broker.cache import Store
from broker.config import CompatConfig
from broker.errors import LocalRequestError
from broker.key_rotation import KeyRotations
from broker.log import get_logger
from broker.metrics import Metrics
from broker.server import guards, metrics_route, routes
from broker.server.access_rules import AccessRules
from broker.server.connections import Connections
from broker.server.keys import ACCESS, CONNECTIONS, ROTATIONS, STORE
from broker.server.managed_identity_routes import (
    APP_SERVICE_PATH,
    COMPAT,
    IMDS_PATH,
    Compat,
    app_service,
    imds,
)
from broker.server.proxy_routes import Proxy, install
from broker.server.refusals import error_json, retry_after
from broker.server.request_view import AppRequest
from broker.server.streams import Streams

log = get_logger("broker.server")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Count = Callable[[web.Request, int], None]


def error_body(status: int, code: str, message: str) -> web.Response:
    return web.Response(
        status=status, body=error_json(code, message), content_type="application/json"
    )


def guard_answer_and_count(count: Count | None = None) -> Middleware:
    """The middleware every request passes: the guards before any route sees it, every
    refusal and failure rendered as `{"error", "message"}` with the right status, and
    each answer counted by `count` (the metrics). One middleware, not two: each layer
    costs a coroutine per request on the hot path, about a tenth of a token request."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        # A connection being answered is not quiet: no newer connection takes its place.
        connection = request.app[CONNECTIONS].of(request.transport)
        if connection is not None:
            connection.busy += 1
        try:
            try:
                guards.check(AppRequest(request))
                response = await handler(request)
            except LocalRequestError as exc:
                response = error_body(exc.status, exc.code, exc.message)
                if exc.retry_after is not None:
                    response.headers["Retry-After"] = retry_after(exc.retry_after)
            except web.HTTPException as exc:
                if exc.status < 400:
                    if count is not None:
                        count(request, exc.status)
                    raise
                code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "bad_request")
                response = error_body(exc.status, code, exc.reason)
                if "Allow" in exc.headers:
                    response.headers["Allow"] = exc.headers["Allow"]
            except routes.ClientLeft as left:
                if count is not None:
                    count(request, routes.CLIENT_LEFT)
                return left.response
            except ConnectionError:
                # The client left, or the listener cut it (a stalled body): nobody to answer.
                if count is not None:
                    count(request, routes.CLIENT_LEFT)
                return web.Response(status=routes.CLIENT_LEFT)
            except Exception as exc:
                log.exception("request.crashed", route=request.path, reason=type(exc).__name__)
                response = error_body(500, "internal", "internal error; see the broker's log")
            if count is not None:
                count(request, response.status)
            return response
        finally:
            if connection is not None:
                connection.busy -= 1

    return middleware


def make_app(
    store: Store,
    access: AccessRules,
    max_body_bytes: int = 65536,
    *,
    rotations: KeyRotations | None = None,
    compat: Compat | None = None,
    metrics: Metrics | None = None,
    proxy: Proxy | None = None,
) -> web.Application:
    count = None if metrics is None else metrics_route.request_counter(metrics)
    middlewares: list[Middleware] = [guard_answer_and_count(count)]
    app = web.Application(middlewares=middlewares, client_max_size=max_body_bytes)
    app[STORE] = store
    app[ACCESS] = access
    app[ROTATIONS] = rotations or KeyRotations(store)
    connections = app[CONNECTIONS] = Connections(observer=metrics)
    app[routes.STREAMS] = Streams(store, access, connections, observer=metrics)
    app.on_shutdown.append(routes.end_streams)
    app[COMPAT] = compat or Compat(CompatConfig(), None, "")
    app.router.add_get(IMDS_PATH, imds)
    app.router.add_get(APP_SERVICE_PATH, app_service)
    app[routes.RENDERED] = {}
    app.router.add_get("/v1/token/{service}", routes.token)
    app.router.add_post("/v1/token/{service}/refresh", routes.refresh)
    app.router.add_get("/v1/services", routes.services)
    app.router.add_get("/v1/services/{service}", routes.service)
    app.router.add_post("/v1/services/{service}/keys/rotate", routes.rotate_key)
    app.router.add_get("/healthz", routes.healthz)
    app.router.add_get("/readyz", routes.readyz)
    if proxy is not None and proxy.config.enabled:
        install(app, proxy)
    if metrics is not None:
        app[metrics_route.METRICS] = metrics
        app.router.add_get("/metrics", metrics_route.scrape)
    return app
