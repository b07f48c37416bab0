"""`GET /metrics`, and the middleware that counts local requests by route template.

The count is labelled with the matched route's template (`/v1/token/{service}`),
never the path a client sent, so a client cannot create series or smuggle text into
a label; a request no route matches (unknown path, or a method the path does not take)
counts as `unmatched`.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from broker.metrics import UNMATCHED, Metrics

METRICS = web.AppKey("metrics", Metrics)


async def scrape(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def route_template(request: web.Request) -> str:
    """The canonical path of the route that matched `request`, or `unmatched`."""
    resource = request.match_info.route.resource
    return UNMATCHED if resource is None else resource.canonical


def count_requests(metrics: Metrics) -> Middleware:
    """A middleware counting every answer by route template and status; put it outermost
    so that it sees the status the error middleware rendered."""

    @web.middleware
    async def counted(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # redirects and anything the error middleware let by
            metrics.observe_request(route_template(request), exc.status)
            raise
        metrics.observe_request(route_template(request), response.status)
        return response

    return counted
