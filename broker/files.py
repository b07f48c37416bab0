"""Files the broker writes: replaced whole, with their final mode from the first byte.

A reader of such a file sees the old content or the new, never part of either: the data is
written to a new file beside the target (created exclusively, so never through a link),
given its mode and owner before a byte is written, synced, and renamed over the target;
the directory is synced too, so that the rename survives a power cut.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def write_atomically(
    path: Path, data: bytes, *, mode: int, owner: int | None = None, group: int | None = None
) -> None:
    """Replace the file at `path` with `data`; blocking, for a worker thread.

    The temporary file is created with `mode` (re-applied, whatever the umask did) and,
    when given, `owner` and `group`, so that the content is never readable by anyone the
    target would not let read it, even for an instant.
    """
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temporary, flags, mode)
    try:
        try:
            os.fchmod(fd, mode)
            if owner is not None or group is not None:
                os.fchown(fd, -1 if owner is None else owner, -1 if group is None else group)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        temporary.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
