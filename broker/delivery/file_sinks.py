"""File sinks: a service's current credential copied to a file, and a command run after.

A sink writes when its service's credential changes (the entry's `generation`), never on
a fetch that brought the same credential, and once at start for a usable credential
(one restored from the persisted cache included). A reader of the file sees the old
credential or the new one, never part of either: the file is written beside the target
with its final mode and owner, synced, and renamed over it.

File I/O runs in a worker thread, one write at a time per sink, always of the latest
credential. A failed write is logged and retried (after 1 s, doubling up to a minute, and
at each new credential); it never stops serving. The command runs without a shell after
each successful write, one at a time per sink: changes arriving while it runs make it run
once more afterwards. Its output is logged with every credential masked.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from broker.cache import Entry, Rendered, Store
from broker.config import ServiceConfig, SinkConfig
from broker.files import write_atomically
from broker.latest_only import LatestOnly
from broker.log import MASK, get_logger, scrub
from broker.models import doubling

log = get_logger("broker.delivery.file_sinks")

OUTPUT_KEPT_BYTES = 65536  # of a command's output; the rest is read and dropped
OUTPUT_LOGGED_CHARS = 2000
_RECENT = 16  # credentials a sink remembers to mask in its command's output
_KILL_WAIT_S = 1.0  # after SIGKILL, how long a stray holder of the output pipe is waited for
RETRY_MIN_S = 1.0  # after a failed write, the first retry; doubling up to RETRY_MAX_S
RETRY_MAX_S = 60.0


@dataclass(frozen=True, slots=True)
class WriteRetry:
    """When a failed write is tried again: `first_s` after the first failure, doubling up
    to `most_s`."""

    first_s: float = RETRY_MIN_S
    most_s: float = RETRY_MAX_S

    def delay(self, failures: int) -> float:
        return doubling(failures, self.first_s, self.most_s)


def render(sink: SinkConfig, store: Store, entry: Entry) -> bytes:
    """What the sink's file holds for the entry's credential, by the sink's format: the
    bytes `GET /v1/token/{service}` answers (`json`, `header`), or the bare value."""
    rendered = Rendered(store, entry)
    if sink.format == "header":
        return rendered.header
    if sink.format == "json":
        return rendered.json
    return rendered.value


def write_file(sink: SinkConfig, data: bytes) -> None:
    """Replace the sink's file with `data`, with the sink's mode, owner and group from the
    first byte; blocking, for a worker thread."""
    write_atomically(sink.path, data, mode=sink.mode, owner=sink.owner, group=sink.group)


FileWriter = Callable[[SinkConfig, bytes], None]


@dataclass(frozen=True, slots=True)
class CommandResult:
    """How a sink command ended, and the start of what it printed (not yet masked)."""

    status: int | None  # exit status; negative: killed by that signal; None: never started
    output: bytes = b""  # stdout and stderr, interleaved, at most OUTPUT_KEPT_BYTES
    cut: bool = False  # whether more output was dropped
    timed_out: bool = False
    error: str | None = None  # why it could not start


async def run_command(service: str, sink: SinkConfig) -> CommandResult:
    """Run the sink's command once, with no shell and stdin closed; kill it at the timeout.

    Its environment is the broker's plus TOKEN_BROKER_SERVICE and TOKEN_BROKER_SINK, less
    every variable whose value holds a secret the broker knows (a client secret given by
    `client_secret_env`, a certificate password, anything secret-shaped): the credential
    is passed in neither, and neither is what the broker signs in with.
    """
    env = {name: value for name, value in os.environ.items() if scrub(value) == value}
    env |= {"TOKEN_BROKER_SERVICE": service, "TOKEN_BROKER_SINK": str(sink.path)}
    try:
        process = await asyncio.create_subprocess_exec(
            *sink.command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group, so a kill reaches its children
        )
    except OSError as exc:
        return CommandResult(None, error=exc.strerror or type(exc).__name__)
    assert process.stdout is not None
    reader = asyncio.ensure_future(_read_bounded(process.stdout))
    timed_out = False
    try:
        async with asyncio.timeout(sink.command_timeout_s):
            await process.wait()
            await asyncio.wait({reader})  # its children may still hold the pipe: same deadline
    except TimeoutError:
        timed_out = True
    except asyncio.CancelledError:  # the broker is stopping and the grace period is over
        _kill_group(process.pid)
        reader.cancel()
        raise
    if process.returncode is None or not reader.done():
        _kill_group(process.pid)
    await process.wait()
    if not reader.done():
        await asyncio.wait({reader}, timeout=_KILL_WAIT_S)  # a holder outside the group
        reader.cancel()
    kept, cut = (b"", True) if reader.cancelled() else reader.result()
    return CommandResult(process.returncode, kept, cut, timed_out)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def _read_bounded(stream: asyncio.StreamReader) -> tuple[bytes, bool]:
    """The first bytes of the stream, and whether more were dropped; reads it to its end."""
    kept = bytearray()
    cut = False
    while chunk := await stream.read(65536):
        room = OUTPUT_KEPT_BYTES - len(kept)
        kept += chunk[: max(room, 0)]
        cut = cut or len(chunk) > room
    return bytes(kept), cut


def loggable(output: bytes, cut: bool, credentials: Iterable[str]) -> str:
    """A command's output with every credential masked, shortened for a log line.

    A credential holds no whitespace, so output cut short is first cut back to its last
    whitespace: a credential split by the cut could not be recognised and masked.
    Masking comes before shortening for the same reason.
    """
    text = output.decode("utf-8", errors="replace")
    if cut:
        end = max(text.rfind(c) for c in " \t\r\n")
        text = text[: end + 1] if end >= 0 else ""
    for value in credentials:
        text = text.replace(value, MASK)
    text = scrub(text).strip()
    if cut or len(text) > OUTPUT_LOGGED_CHARS:
        text = text[:OUTPUT_LOGGED_CHARS] + " …(truncated)"
    return text


Runner = Callable[[str, SinkConfig], Awaitable[CommandResult]]


@dataclass(frozen=True, slots=True)
class Delivery:
    """What a sink has done so far, for a run that reports it (`token-broker once`)."""

    path: Path
    written: int | None  # the generation of the credential its file holds; None: none yet
    write_error: str | None  # why its latest write failed; None after a success
    command: CommandResult | None  # how its latest command ended; None: none has run


class _Sink:
    """One service's sink: its writes and its command, each one at a time."""

    def __init__(self, sinks: FileSinks, service: str, config: SinkConfig) -> None:
        self._sinks = sinks
        self.service = service
        self.config = config
        self.closed = False
        # (generation, what decides the file's bytes and access): a reload that moves the
        # file or changes its format or owner writes it again, an unchanged fetch never
        self._written: tuple[int, tuple[object, ...]] | None = None
        # the credentials this file held lately: a command's output may show any of them,
        # and the store forgets (unregisters) a credential once it is replaced
        self._recent: deque[str] = deque(maxlen=_RECENT)
        self._writes = LatestOnly(self._write_current, f"sink:{service}", sinks.spawn)
        self._commands = LatestOnly(self._run_command, f"sink-command:{service}", sinks.spawn)
        self._failures = 0  # consecutive failed writes
        self._retry: asyncio.TimerHandle | None = None
        self._write_error: str | None = None
        self._command: CommandResult | None = None

    @property
    def delivery(self) -> Delivery:
        written = None if self._written is None else self._written[0]
        return Delivery(self.config.path, written, self._write_error, self._command)

    def stop(self) -> None:
        """Start nothing new: no write, no command, no retry."""
        self.closed = True
        self._writes.stop()
        self._commands.stop()
        if self._retry is not None:
            self._retry.cancel()

    def write_latest(self) -> None:
        """Write the current credential, if it is new to this file, after any write under way."""
        self._writes.ask()

    async def _write_current(self) -> None:
        store = self._sinks.store
        if not store.has(self.service):
            return
        entry = store.entry(self.service)
        if entry.token is None or not store.usable(entry):
            return
        config = self.config
        written = (entry.generation, _file_facts(config))
        if written == self._written:
            return
        value = entry.token.value
        started = store.clock()
        try:
            await asyncio.to_thread(self._sinks.writer, config, render(config, store, entry))
        except OSError as exc:
            self._write_failed(config, exc)
            return
        self._failures = 0
        self._write_error = None
        if self._retry is not None:
            self._retry.cancel()
        self._written = written
        self._recent.append(value)
        log.info(
            "sink.written",
            service=self.service,
            path=str(config.path),
            format=config.format,
            duration_ms=round((store.clock() - started) * 1000, 1),
        )
        if config.command:
            self._commands.ask()

    def _write_failed(self, config: SinkConfig, exc: OSError) -> None:
        delay = self._sinks.retry.delay(self._failures)
        self._failures += 1
        self._write_error = exc.strerror or type(exc).__name__
        log.warning(
            "sink.write_failed",
            service=self.service,
            path=str(config.path),
            error=exc.strerror or type(exc).__name__,
            errno=exc.errno,
            retry_in_s=delay,
            fix="make sure the directory exists and the broker's user may create files in it "
            "(and may chown them to the configured owner and group); it is retried, and the "
            "credential is still served",
        )
        if self._retry is not None:
            self._retry.cancel()
        if not self.closed:
            self._retry = asyncio.get_running_loop().call_later(delay, self.write_latest)

    async def _run_command(self) -> None:
        config = self.config
        result = await self._sinks.runner(self.service, config)
        self._command = result
        self._log_result(config, result)

    def _log_result(self, config: SinkConfig, result: CommandResult) -> None:
        output = loggable(result.output, result.cut, self._recent)
        context = {"service": self.service, "path": str(config.path), "output": output}
        if result.error is not None:
            log.warning(
                "sink.command_not_started",
                program=config.command[0],
                error=result.error,
                fix="check the program's path and that the broker's user may run it",
                **context,
            )
        elif result.timed_out:
            log.warning(
                "sink.command_timed_out",
                timeout_s=config.command_timeout_s,
                exit_status=result.status,
                **context,
            )
        elif result.status != 0:
            log.warning("sink.command_failed", exit_status=result.status, **context)
        else:
            log.info("sink.command_finished", exit_status=result.status, **context)


def _file_facts(config: SinkConfig) -> tuple[object, ...]:
    return (config.path, config.format, config.mode, config.owner, config.group)


class FileSinks:
    """Every service's file sink, kept in step with the store and the configuration."""

    def __init__(
        self,
        store: Store,
        services: Iterable[ServiceConfig],
        runner: Runner = run_command,
        *,
        writer: FileWriter = write_file,
        retry: WriteRetry = WriteRetry(),
    ) -> None:
        self.store = store
        self.runner = runner
        self.writer = writer
        self.retry = retry
        self._sinks: dict[str, _Sink] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self._configure(services)
        store.on_result(self._on_result)

    def start(self) -> None:
        """Write every usable credential (restored ones included); then follow changes."""
        self._started = True
        for sink in self._sinks.values():
            sink.write_latest()

    def update(self, services: Iterable[ServiceConfig]) -> None:
        """Apply a reloaded configuration: new sinks start, removed ones stop (their files
        stay), changed ones write again where and how they are now configured."""
        self._configure(services)
        if self._started:
            for sink in self._sinks.values():
                sink.write_latest()

    def _configure(self, services: Iterable[ServiceConfig]) -> None:
        wanted = {s.name: s.sink for s in services if s.sink is not None}
        for name in [n for n in self._sinks if n not in wanted]:
            self._sinks.pop(name).stop()
            log.info("sink.stopped", service=name, note="the file is left in place")
        for name, config in wanted.items():
            sink = self._sinks.get(name)
            if sink is None:
                self._sinks[name] = _Sink(self, name, config)
            elif sink.config != config:
                sink.config = config

    def _on_result(self, entry: Entry) -> None:
        sink = self._sinks.get(entry.service)
        if sink is not None and self._started:
            sink.write_latest()

    def delivery(self, service: str) -> Delivery | None:
        """What the service's sink has written and run so far; None when it has no sink."""
        sink = self._sinks.get(service)
        return None if sink is None else sink.delivery

    def spawn(self, work: Awaitable[None], name: str) -> asyncio.Task[None]:
        task = asyncio.ensure_future(work)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("sink.crashed", task=task.get_name(), error=repr(task.exception()))

    async def idle(self) -> None:
        """Return once no write or command is under way or due."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    async def close(self, grace_s: float) -> None:
        """Start nothing new; let writes and commands under way end within `grace_s`, then
        cancel them (a cancelled command is killed)."""
        for sink in self._sinks.values():
            sink.stop()
        if not self._tasks:
            return
        _, late = await asyncio.wait(set(self._tasks), timeout=grace_s)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
