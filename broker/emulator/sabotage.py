"""What an armed fault does to a request on the wire, as a flaky Azure, an overloaded
region or a broken proxy between it and the broker would:

- "status": the fault's status, its body (Azure's error shape by default), `Retry-After`;
- "reset": the request is read, then the TCP connection is aborted with an RST, unanswered;
- "hang": no answer, until the client gives up or the emulator stops (then: as "reset");
- "slow": the real answer, `delay_s` late;
- "malformed": 200, an HTML page (or the fault's `str` body) labelled application/json;
- "partial": the real answer cut in half, with a `Content-Length` that matches the cut;
- "cut": the real answer's status and headers, its whole `Content-Length`, half its body,
  then the connection closed: an answer that breaks off while it is read;
- "missing_fields": the real answer without the fields a client needs (`ESSENTIAL`);
  `{}` (200) for routes that have none;
- "expired", "expiring", "not_yet_valid": the real answer, its token shaped by the
  fault (see `shaped_times`): well-formed, signed, and unusable on arrival.

"partial" and "missing_fields" keep the real answer's status: 200 for a good request, the
route's error (a 401 for a missing token, say) for a bad one.

Every kind first waits the fault's `delay_s`; the emulator's stop cuts any wait short.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import hdrs, web

from broker.emulator.context import state_of, stopping_of
from broker.emulator.faults import VALIDITY_KINDS, Fault
from broker.emulator.replies import fault_response

Answer = Callable[[], Awaitable[web.StreamResponse]]

ESSENTIAL: Final[dict[str, tuple[tuple[str, ...], ...]]] = {
    "mms.token": (("accessToken",), ("expiryOn",)),
    "mms.listkeys": (("primaryKey",),),
    "mms.describe": (("computeType",),),
    "arm.workspace": (("properties", "discoveryUrl"),),
    "arm.endpoint": (("properties", "authMode"), ("properties", "scoringUri")),
    "arm.endpoint_token": (("accessToken",), ("expiryTimeUtc",)),
    "arm.endpoint_keys": (("primaryKey",),),
    "arm.operation": (("status",),),
    "discovery": (("modelmanagement",),),
    "entra.token": (("access_token",),),
}
VALIDITY: Final = web.RequestKey("validity", Fault)

MALFORMED_BODY: Final = "<html><body><h1>502 Bad Gateway</h1>upstream error</body></html>"
_RST_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends an RST


async def apply(
    request: web.Request, route: str, fault: Fault, answer: Answer
) -> web.StreamResponse:
    """The response (if any) of a request of `route` that `fault` caught; `answer()`
    runs the route's real handler."""
    await pause(request, fault.delay_s)
    if fault.kind == "reset":
        return await reset(request)
    if fault.kind == "hang":
        try:
            return await hang(request)
        except asyncio.CancelledError:  # the client gave up
            state_of(request).tell("abandoned", route)
            raise
    if fault.kind == "malformed":
        return malformed(fault)
    if fault.kind == "partial":
        return truncated(await answer())
    if fault.kind == "cut":
        return await cut_short(request, await answer())
    if fault.kind == "missing_fields":
        return await without_essentials(route, answer)
    if fault.kind in VALIDITY_KINDS:
        request[VALIDITY] = fault
        return await answer()
    if fault.kind == "slow":
        return await answer()
    return fault_response(request, route, fault)


def shaped_times(request: web.Request, issued_at: float, lifetime_s: float) -> tuple[int, int, int]:
    """`(iat, nbf, exp)` of a token issued at `issued_at` for `lifetime_s`, as a validity
    fault on the request shapes them (whole epoch seconds; untouched without one)."""
    fault = request.get(VALIDITY)
    expires = math.floor(issued_at + lifetime_s)
    issued = not_before = int(issued_at)
    if fault is None:
        return issued, not_before, expires
    if fault.kind == "expired":
        expires = math.floor(issued_at) - 60
    elif fault.kind == "expiring":
        expires = math.floor(issued_at + fault.expires_in_s)
    if fault.kind in ("expired", "expiring"):
        issued = not_before = math.floor(expires - lifetime_s)
    else:  # not yet valid: it starts half a lifetime from now
        not_before = math.floor(issued_at + lifetime_s / 2)
    return issued, not_before, expires


async def pause(request: web.Request, delay_s: float) -> None:
    """Wait `delay_s`, or less if the emulator stops meanwhile."""
    if delay_s > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping_of(request).wait(), delay_s)


async def reset(request: web.Request) -> web.StreamResponse:
    """Read the request, then abort its connection: the client sees a connection reset."""
    await request.read()
    return _abort(request)


async def hang(request: web.Request) -> web.StreamResponse:
    """Answer nothing. A client that gives up closes the connection, and the server,
    run with handler cancellation, cancels this wait; the emulator's stop ends it too."""
    await stopping_of(request).wait()
    return _abort(request)


def _abort(request: web.Request) -> web.StreamResponse:
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST_ON_CLOSE)
        transport.abort()
    # aiohttp finds the transport closing, drops this response and logs at debug level only.
    return web.Response(status=204)


def malformed(fault: Fault) -> web.Response:
    text = fault.body if isinstance(fault.body, str) else MALFORMED_BODY
    return web.Response(status=200, text=text, content_type="application/json")


def truncated(response: web.StreamResponse) -> web.StreamResponse:
    """The same response with the first half of its body only."""
    body = _body_of(response)
    if body is None:
        return response
    return _with_body(response, body[: len(body) // 2])


async def cut_short(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """Send the response's headers and the first half of its body, then close."""
    body = _body_of(response)
    if body is None:
        return response
    stream = web.StreamResponse(status=response.status, headers=response.headers.copy())
    stream.content_length = len(body)
    await stream.prepare(request)
    await stream.write(body[: len(body) // 2])
    if request.transport is not None:
        request.transport.close()
    return stream


async def without_essentials(route: str, answer: Answer) -> web.StreamResponse:
    """The route's real answer without its `ESSENTIAL` fields (`{}` if it has none)."""
    paths = ESSENTIAL.get(route)
    if paths is None:
        return web.json_response({})
    response = await answer()
    try:
        document = json.loads(_body_of(response) or b"null")
    except ValueError:
        return response
    if not isinstance(document, dict):
        return response
    for path in paths:
        _drop(document, path)
    return _with_body(response, json.dumps(document).encode())


def _drop(document: dict[str, object], path: tuple[str, ...]) -> None:
    *parents, leaf = path
    for name in parents:
        child = document.get(name)
        if not isinstance(child, dict):
            return
        document = child
    document.pop(leaf, None)


def _body_of(response: web.StreamResponse) -> bytes | None:
    if isinstance(response, web.Response) and isinstance(response.body, bytes):
        return response.body
    return None


def _with_body(response: web.StreamResponse, body: bytes) -> web.Response:
    headers = response.headers.copy()
    headers.popall(hdrs.CONTENT_LENGTH, None)
    return web.Response(status=response.status, body=body, headers=headers)
