"""The body of a `regenerateKeys` request, the same for MMS v1 services and ARM v2 online
endpoints: `{"keyType": "Primary"|"Secondary", "keyValue": null | str}`. Each caller
passes its own error factory, so a bad body is refused in that API's error shape.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable

from aiohttp import web

from broker.emulator.replies import EmulatorError

ErrorFactory = Callable[[int, str, str], EmulatorError]


async def rotation_request(request: web.Request, error: ErrorFactory) -> tuple[str, str]:
    """The key to replace ("Primary" or "Secondary") and its new value (random when
    `keyValue` is null); a 400 BadRequest from `error` for any other body."""
    try:
        body = json.loads(await request.text() or "null")
    except ValueError:
        body = None
    key_type = body.get("keyType") if isinstance(body, dict) else None
    value = body.get("keyValue") if isinstance(body, dict) else None
    if not isinstance(key_type, str) or key_type.lower() not in ("primary", "secondary"):
        raise error(400, "BadRequest", 'The body must be {"keyType": "Primary"|"Secondary"}.')
    if value is not None and (not isinstance(value, str) or not value):
        raise error(400, "BadRequest", "keyValue must be null or a non-empty string.")
    return key_type.capitalize(), value or secrets.token_urlsafe(32)
