"""Error answers in the shape each emulated Azure service uses, and injected-fault answers.

Handlers raise `EmulatorError`; the middleware turns it into the response. Shapes:

- Entra ID: `{"error", "error_description": "AADSTSnnn: …", "error_codes", "timestamp",
  "trace_id", "correlation_id", "error_uri"}`
- ARM (and discovery): `{"error": {"code", "message"}}`
- MMS: `{"code", "statusCode", "message"}`
- scoring: `{"error": snake_case_code}`
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime
from email.utils import format_datetime
from http import HTTPStatus

from aiohttp import web

from broker.emulator.context import site_of, state_of
from broker.emulator.faults import Fault

_AADSTS = re.compile(r"AADSTS(\d+)")


class EmulatorError(Exception):
    """An Azure-shaped error answer, raised by a handler and sent by the middleware."""

    def __init__(self, status: int, body: object, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers or {}

    def response(self) -> web.Response:
        return web.json_response(self.body, status=self.status, headers=self.headers)


def http_date(epoch: float) -> str:
    """`epoch` as an HTTP-date (`Sun, 06 Nov 1994 08:49:37 GMT`): the emulator's `Date`
    header, or a `Retry-After` given as a date,
    `state.fail("mms.token", status=429, retry_after=http_date(state.clock() + 30))`."""
    return format_datetime(datetime.fromtimestamp(epoch, UTC), usegmt=True)


def status_code_name(status: int) -> str:
    """Azure's PascalCase code for a status: 429 → "TooManyRequests"."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        return f"Status{status}"
    return "".join(word.capitalize() for word in re.split(r"[^A-Za-z]+", phrase))


def aad_body(request: web.Request, error: str, description: str) -> dict[str, object]:
    """Entra ID's OAuth error body; `description` starts with its AADSTS code."""
    now = datetime.fromtimestamp(state_of(request).clock(), UTC)
    timestamp = now.strftime("%Y-%m-%d %H:%M:%SZ")
    trace_id = str(uuid.uuid4())
    correlation_id = request.headers.get("client-request-id") or str(uuid.uuid4())
    codes = [int(code) for code in _AADSTS.findall(description)[:1]]
    suffix = (
        f"\r\nTrace ID: {trace_id}\r\nCorrelation ID: {correlation_id}\r\nTimestamp: {timestamp}"
    )
    return {
        "error": error,
        "error_description": description + suffix,
        "error_codes": codes,
        "timestamp": timestamp,
        "trace_id": trace_id,
        "correlation_id": correlation_id,
        "error_uri": f"{site_of(request).base_url}/error?code={codes[0] if codes else 0}",
    }


def aad_error(request: web.Request, status: int, error: str, description: str) -> EmulatorError:
    return EmulatorError(status, aad_body(request, error, description))


def arm_error(status: int, code: str, message: str) -> EmulatorError:
    return EmulatorError(status, {"error": {"code": code, "message": message}})


def mms_error(status: int, code: str, message: str) -> EmulatorError:
    return EmulatorError(status, {"code": code, "statusCode": status, "message": message})


def score_error(status: int, error: str) -> EmulatorError:
    return EmulatorError(status, {"error": error})


def no_route(request: web.Request, status: int = 404) -> web.Response:
    """404 (or 405) for a path (or method) the emulator does not serve."""
    message = f"The emulator has no route for {request.method} {request.path}."
    body = {"error": {"code": status_code_name(status), "message": message}}
    return web.json_response(body, status=status)


def fault_response(request: web.Request, route: str, fault: Fault) -> web.Response:
    """The answer of an injected fault: its body, or Azure's error shape for the route."""
    status = fault.status if fault.status is not None else 500
    headers = {"Content-Type": "application/json"}
    retry_after = fault.retry_after_header()
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    if isinstance(fault.body, str):
        return web.Response(status=status, text=fault.body, headers=headers)
    body = fault.body if fault.body is not None else _default_fault_body(request, route, status)
    return web.Response(status=status, text=json.dumps(body), headers=headers)


def _default_fault_body(request: web.Request, route: str, status: int) -> object:
    code = status_code_name(status)
    message = f"Injected fault: {route} answers {status} ({code})."
    if route.startswith("entra."):
        error = "invalid_request" if status < 500 and status != 429 else "temporarily_unavailable"
        text = "AADSTS90033: A transient error has occurred. Please try again. " + message
        return aad_body(request, error, text)
    if route.startswith("mms."):
        return mms_error(status, code, message).body
    if route == "score":
        return {"error": re.sub(r"(?<!^)(?=[A-Z])", "_", code).lower()}
    return arm_error(status, code, message).body
