"""The `[proxy]` table: how `ANY /v1/proxy/{service}/{path}` forwards requests.

Every key has a default, so the table is optional. Sizes are bytes, times seconds.
A request body longer than `max_body_bytes` is refused; one up to `retry_buffer_bytes`
is kept in memory so that the call can be sent again once after a 401 and a refresh
(longer bodies are streamed and cannot be replayed). `timeout_s` bounds a whole
forwarded call, `connect_timeout_s` the connection to the scoring host within it.
"""

from __future__ import annotations

from dataclasses import fields

from broker.config.model import ProxyConfig
from broker.config.reader import Table

_KEYS = tuple(f.name for f in fields(ProxyConfig))
_MAX_BYTES = 1 << 40  # a bound that no real body reaches, so typos of many digits are caught
_MAX_RETRY_BUFFER = 1 << 20  # kept in memory per request under way: stay modest
_HEADER_LIMITS = (1024, 1 << 20)


def proxy(root: Table) -> ProxyConfig:
    table = root.table("proxy")
    table.known(*_KEYS)
    defaults = ProxyConfig()
    max_body = table.integer("max_body_bytes", defaults.max_body_bytes, 0, _MAX_BYTES)
    retry_buffer = _retry_buffer(table, defaults.retry_buffer_bytes, max_body)
    timeout = table.positive("timeout_s", defaults.timeout_s)
    connect = table.positive("connect_timeout_s", min(defaults.connect_timeout_s, timeout))
    if connect > timeout:
        table.problem(
            "connect_timeout_s",
            f"connect_timeout_s ({connect:g}) is more than timeout_s ({timeout:g}), "
            "which bounds the whole call",
            "lower connect_timeout_s or raise timeout_s",
        )
        connect = timeout
    return ProxyConfig(
        table.flag("enabled", defaults.enabled),
        max_body,
        retry_buffer,
        timeout,
        connect,
        table.integer("max_header_bytes", defaults.max_header_bytes, *_HEADER_LIMITS),
        table.integer("max_connections", defaults.max_connections, 1, 10000),
    )


def _retry_buffer(table: Table, default: int, max_body: int) -> int:
    value = table.integer("retry_buffer_bytes", min(default, max_body), 0, _MAX_RETRY_BUFFER)
    if value > max_body:
        table.problem(
            "retry_buffer_bytes",
            f"retry_buffer_bytes ({value}) is more than max_body_bytes ({max_body}), "
            "so no body could ever fill it",
            "lower retry_buffer_bytes to max_body_bytes or less, or raise max_body_bytes",
        )
        return max_body
    return value
