"""aiohttp's request seen as the guards and the access rules read every request.

The front door keeps its own record of a request (front_door.py); behind it, aiohttp's
`web.Request` is wrapped here, so that both reach `guards.check` and
`AccessRules.authorize` through the same `RequestView`.
"""

from __future__ import annotations

import socket

from aiohttp import web

from broker.server.guards import RawHeaders
from broker.server.keys import CONNECTIONS
from broker.server.peers import Peer, peer_of_socket


class AppRequest:
    """A `RequestView` of an aiohttp request; reads what it is asked, when it is asked."""

    __slots__ = ("_request",)

    def __init__(self, request: web.Request) -> None:
        self._request = request

    @property
    def method(self) -> str:
        return self._request.method

    @property
    def raw_path(self) -> str:
        return self._request.raw_path

    @property
    def path(self) -> str:
        return self._request.path

    @property
    def raw_headers(self) -> RawHeaders:
        return self._request.raw_headers

    @property
    def body_exists(self) -> bool:
        return self._request.body_exists

    @property
    def unix(self) -> bool:
        return is_unix(self._request)

    @property
    def peer(self) -> Peer | None:
        return peer_of(self._request)


def is_unix(request: web.Request) -> bool:
    """Whether the request came over the Unix socket.

    A Unix socket's address is its path (`str`, or `bytes` in the abstract namespace), a
    TCP socket's a tuple: asking the transport for it is a dictionary lookup, where the
    socket's `family` builds an enum on every request."""
    transport = request.transport
    if transport is None:
        return False
    address = transport.get_extra_info("sockname")
    if address is None:  # getsockname() failed when the connection was made
        sock = transport.get_extra_info("socket")
        return sock is not None and sock.family == socket.AF_UNIX
    return isinstance(address, str | bytes)


def peer_of(request: web.Request) -> Peer | None:
    """The connecting process's identity, as the listener read it at admission (from the
    kernel, when the application runs without the broker's listeners); None off a socket."""
    connection = request.app[CONNECTIONS].of(request.transport)
    if connection is not None:
        return connection.peer
    sock = request.transport.get_extra_info("socket") if request.transport else None
    return peer_of_socket(sock)
