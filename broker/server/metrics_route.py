"""`GET /metrics`, and the count of local requests by route template.

The count is labelled with the matched route's template (`/v1/token/{service}`),
never the path a client sent, so a client cannot create series or smuggle text into
a label; a request no route matches (unknown path, or a method the path does not take)
counts as `unmatched`.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractResource
from prometheus_client import Counter
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


def request_counter(metrics: Metrics) -> Callable[[web.Request, int], None]:
    """A function counting one answer by route template and status, for the error
    middleware to call with the status it rendered. Counters are kept by matched route
    object and status, so a request costs one dictionary lookup and an increment."""
    counters: dict[tuple[AbstractResource | None, int], Counter] = {}

    def count(request: web.Request, status: int) -> None:
        key = (request.match_info.route.resource, status)
        counter = counters.get(key)
        if counter is None:
            counter = counters[key] = metrics.request_count(route_template(request), status)
        counter.inc()

    return count
