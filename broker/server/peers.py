"""Who is at the other end of a Unix socket connection, as the kernel saw it at connect().

The kernel records the peer's credentials when it connects (`SO_PEERCRED`,
`SO_PEERGROUPS`) and they never change for the connection's life: the listener reads
them once, when it admits the connection, and every request on it is judged by them.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux ≥ 4.13
_MAX_GROUPS = 256


@dataclass(frozen=True, slots=True)
class Peer:
    """The process at the other end of a Unix socket connection, as the kernel saw it."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int]


def peer_of_socket(sock: socket.socket | None) -> Peer | None:
    """The identity of the process at the other end of `sock`; None for other sockets."""
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
    except OSError:
        return None
    return Peer(pid, uid, gid, _groups(sock))


def _groups(sock: socket.socket) -> frozenset[int]:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * _MAX_GROUPS)
    except OSError:
        return frozenset()
    return frozenset(struct.unpack(f"{len(raw) // 4}I", raw))
