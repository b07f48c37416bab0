"""How the configuration is read: typed look-ups that collect problems instead of raising.

`broker.config.schema` says which keys exist and what they mean; this module says how a
value is read, where in the file it was written, and how to tell the operator it is wrong.
Every look-up records a `ConfigProblem` and returns a harmless default, so that one run
reports every mistake in the file at once.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import stat
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from broker.errors import ConfigProblem

KeyPath = tuple[str | int, ...]  # ("service", 0, "auth"): array indices are 0-based here

_KEY_PART = re.compile(r"""\s*(?:([A-Za-z0-9_-]+)|"((?:[^"\\]|\\.)*)"|'([^']*)')\s*""")
_TYPES: Mapping[str, tuple[type, ...]] = {
    "a string": (str,),
    "a boolean": (bool,),
    "an integer": (int,),
    "a number": (int, float),
    "a table": (dict,),
}


def dotted(path: KeyPath) -> str:
    """`("service", 1, "auth")` as operators count it: `service[2].auth`."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part + 1}]"
        else:
            text += f".{part}" if text else part
    return text


def quote(value: str) -> str:
    """A string as a TOML basic string, safe to show on one line.

    A JSON string is a TOML basic string, except that TOML also escapes DEL.
    """
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def kind_of(value: object, *, show: bool = True) -> str:
    """What a TOML value is, for "expected X, got Y" messages; `show=False` hides the value."""
    if not show:
        return kind_of(value).split(" (", 1)[0]
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({quote(value if len(value) <= 40 else value[:37] + '...')})"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return "a date or time"


def closest(word: str, choices: Collection[str]) -> str | None:
    """The choice `word` was most likely meant to be, ignoring case, if any is close."""
    by_lower = {choice.lower(): choice for choice in choices}
    found = difflib.get_close_matches(word.lower(), list(by_lower), n=1)
    return by_lower[found[0]] if found else None


class LineIndex:
    """Where each key and table header first appears in the raw TOML text.

    A best-effort scanner, not a parser: it follows `[table]` and `[[array]]` headers and
    `key =` lines, which is what operators write; keys it cannot place (inside inline
    tables, say) get the line of the nearest enclosing key or header it did find.
    """

    def __init__(self, text: str) -> None:
        self._lines: dict[KeyPath, int] = {}
        self._arrays: dict[KeyPath, int] = {}
        table: KeyPath = ()
        in_multiline_string = False
        for number, line in enumerate(text.splitlines(), start=1):
            delimiters = line.count('"""') + line.count("'''")
            if in_multiline_string:
                in_multiline_string = delimiters % 2 == 0
                continue
            in_multiline_string = delimiters % 2 == 1
            table = self._scan(line.lstrip(), number, table)

    def _scan(self, line: str, number: int, table: KeyPath) -> KeyPath:
        if line.startswith("[["):
            parsed = _key_parts(line, 2)
            if parsed is None or not line.startswith("]]", parsed[1]):
                return table
            base = (*self._resolve(parsed[0][:-1]), parsed[0][-1])
            self._arrays[base] = self._arrays.get(base, -1) + 1
            table = (*base, self._arrays[base])
        elif line.startswith("["):
            parsed = _key_parts(line, 1)
            if parsed is None or not line.startswith("]", parsed[1]):
                return table
            table = self._resolve(parsed[0])
        else:
            parsed = _key_parts(line, 0)
            if parsed is None or not line.startswith("=", parsed[1]):
                return table
            self._note((*table, *parsed[0]), number)
            return table
        self._note(table, number)
        return table

    def _note(self, path: KeyPath, number: int) -> None:
        # [listen.unix] also places [listen], which may never get a header of its own
        for end in range(1, len(path) + 1):
            self._lines.setdefault(path[:end], number)

    def _resolve(self, parts: list[str]) -> KeyPath:
        path: list[str | int] = []
        for part in parts:
            path.append(part)
            index = self._arrays.get(tuple(path))
            if index is not None:
                path.append(index)
        return tuple(path)

    def line_of(self, path: KeyPath) -> int | None:
        """The line of `path`, or of its nearest enclosing key or table that was found."""
        for end in range(len(path), 0, -1):
            if path[:end] in self._lines:
                return self._lines[path[:end]]
        return None


def _key_parts(line: str, pos: int) -> tuple[list[str], int] | None:
    parts: list[str] = []
    while match := _KEY_PART.match(line, pos):
        bare, basic, literal = match.groups()
        parts.append(bare if bare is not None else basic if basic is not None else literal)
        pos = match.end()
        if not line.startswith(".", pos):
            return parts, pos
        pos += 1
    return None


class Problems:
    """Every problem found in one file, each placed at its key and line.

    It also keeps `files_read`: every file a key names for the broker to read (a secret,
    a key, a certificate, a CA bundle), by path, with that key, so that nothing the
    broker writes may be pointed at one of them.
    """

    def __init__(self, file: str) -> None:
        self.file = file
        self.lines: LineIndex | None = None
        self.items: list[ConfigProblem] = []
        self.files_read: dict[Path, KeyPath] = {}

    def add(self, path: KeyPath, message: str, fix: str, *, line: int | None = None) -> None:
        if line is None and self.lines is not None:
            line = self.lines.line_of(path)
        self.items.append(ConfigProblem(self.file, dotted(path), message, fix, line))

    def in_file_order(self) -> list[ConfigProblem]:
        return sorted(self.items, key=lambda p: (p.line is None, p.line or 0))


class Unreadable(Exception):
    """A file named by the configuration cannot be read; `message` is safe to show."""

    def __init__(self, path: Path, reason: str, *, missing: bool = False) -> None:
        super().__init__(f"cannot read {path}: {reason}")
        self.message = f"cannot read {path}: {reason}"
        self.missing = missing


def read_file(path: Path) -> bytes:
    """The bytes of the regular file at `path`, or `Unreadable` saying why not."""
    try:
        # stat first: opening a FIFO or a device could block the loader forever
        if not stat.S_ISREG(path.stat().st_mode):
            raise Unreadable(path, "not a regular file")
        return path.read_bytes()
    except OSError as exc:
        missing = isinstance(exc, FileNotFoundError)
        raise Unreadable(path, exc.strerror or type(exc).__name__, missing=missing) from exc
    except ValueError as exc:  # a NUL character in the path
        raise Unreadable(path, "the path is not valid") from exc


def permission_bits(path: Path) -> int:
    """The permission bits of the file at `path`; 0o777, the worst, when it cannot be seen."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except (OSError, ValueError):
        return 0o777


def read_text(path: Path) -> str:
    """The UTF-8 text of the file at `path`; the reason never quotes the content."""
    try:
        return read_file(path).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Unreadable(path, "not UTF-8 text") from exc


def systemd_credential(
    table: Table, key: str, name: str, environ: Mapping[str, str], *, holds: str, file_key: str
) -> Path | None:
    """Where systemd put the credential `name` (LoadCredential=), read for `key`; None,
    with a problem, when it is not a bare name or systemd gave no credentials directory.
    `holds` names what the file is (in the fix's example path), `file_key` the key to use
    instead when the broker does not run under systemd."""
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if name in (".", "..") or "/" in name:
        table.problem(
            key,
            f"{key} must be a credential name, not a path",
            f"use the NAME of LoadCredential=NAME:/path, or {file_key} for a path",
        )
    elif name and not directory:
        table.problem(
            key,
            f"{key} needs $CREDENTIALS_DIRECTORY, which is not set",
            f"run the broker as a systemd service with LoadCredential={name}:/path/to/{holds}, "
            f"or use {file_key}",
        )
    elif name and directory:
        return Path(directory) / name
    return None


@dataclass(frozen=True, slots=True)
class Sources:
    """Where relative paths and environment variables named by the file are resolved."""

    base: Path  # the configuration file's directory
    environ: Mapping[str, str]
    file: Path  # the configuration file itself
    file_mode: int  # its permission bits, which decide whether it may hold a secret


class Table:
    """One TOML table being read; its look-ups record problems and return defaults."""

    def __init__(self, data: Mapping[str, object], path: KeyPath, problems: Problems) -> None:
        self.data = data
        self.path = path
        self.problems = problems

    @property
    def where(self) -> str:
        """How the operator finds this table in the file."""
        if self.path and isinstance(self.path[-1], int):
            return f"[[{dotted(self.path[:-1])}]] number {self.path[-1] + 1}"
        return f"[{dotted(self.path)}]" if self.path else "the top of the file"

    def problem(self, key: str | KeyPath | None, message: str, fix: str) -> None:
        """Record a problem at `key`, or at an element such as `("allow_users", 2)`."""
        below = () if key is None else (key,) if isinstance(key, str) else key
        self.problems.add((*self.path, *below), message, fix)

    def has(self, key: str) -> bool:
        return key in self.data

    def known(self, *keys: str, hints: Mapping[str, str] | None = None) -> None:
        """Report every key of the table that is not one of `keys`."""
        for key in self.data:
            if key in keys:
                continue
            fix = (hints or {}).get(key)
            if fix is None:
                near = closest(key, keys)
                guess = f' (did you mean "{near}"?)' if near else ""
                fix = f"remove it, or check the spelling{guess}; known keys here: {', '.join(keys)}"
            self.problem(key, f"unknown key {quote(key)}", fix)

    def typed(self, key: str, expected: str) -> object | None:
        """The value of `key` if it has the `expected` type; None when absent or wrong."""
        if key not in self.data:
            return None
        value = self.data[key]
        kinds = _TYPES[expected]
        wrong_bool = isinstance(value, bool) and bool not in kinds
        if isinstance(value, kinds) and not wrong_bool:
            return value
        self.problem(
            key, f"expected {expected}, got {kind_of(value)}", _type_fix(key, expected, value)
        )
        return None

    def array(self, key: str, example: str) -> list[object]:
        """The elements of the array `key`; [] when absent, or wrong (with a problem)."""
        value = self.data.get(key, [])
        if isinstance(value, list):
            return value
        self.problem(key, f"expected an array, got {kind_of(value)}", f"write {key} = {example}")
        return []

    def table(self, key: str) -> Table:
        value = self.typed(key, "a table")
        return Table(value if isinstance(value, dict) else {}, (*self.path, key), self.problems)

    def tables(self, fix: str) -> list[tuple[str, Table]]:
        """Every sub-table, by name; other values are reported with `fix`."""
        found: list[tuple[str, Table]] = []
        for key, value in self.data.items():
            if isinstance(value, dict):
                found.append((key, Table(value, (*self.path, key), self.problems)))
            else:
                self.problem(key, f"expected a table, got {kind_of(value)}", fix)
        return found

    def array_of_tables(self, key: str, fix: str) -> list[Table]:
        value = self.data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            self.problem(key, f"expected [[{key}]] tables, got {kind_of(value)}", fix)
            return []
        return [Table(item, (*self.path, key, i), self.problems) for i, item in enumerate(value)]

    def flag(self, key: str, default: bool) -> bool:
        value = self.typed(key, "a boolean")
        return value if isinstance(value, bool) else default

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self.typed(key, "an integer")
        if not isinstance(value, int):
            return default
        if not low <= value <= high:
            self.problem(
                key,
                f"{key} must be from {low} to {high}, got {value}",
                f"use a value in {low}..{high}",
            )
            return default
        return value

    def number(self, key: str, default: float) -> float:
        value = self.typed(key, "a number")
        if not isinstance(value, int | float):
            return default
        if not math.isfinite(value):
            self.problem(
                key,
                f"{key} must be a finite number, got {value}",
                f"write a number of seconds, e.g. {key} = {default:g}",
            )
            return default
        return float(value)

    def positive(
        self, key: str, default: float, unit: str = "seconds", *, zero: bool = False
    ) -> float:
        """A number more than zero (zero too, with `zero`) of `unit`; anything else is a
        problem, and the default stands in for it."""
        value = self.number(key, default)
        if value < 0 or (value == 0 and not zero):
            least = "zero or more" if zero else "more than zero"
            self.problem(
                key,
                f"{key} must be {least}, got {value:g}",
                f"use a positive number of {unit}, or remove it for the default ({default:g})",
            )
            return default
        return value

    def text(self, key: str, default: str) -> str:
        value = self.typed(key, "a string")
        return value if isinstance(value, str) else default

    def optional_text(self, key: str) -> str | None:
        value = self.typed(key, "a string")
        return value if isinstance(value, str) else None

    def required_text(self, key: str, meaning: str) -> str:
        """A non-empty string; "" (with a problem recorded) when it is missing or empty."""
        value = self.typed(key, "a string")
        if key not in self.data:
            self.problem(
                key,
                f"missing required key {quote(key)} ({meaning})",
                f'add {key} = "…" under {self.where}',
            )
        elif isinstance(value, str) and not value.strip():
            self.problem(key, f"{key} is empty", f"give {key} its value: {meaning}")
        return value.strip() if isinstance(value, str) else ""

    def choice(self, key: str, choices: Collection[str], default: str, what: str = "") -> str:
        """One of `choices`; `what` names the setting in messages (default: the key)."""
        value = self.typed(key, "a string")
        if not isinstance(value, str):
            return default
        if value not in choices:
            near = closest(value, choices)
            guess = f' (did you mean "{near}"?)' if near else ""
            self.problem(
                key,
                f"{quote(value)} is not a known {what or key}",
                f"use one of: {', '.join(choices)}{guess}",
            )
            return default
        return value

    def file_path(self, key: str, base: Path, default: Path | None = None) -> Path | None:
        """A path, relative ones taken from the configuration file's directory."""
        value = self.typed(key, "a string")
        if not isinstance(value, str):
            return default
        if not value:
            self.problem(key, f"{key} is empty", f"give the path of a file, or remove {key}")
            return default
        return base / value

    def readable(self, key: str | KeyPath, path: Path) -> bytes | None:
        """The content of the file `key` (or an element of it) names; None, with a problem,
        when it is unreadable."""
        below = (key,) if isinstance(key, str) else key
        self.problems.files_read.setdefault(path, (*self.path, *below))
        try:
            return read_file(path)
        except Unreadable as exc:
            self.problem(key, exc.message, "make it readable by the broker's user, or fix the path")
            return None


def _type_fix(key: str, expected: str, value: object) -> str:
    if isinstance(value, str) and expected in ("an integer", "a number") and _is_number(value):
        return f"write {key} = {value.strip()} without quotes"
    if isinstance(value, str) and expected == "a boolean" and value.lower() in ("true", "false"):
        return f"write {key} = {value.lower()} without quotes"
    if expected == "a string" and isinstance(value, bool | int | float):
        shown = str(value).lower() if isinstance(value, bool) else str(value)
        return f"write {key} = {quote(shown)} with quotes"
    if expected == "a table":
        return f"write {key} as a [table] of keys, or remove it"
    return f"give {key} {expected}"


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


_OCTAL_MODE = re.compile(r"(0o)?[0-7]{1,4}")


def permission_mode(
    table: Table,
    default: int,
    *,
    example: str,
    others: Callable[[int], str],
    execute: str,
    fix: str,
) -> int:
    """The table's `mode`, written "0640" or 0o640, or `default` when it is absent or
    refused. Refused: anything not a plain permission mode, a mode giving other users any
    access (`others(mode)` says what that would let them do) or setting execute bits
    (`execute` says why that is wrong here); `fix` and `example` say what to write."""
    raw = table.data.get("mode")
    if raw is None:
        return default
    if isinstance(raw, str) and _OCTAL_MODE.fullmatch(raw):
        mode = int(raw.removeprefix("0o"), 8)
    elif isinstance(raw, int) and not isinstance(raw, bool):
        mode = raw
    else:
        table.problem(
            "mode",
            f'expected an octal permission mode such as "{example}", got {kind_of(raw)}',
            f'write mode = "{example}" (octal digits in quotes) or mode = 0o{example[1:]}',
        )
        return default
    if not 0 <= mode <= 0o777 and isinstance(raw, int):
        problem = (
            f"mode = {raw} is not a permission mode: TOML reads it as the decimal {raw} "
            f'(write octal as "{example}" or 0o{example[1:]})'
        )
    elif not 0 <= mode <= 0o777:
        problem = f"{quote(str(raw))} is not a permission mode (no setuid, setgid or sticky bits)"
    elif mode & 0o007:
        problem = f"mode {mode:04o} {others(mode)}"
    elif mode & 0o111:
        problem = f"mode {mode:04o} sets execute bits, {execute}"
    else:
        return mode
    table.problem("mode", problem, fix)
    return default
