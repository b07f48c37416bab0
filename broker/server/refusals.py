"""The body and the Retry-After of every error the local API answers, rendered by one
function for the front door (front_answers.py) and for aiohttp's middleware (app.py)."""

from __future__ import annotations

import json


def error_json(code: str, message: str) -> bytes:
    """`{"error": code, "message": message}`, the body of every error answer."""
    return json.dumps({"error": code, "message": message}).encode()


def retry_after(seconds: float) -> str:
    """The Retry-After value for a wait of `seconds`: whole seconds, at least one."""
    return str(max(1, round(seconds)))
