"""`token-broker probe live|ready`: is the broker running, is it ready? Exit 0 or 1.

For exec probes (a Kubernetes startupProbe, readinessProbe or livenessProbe, a container
HEALTHCHECK), so that the image needs neither curl nor a shell. It runs every few seconds
in every pod: this module imports the standard library only (a test holds it to that) and
the CLI dispatches here before it imports anything else.

`live` asks `GET /healthz` (the process answers), `ready` asks `GET /readyz` (every
service has a usable credential), over the Unix socket or a loopback URL, with the
`Metadata: true` header and a loopback `Host`, as the broker's guards want. 0 means a 2xx
answer; anything else is 1, and one line on stderr says why.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
from collections.abc import Sequence
from urllib.parse import urlsplit

EXIT_OK = 0
EXIT_FAILURE = 1  # the broker is not alive, or not ready, or cannot be reached
EXIT_USAGE = 2  # the command line is wrong (argparse's own code)

# broker.config's DEFAULT_SOCKET_PATH, repeated so that no configuration code is imported
# (a test holds them equal).
DEFAULT_SOCKET = "/run/token-broker/broker.sock"
DEFAULT_TIMEOUT_S = 3.0
ROUTES = {"live": "/healthz", "ready": "/readyz"}
_NAMES_SHOWN = 10  # services named in a "not ready" line; the rest are counted
_BODY_READ = 65536


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket; the Host header says `localhost`."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def parser(prog: str = "token-broker probe") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Ask a running broker whether it is alive (live: GET /healthz) or ready "
        "(ready: GET /readyz, every service has a usable credential). Exit 0 if so, 1 if not, "
        "with the reason on stderr. Imports nothing but the standard library: made for exec "
        "probes, which run it every few seconds.",
    )
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=sorted(ROUTES), help="live or ready")
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--socket",
        help=f"the broker's Unix socket (default $TOKEN_BROKER_SOCKET or {DEFAULT_SOCKET})",
    )
    where.add_argument(
        "--url",
        help="the broker's loopback URL instead, e.g. http://127.0.0.1:8765 "
        "(default $TOKEN_BROKER_URL when set)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help=f"seconds to wait for the answer (default {DEFAULT_TIMEOUT_S:g})",
    )


def main(argv: Sequence[str], prog: str = "token-broker probe") -> int:
    args = parser(prog).parse_args(argv)
    ok, line = probe(args.what, socket_path=args.socket, url=args.url, timeout_s=args.timeout)
    print(line, file=sys.stdout if ok else sys.stderr)
    return EXIT_OK if ok else EXIT_FAILURE


def probe(
    what: str,
    *,
    socket_path: str | None = None,
    url: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> tuple[bool, str]:
    """Whether the broker answered `what` with a 2xx, and one line saying so or why not.

    An explicit `socket_path` or `url` wins; then $TOKEN_BROKER_URL, then
    $TOKEN_BROKER_SOCKET, then the default socket, as for the other client commands."""
    route = ROUTES[what]
    if socket_path is None and url is None:
        url = os.environ.get("TOKEN_BROKER_URL") or None
    connection: http.client.HTTPConnection
    if socket_path is None and url is not None:
        where, path = url, urlsplit(url).path.rstrip("/") + route
        try:
            connection = _tcp_connection(url, timeout_s)
        except ValueError as exc:
            return False, f"{what}: {exc}"
    else:
        where = socket_path or os.environ.get("TOKEN_BROKER_SOCKET") or DEFAULT_SOCKET
        path = route
        connection = _UnixConnection(where, timeout_s)
    try:
        connection.request("GET", path, headers={"Metadata": "true"})
        answer = connection.getresponse()
        body = answer.read(_BODY_READ)
    except TimeoutError:
        return False, f"{what}: no answer from the broker at {where} within {timeout_s:g} s"
    except (OSError, http.client.HTTPException) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else repr(exc)
        return False, f"{what}: cannot reach the broker at {where}: {reason}; is it running?"
    finally:
        connection.close()
    return _judge(what, route, answer.status, body)


def _tcp_connection(url: str, timeout_s: float) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"--url {url!r} is not an http:// URL, e.g. http://127.0.0.1:8765")
    try:
        port = parts.port or 80
    except ValueError:
        raise ValueError(
            f"--url {url!r} has a port that is not a number, e.g. http://127.0.0.1:8765"
        ) from None
    return http.client.HTTPConnection(parts.hostname, port, timeout=timeout_s)


def _judge(what: str, route: str, status: int, body: bytes) -> tuple[bool, str]:
    if 200 <= status < 300:
        return True, f"{what}: GET {route} answered {status}"
    detail = ""
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if isinstance(answer, dict):
        waiting = answer.get("waiting_for")
        if isinstance(waiting, list) and waiting:
            names = [str(name) for name in waiting]
            shown = ", ".join(names[:_NAMES_SHOWN])
            more = f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else ""
            detail = f": no usable credential yet for {shown}{more}"
        elif isinstance(answer.get("message"), str):
            detail = f": {answer['message'][:200]}"
    return False, f"{what}: GET {route} answered {status}{detail}"
