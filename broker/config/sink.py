"""A service's `[service.sink]` table: a file its credential is copied to, and a command.

    [[service]]
    name = "fraud"
    # …
    [service.sink]
    path = "/run/app/fraud.token"
    format = "token"          # token | header | json
    mode = "0640"
    group = "app"
    command = ["/usr/bin/systemctl", "reload", "app"]

Users and groups are resolved, and the command's program found, once at load time.
Conflicts between files (two sinks, the socket, the persisted cache, a secret or other
file the broker reads) need the whole configuration and are checked by `sink_conflicts`
once every section is read.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import cast

from broker.config.client_access import owner_or_group
from broker.config.model import CacheConfig, ListenConfig, ServiceConfig, SinkConfig, SinkFormat
from broker.config.reader import Problems, Table, dotted, kind_of, permission_mode, quote

SINK_KEYS = tuple(f.name for f in fields(SinkConfig))
FORMATS = ("token", "header", "json")


def service_sink(table: Table, environ: Mapping[str, str]) -> SinkConfig | None:
    """The `sink` sub-table of a `[[service]]`; None when absent or wrong (with problems)."""
    if not table.has("sink"):
        return None
    sink = table.table("sink")
    if not isinstance(table.data.get("sink"), dict):
        return None
    sink.known(*SINK_KEYS)
    before = len(sink.problems.items)
    path = _path(sink)
    form = cast(SinkFormat, sink.choice("format", FORMATS, "token", "sink format"))
    mode = permission_mode(
        sink,
        cast(int, SinkConfig.__dataclass_fields__["mode"].default),
        example="0640",
        others=lambda mode: (
            "lets every user on this machine "
            f"{'write' if mode & 0o002 and not mode & 0o004 else 'read'} the file, "
            "which holds a live credential"
        ),
        execute="which mean nothing on a credential file",
        fix='use read and write bits for the owner and, if needed, the group: "0600" or "0640"',
    )
    owner = owner_or_group(sink, "owner")
    group = owner_or_group(sink, "group")
    command = _command(sink, environ)
    timeout = _timeout(sink)
    if path is None or len(sink.problems.items) > before:
        return None
    return SinkConfig(path, form, mode, owner, group, command, timeout)


def _path(table: Table) -> Path | None:
    value = table.required_text("path", "the absolute path of the file to write")
    if not value:
        return None
    path = Path(value)
    if "\0" in value or not path.is_absolute():
        table.problem(
            "path",
            f"sink path {quote(value)} is not an absolute path",
            'write the whole path, like "/run/app/fraud.token"',
        )
        return None
    if path.is_dir() or value.endswith("/"):
        table.problem(
            "path",
            f"{value} is a directory",
            'give the path of the file itself, like "/run/app/fraud.token"',
        )
        return None
    return path


def _command(table: Table, environ: Mapping[str, str]) -> tuple[str, ...]:
    if not table.has("command"):
        return ()
    example = '["/usr/bin/systemctl", "reload", "app"]'
    argv = table.array("command", example)
    if not isinstance(table.data["command"], list):
        return ()  # reported by array()
    if not argv:
        table.problem(
            "command",
            "command is an empty array",
            f"give the program and its arguments, like {example}, or remove command",
        )
        return ()
    for index, arg in enumerate(argv):
        if not isinstance(arg, str) or "\0" in arg:
            table.problem(
                ("command", index),
                f"expected a string, got {kind_of(arg)}",
                f"write every argument in quotes: command = {example} (no shell is used)",
            )
            return ()
    words = tuple(cast(Sequence[str], argv))
    _program(table, words[0], environ)
    return words


def _program(table: Table, program: str, environ: Mapping[str, str]) -> None:
    """Report a program the broker could not run: missing, or not executable."""
    if not program:
        table.problem(
            ("command", 0),
            "the program to run is an empty string",
            'give its path, like "/usr/bin/systemctl"',
        )
    elif "/" in program:
        if not (Path(program).is_file() and os.access(program, os.X_OK)):
            table.problem(
                ("command", 0),
                f"{program} is not an executable file",
                "fix the path, or make the file executable by the broker's user",
            )
    elif " " in program:
        table.problem(
            ("command", 0),
            f"the program name {quote(program)} contains a space",
            'no shell is used: give each argument as its own string, like ["kill", "-HUP", "1"]',
        )
    elif shutil.which(program, path=environ.get("PATH", os.defpath)) is None:
        table.problem(
            ("command", 0),
            f"no program named {quote(program)} on the broker's PATH",
            "give the program's absolute path, like /usr/bin/systemctl",
        )


def _timeout(table: Table) -> float:
    default = cast(float, SinkConfig.__dataclass_fields__["command_timeout_s"].default)
    value = table.number("command_timeout_s", default)
    if value <= 0:
        table.problem(
            "command_timeout_s",
            f"command_timeout_s must be more than zero, got {value:g}",
            f"use a number of seconds, or remove it for the default ({default:g})",
        )
        return default
    return value


def sink_conflicts(
    problems: Problems,
    services: Sequence[ServiceConfig],
    listen: ListenConfig,
    cache: CacheConfig,
    config_file: Path,
) -> None:
    """Report sinks that would overwrite each other, or a file the broker itself uses.

    Those are the socket, the cache, the configuration file and every file it names for
    the broker to read (`problems.files_read`: secrets, keys, certificates, the CA
    bundle). Paths are compared by name and after resolving symbolic links, so neither
    a second spelling nor a link leads a sink onto one of them.
    """
    reserved = {config_file: "the configuration file itself"}
    if listen.unix.enabled:
        reserved[listen.unix.path] = "the Unix socket ([listen.unix] path)"
    if cache.enabled:
        reserved[cache.path] = "the persisted cache ([cache] path)"
    for read, key in problems.files_read.items():
        reserved.setdefault(read, f"{read}, which the broker reads as {dotted(key)}")
    used = {name: what for path, what in reserved.items() for name in _names(path)}
    first_use: dict[Path, int] = {}
    for index, service in enumerate(services):
        if service.sink is None:
            continue
        names = _names(service.sink.path)
        where = ("service", index, "sink", "path")
        if taken := next((used[name] for name in names if name in used), None):
            problems.add(
                where,
                f"the sink of {quote(service.name)} would overwrite {taken}",
                "give the sink a path of its own",
            )
        elif (earlier := next((first_use[n] for n in names if n in first_use), None)) is not None:
            problems.add(
                where,
                f"service[{earlier + 1}] already writes its sink to {names[0]}",
                "give each service's sink a path of its own: each file holds one credential",
            )
        else:
            first_use.update(dict.fromkeys(names, index))


def _names(path: Path) -> tuple[Path, ...]:
    """The path with `.` and `..` resolved by name, and with symbolic links resolved too."""
    try:
        return (_normal(path), Path(os.path.realpath(path)))
    except (OSError, ValueError):  # a NUL in a path named by a key already reported
        return (_normal(path),)


def _normal(path: Path) -> Path:
    """The path with `.` and `..` resolved by name (the files may not exist yet)."""
    return Path(os.path.normpath(path.absolute()))
