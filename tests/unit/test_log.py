"""Logs never show a secret: by key, by shape, or by registered value."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest

from broker import log

pytestmark = pytest.mark.timeout(5)

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLWJ5dGVz"
PEM = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg\n-----END PRIVATE KEY-----"


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    log.configure("json", "debug", stream=stream)
    yield stream
    log.reset()


def test_secret_keys_are_masked(lines: io.StringIO) -> None:
    """Fields named like secrets are masked whatever they hold."""
    log.get_logger("t").info(
        "x", client_secret="abc123xyz", access_token="plain", token_type="Bearer"
    )
    record = json.loads(lines.getvalue())
    assert record["client_secret"] == log.MASK and record["access_token"] == log.MASK
    assert record["token_type"] == "Bearer"


def test_secret_shapes_are_masked_inside_text(lines: io.StringIO) -> None:
    """JWTs, Bearer values and PEM blocks are masked inside any string, nested or not."""
    log.get_logger("t").info("x", error=f"got {JWT} and Bearer abcdefgh", extra={"pem": PEM})
    text = lines.getvalue()
    assert JWT not in text and "abcdefgh" not in text and "MIIEvQIBADANBg" not in text


def test_registered_values_are_masked(lines: io.StringIO) -> None:
    """A key with no recognisable shape is masked once registered, and in tracebacks too."""
    log.register_secret("plain-looking-key-0001")
    try:
        raise ValueError("bad key plain-looking-key-0001")
    except ValueError:
        log.get_logger("t").exception("failed", note="plain-looking-key-0001")
    assert "plain-looking-key-0001" not in lines.getvalue()
    log.forget_secret("plain-looking-key-0001")
    assert log.scrub("plain-looking-key-0001") == "plain-looking-key-0001"


def test_console_format_is_redacted_too() -> None:
    """The console renderer gets the same redaction as JSON."""
    stream = io.StringIO()
    log.configure("console", "info", stream=stream)
    try:
        log.get_logger("t").info("x", password="hunter22", detail=JWT)
    finally:
        log.reset()
    assert "hunter22" not in stream.getvalue() and JWT not in stream.getvalue()


def test_library_logs_are_redacted_too(lines: io.StringIO) -> None:
    """Standard-library loggers (MSAL, aiohttp) go through the same redaction."""
    import logging

    log.register_secret("library-known-secret-42")
    logging.getLogger("msal").warning("token %s and library-known-secret-42", JWT)
    text = lines.getvalue()
    assert "msal" in text or "token" in text
    assert JWT not in text and "library-known-secret-42" not in text


def test_aiohttp_malformed_request_tracebacks_are_dropped(lines: io.StringIO) -> None:
    """aiohttp's per-request error tracebacks, which quote request bytes, are not written."""
    import logging

    try:
        raise ValueError("b'X-Token-Broker-Key: plain-value'")
    except ValueError:
        logging.getLogger("aiohttp.server").exception("Error handling request from %s", "x")
    assert "plain-value" not in lines.getvalue()


def test_registered_values_are_found_in_any_context() -> None:
    """A registered key is masked alone, quoted, after `name=`, and among many others."""
    for n in range(2000):
        log.register_secret(f"other-secret-value-{n:05d}")
    log.register_secret("AbCdEf0123456789+/xyz==")
    for text in (
        "AbCdEf0123456789+/xyz==",
        '{"primaryKey": "AbCdEf0123456789+/xyz=="}',
        "key=AbCdEf0123456789+/xyz==",
        "error: other-secret-value-01999 was refused",
    ):
        scrubbed = log.scrub(text)
        assert "AbCdEf0123456789" not in scrubbed and "01999" not in scrubbed, scrubbed
    for n in range(2000):
        log.forget_secret(f"other-secret-value-{n:05d}")
    log.forget_secret("AbCdEf0123456789+/xyz==")


def test_aiohttp_records_become_events_without_request_text(lines: io.StringIO) -> None:
    """aiohttp's other error records are written as a stable event naming the exception's
    class: no message, argument, traceback or local that could quote a request header."""
    import logging

    def parse(headers: str) -> None:
        raise ValueError("Can not decode " + headers)

    try:
        parse("X-Token-Broker-Key: plain-header-value")
    except ValueError:
        logging.getLogger("aiohttp.server").exception("Unhandled exception")
    logging.getLogger("aiohttp.web").error("Web-handler should return a response, got %r", "xx")
    first, second = (json.loads(line) for line in lines.getvalue().splitlines())
    assert first["event"] == "http.connection_failed" and first["reason"] == "ValueError"
    assert first["component"] == "aiohttp.server" and "exception" not in first
    assert second["event"] == "http.handler_without_response" and second["reason"] is None
    assert "plain-header-value" not in lines.getvalue() and "xx" not in lines.getvalue()


def test_tracebacks_show_no_local_variables(lines: io.StringIO) -> None:
    """A traceback names its frames but never their locals, where a cut-off token would
    escape redaction by value."""

    def write_event(data: str) -> None:
        raise ConnectionResetError("Cannot write to closing transport")

    fragment = '{"access_token": "unregistered-token-fragm'
    try:
        write_event(fragment)
    except ConnectionResetError:
        log.get_logger("t").exception("request.crashed")
    text = lines.getvalue()
    assert "write_event" in text and "unregistered-token-fragm" not in text
