"""Structured logs: JSON off a terminal, readable console on one, secrets never.

Redaction runs last before rendering, after exceptions are formatted, and removes
secrets three ways: by key (`access_token=…`), by shape (JWTs, `Bearer …`, PEM
blocks) and by value (every credential the broker holds is registered with
`register_secret`, since web-service keys have no recognisable shape).
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import MutableMapping
from typing import Any, TextIO, cast

import structlog
from structlog.tracebacks import ExceptionDictTransformer

from broker.models import Clock, system_clock

MASK = "[REDACTED]"

_SECRET_KEYS = re.compile(
    r"(secret|password|passphrase|token|assertion|authorization|api[_-]?key|"
    r"primary_?key|secondary_?key|credential_value|private_key)",
    re.IGNORECASE,
)
# Fields whose names look secret but hold only metadata.
_SAFE_KEYS = frozenset(
    {"token_type", "expires_in_s", "refresh_in_s", "token_kind", "secret_source", "event"}
)
_SHAPES = re.compile(
    r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"  # JWT
    r"|(?i:bearer)\s+[^\s\"',;]+"  # Authorization header values
    r"|-----BEGIN [A-Z ]+-----.*?-----END [A-Z ]+-----",  # PEM blocks
    re.DOTALL,
)


class SecretRegistry:
    """Values that must never be printed; thread-safe since MSAL runs in threads.

    Scrubbing costs one pass over the text whatever the number of secrets: every run of
    characters that secrets are made of is looked up in a set. (A regex of all the
    secrets, recompiled whenever one is added, made logging quadratic in the number of
    services.) The rare secret holding other characters is searched for directly.
    """

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._unusual: set[str] = set()  # values a run of _SECRET_CHARS cannot hold whole
        self._lock = threading.Lock()

    def add(self, value: str) -> None:
        if len(value) < 6:  # too short to search for without masking ordinary words
            return
        with self._lock:
            if _SECRET_RUN.fullmatch(value):
                self._values.add(value)
            else:
                self._unusual.add(value)

    def discard(self, value: str) -> None:
        with self._lock:
            self._values.discard(value)
            self._unusual.discard(value)

    def scrub(self, text: str) -> str:
        text = _SHAPES.sub(MASK, text)
        values = self._values
        if values:
            text = _SECRET_RUN.sub(lambda m: _masked(m.group(0), values), text)
        for value in tuple(self._unusual):
            text = text.replace(value, MASK)
        return text


def _masked(run: str, values: set[str]) -> str:
    if run in values:
        return MASK
    name, equals, rest = run.partition("=")  # a `name=value` pair is one run
    if equals and rest in values:
        return f"{name}={MASK}"
    return run


# What keys, client secrets and tokens are made of (base64, base64url, Azure's secret
# alphabet); a registered value is found when it stands as a whole run of these.
_SECRET_RUN = re.compile(r"[A-Za-z0-9+/=_\-.~]{6,}")


SECRETS = SecretRegistry()


def register_secret(value: str) -> None:
    """Mark a value as secret everywhere logs or errors might show it."""
    SECRETS.add(value)


def forget_secret(value: str) -> None:
    SECRETS.discard(value)


def scrub(text: str) -> str:
    """The text with every known and every secret-shaped value masked."""
    return SECRETS.scrub(text)


def _secret_key(key: str) -> bool:
    known = _secret_keys.get(key)
    if known is None:
        known = key not in _SAFE_KEYS and _SECRET_KEYS.search(key) is not None
        if len(_secret_keys) < _SECRET_KEYS_MEMO:  # keys are ours and few; never unbounded
            _secret_keys[key] = known
    return known


_SECRET_KEYS_MEMO = 4096
_secret_keys: dict[str, bool] = {}


def _redact_value(key: str, value: Any) -> Any:
    if _secret_key(key) and value not in (None, ""):
        return MASK
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: _redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(key, v) for v in value]
    return value


def redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: mask secrets by key, shape and known value."""
    for key in list(event_dict):
        event_dict[key] = _redact_value(key, event_dict[key])
    return event_dict


class RepeatLimiter:
    """structlog processor: a repeating warning or error (the same event, service and
    reason) is written at most once per `interval_s`; the next one written says how many
    were left out (`repeats_suppressed`). Whatever loops — a refresh failing the same way,
    a client sending the same bad request — the log grows by a line per interval."""

    _MAX_KEYS = 4096  # a bound on memory whatever varies in foreign events' text

    def __init__(self, interval_s: float = 60.0, clock: Clock = system_clock) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._last: dict[tuple[str, str, str], tuple[float, int]] = {}  # key -> (written, left out)
        self._lock = threading.Lock()  # MSAL's threads log too

    def __call__(
        self, _: Any, __: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if event_dict.get("level") not in _LIMITED_LEVELS:
            return event_dict
        left_out = self.admit(
            str(event_dict.get("event", "")),
            str(event_dict.get("service", "")),
            str(event_dict.get("reason", event_dict.get("status", ""))),
        )
        if left_out is None:
            raise structlog.DropEvent
        if left_out:
            event_dict["repeats_suppressed"] = left_out
        return event_dict

    def admit(self, event: str, service: str, reason: str) -> int | None:
        """None when this repeat is to be left out; else how many were left out before it."""
        key = (event[:200], service, reason)
        now = self._clock()
        with self._lock:
            written, left_out = self._last.get(key, (None, 0))
            if written is not None and now - written < self.interval_s:
                self._last[key] = (written, left_out + 1)
                return None
            if len(self._last) >= self._MAX_KEYS:
                self._last.clear()
            self._last[key] = (now, 0)
        return left_out

    def clear(self) -> None:
        with self._lock:
            self._last.clear()


_LIMITED_LEVELS = frozenset({"warning", "error", "critical", "exception"})
REPEATS = RepeatLimiter()


class _QuietRepeats(logging.Filter):
    """The same limit for libraries' warnings and errors (aiohttp's, MSAL's), which reach
    the log through the standard library rather than structlog's processors."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        left_out = REPEATS.admit(str(record.msg), "", record.name)
        if left_out is None:
            return False
        if left_out:
            record.msg, record.args = f"{record.getMessage()} ({left_out} repeats left out)", ()
        return True


def _shared(json_output: bool) -> list[Any]:
    """What every event goes through before rendering, ours and libraries' alike."""
    return [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _tracebacks(json_output),
        redact,
    ]


def _tracebacks(json_output: bool) -> Any:
    """Tracebacks as structured frames (JSON) or text, never with the frames' local
    variables: structlog's default JSON tracebacks print them, cut at 80 characters, and a
    cut-off token, a request's headers or the first bytes of a body escape redaction by
    value. A frame's file, line and function say where; its locals stay out."""
    if not json_output:
        return structlog.processors.format_exc_info
    return structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False))


def _renderer(json_output: bool) -> Any:
    if json_output:
        return structlog.processors.JSONRenderer()
    return structlog.dev.ConsoleRenderer(colors=False)


class _QuietMalformedRequests(logging.Filter):
    """aiohttp logs every malformed request as an error with a traceback that quotes the
    request's bytes — credentials included. The client already got its 400 naming the
    problem; the record is dropped, so no local client can flood the log either."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.name.startswith("aiohttp")
            and str(record.msg).startswith("Error handling request")
        )


# What aiohttp's own records say, as stable event names. Its records are rendered from
# these and the exception's class alone: their message arguments, their text and their
# traceback can quote the request (every header, the API key and identity header among
# them) and are never written.
_AIOHTTP_EVENTS = (
    ("Unhandled exception", "http.connection_failed"),
    ("Missing return statement", "http.handler_without_response"),
    ("Web-handler should return", "http.handler_without_response"),
)


def _library_record(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor for records of the standard library's loggers: aiohttp's become
    ordinary events (`http.connection_failed reason=ContentEncodingError`) with no header
    value, body byte or traceback in them; other libraries' pass as they are."""
    record = event_dict.get("_record")
    if record is None or not record.name.startswith("aiohttp"):
        return event_dict
    exc_info = event_dict.pop("exc_info", None)
    event_dict.pop("stack_info", None)
    event_dict.pop("positional_args", None)
    template = str(record.msg)
    event_dict["event"] = next(
        (name for prefix, name in _AIOHTTP_EVENTS if template.startswith(prefix)),
        "http.library_message",
    )
    event_dict["component"] = record.name
    event_dict["reason"] = _exception_name(exc_info)
    return event_dict


def _exception_name(exc_info: Any) -> str | None:
    if isinstance(exc_info, tuple) and exc_info and isinstance(exc_info[0], type):
        return exc_info[0].__name__
    if isinstance(exc_info, BaseException):
        return type(exc_info).__name__
    return None


def configure(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Set up logging once per process; `fmt` is auto, json or console.

    The standard library's loggers (aiohttp, MSAL, asyncio) are routed through the same
    redaction and rendering as ours, so a library cannot print a secret either.
    """
    global _configuration
    out = stream or sys.stderr
    json_output = fmt == "json" or (fmt == "auto" and not out.isatty())
    threshold = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            REPEATS,
            *_shared(json_output)[1:],
            _renderer(json_output),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    _configuration += 1
    REPEATS.clear()
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[_library_record, *_shared(json_output)],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                _renderer(json_output),
            ],
        )
    )
    handler.addFilter(_QuietMalformedRequests())
    handler.addFilter(_QuietRepeats())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(max(threshold, logging.INFO))  # libraries' debug chatter stays out
    # APScheduler reports every job it adds or runs at INFO: one line per refresh, twice.
    logging.getLogger("apscheduler").setLevel(max(threshold, logging.WARNING))


def reset() -> None:
    """Undo `configure` (for tests, which configure per test)."""
    global _configuration
    structlog.reset_defaults()
    _configuration += 1
    logging.getLogger().handlers = []


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    return cast(structlog.typing.FilteringBoundLogger, _Logger(name))


_configuration = 0  # counts `configure` and `reset` calls: loggers rebuild after each


class _Logger:
    """A module's logger. structlog's lazy proxy builds a new bound logger (and a new output
    logger) on every call so that tests can reconfigure; this one builds it once per
    `configure`. That was a third of the cost of a log line, and a debug line filtered out
    cost as much as a written one."""

    __slots__ = ("_bound", "_built_for", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._bound: Any = None
        self._built_for = -1

    def __getattr__(self, method: str) -> Any:
        if self._built_for != _configuration:
            self._bound = structlog.get_logger(component=self._name).bind()
            self._built_for = _configuration
        return getattr(self._bound, method)
