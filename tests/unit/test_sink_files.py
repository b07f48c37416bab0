"""File sinks: atomic writes with the configured mode and owner, one per credential
change, and a command run after each, one at a time, its output masked."""

from __future__ import annotations

import asyncio
import io
import json
import os
import stat
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.cache import Policy, Store
from broker.config import SinkConfig, WebServiceConfig
from broker.delivery import FileSinks, WriteRetry
from broker.delivery.file_sinks import (
    OUTPUT_KEPT_BYTES,
    OUTPUT_LOGGED_CHARS,
    CommandResult,
    loggable,
    render,
    run_command,
)
from broker.delivery.file_sinks import write_file as write_atomically
from broker.log import MASK, register_secret
from broker.models import AccessToken, AuthKind
from tests.conftest import logged
from tests.unit.fakes import FakeClock, FakeProvider

pytestmark = pytest.mark.timeout(10)

NOW = 1_000_000.0


def token(value: str) -> AccessToken:
    return AccessToken(value, AuthKind.TOKEN, NOW + 3600, NOW + 1800)


def service(sink: SinkConfig | None, name: str = "svc") -> WebServiceConfig:
    return WebServiceConfig(
        name=name,
        identity="main",
        subscription_id="sub",
        resource_group="rg",
        workspace="ws",
        web_service="web",
        sink=sink,
    )


class FakeRunner:
    """Stands in for run_command: records each run, and holds it until released."""

    def __init__(self) -> None:
        self.runs: list[tuple[str, Path, str]] = []  # service, sink path, file content at start
        self.release = asyncio.Event()
        self.release.set()
        self.started = asyncio.Event()
        self.output = b""

    async def __call__(self, service: str, sink: SinkConfig) -> CommandResult:
        self.runs.append((service, sink.path, sink.path.read_text()))
        self.started.set()
        await self.release.wait()
        return CommandResult(0, self.output)


@pytest.fixture
def provider() -> FakeProvider:
    return FakeProvider()


@pytest.fixture
def store(provider: FakeProvider) -> Store:
    return Store([provider], Policy(), FakeClock(NOW))


@pytest.fixture
def runner() -> FakeRunner:
    return FakeRunner()


async def fetched(store: Store, provider: FakeProvider, outcome: AccessToken | Exception) -> None:
    provider.outcomes.append(outcome)
    await asyncio.gather(store.fetch(provider.service), return_exceptions=True)


@pytest.fixture
def umask() -> Iterator[None]:
    """A permissive umask, so that a mode that is right is right despite it, not by it."""
    old = os.umask(0)
    yield
    os.umask(old)


# -- the write itself ----------------------------------------------------------------------


@pytest.mark.usefixtures("umask")
@pytest.mark.parametrize("mode", [0o600, 0o640, 0o400, 0o660])
def test_the_file_gets_exactly_the_configured_mode(tmp_path: Path, mode: int) -> None:
    """The file has the configured mode whatever the umask, and replaces a wider one."""
    path = tmp_path / "t"
    path.write_text("old")
    path.chmod(0o666)
    write_atomically(SinkConfig(path, mode=mode), b"new-credential")
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert path.read_bytes() == b"new-credential"
    assert [p.name for p in tmp_path.iterdir()] == ["t"]


def test_a_restrictive_umask_does_not_narrow_the_mode(tmp_path: Path) -> None:
    """A umask of 077 would make a group-readable file unreadable by its group: fchmod wins."""
    old = os.umask(0o077)
    try:
        write_atomically(SinkConfig(tmp_path / "t", mode=0o640), b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "t").stat().st_mode) == 0o640


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_owner_and_group_are_set_before_the_file_appears(tmp_path: Path) -> None:
    """As root, the file belongs to the configured uid and gid."""
    write_atomically(SinkConfig(tmp_path / "t", owner=4242, group=4343), b"x")
    facts = (tmp_path / "t").stat()
    assert (facts.st_uid, facts.st_gid) == (4242, 4343)
    write_atomically(SinkConfig(tmp_path / "g", group=4343), b"x")
    assert ((tmp_path / "g").stat().st_uid, (tmp_path / "g").stat().st_gid) == (0, 4343)


def test_a_missing_directory_raises_and_leaves_nothing(tmp_path: Path) -> None:
    """Writing into a directory that does not exist fails with the OS error, nothing left."""
    with pytest.raises(FileNotFoundError):
        write_atomically(SinkConfig(tmp_path / "absent" / "t"), b"x")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_rename_removes_the_temporary_file(tmp_path: Path) -> None:
    """When the target is a directory the rename fails; the temporary file is removed."""
    (tmp_path / "t").mkdir()
    with pytest.raises(IsADirectoryError):
        write_atomically(SinkConfig(tmp_path / "t"), b"x")
    assert [p.name for p in tmp_path.iterdir()] == ["t"]


def test_a_symlink_at_the_path_is_replaced_not_followed(tmp_path: Path) -> None:
    """A symlink planted at the sink path is replaced; the file it pointed to is untouched."""
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "t").symlink_to(victim)
    write_atomically(SinkConfig(tmp_path / "t"), b"cred")
    assert victim.read_text() == "keep"
    assert not (tmp_path / "t").is_symlink() and (tmp_path / "t").read_text() == "cred"


def test_a_reader_never_sees_a_partial_empty_or_mixed_file(tmp_path: Path) -> None:
    """A thread reading in a tight loop through 300 rewrites sees only whole credentials."""
    path = tmp_path / "t"
    values = [(chr(ord("a") + i % 26) * (100 + (i * 37) % 4000)).encode() for i in range(300)]
    write_atomically(SinkConfig(path), values[0])
    seen: list[bytes] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            seen.append(path.read_bytes())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for value in values[1:]:
            write_atomically(SinkConfig(path), value)
    finally:
        done.set()
        reader.join()
    whole = set(values)
    assert len(seen) > 10
    assert all(content in whole for content in seen)


# -- formats -------------------------------------------------------------------------------


async def test_each_format_renders_the_credential(store: Store, provider: FakeProvider) -> None:
    """token is the bare value, header the Bearer line, json the GET /v1/token body."""
    await fetched(store, provider, token("tok-value-1"))
    entry = store.entry("svc")
    path = Path("/t")
    assert render(SinkConfig(path), store, entry) == b"tok-value-1"
    assert render(SinkConfig(path, "header"), store, entry) == b"Bearer tok-value-1\n"
    body = json.loads(render(SinkConfig(path, "json"), store, entry))
    assert body == {
        "service": "svc",
        "token_type": "Bearer",
        "access_token": "tok-value-1",
        "expires_on": int(NOW + 3600),
        "refresh_by": int(store.refresh_by(entry) or 0),
        "auth": "token",
    }


# -- when it writes ------------------------------------------------------------------------


async def test_written_once_per_change_never_on_unchanged_or_failed_fetches(
    store: Store, provider: FakeProvider, runner: FakeRunner, tmp_path: Path
) -> None:
    """The same credential again, or a failed fetch, writes nothing and runs no command."""
    path = tmp_path / "t"
    sinks = FileSinks(store, [service(SinkConfig(path, command=("true",)))], runner)
    sinks.start()
    await fetched(store, provider, token("tok-1"))
    await sinks.idle()
    assert path.read_text() == "tok-1" and len(runner.runs) == 1
    first = path.stat().st_ino
    await fetched(store, provider, token("tok-1"))
    await fetched(store, provider, RuntimeError("boom"))
    await sinks.idle()
    assert path.stat().st_ino == first and len(runner.runs) == 1
    await fetched(store, provider, token("tok-2"))
    await sinks.idle()
    assert path.read_text() == "tok-2"
    assert [r[2] for r in runner.runs] == ["tok-1", "tok-2"]
    assert runner.runs[0][:2] == ("svc", path)


async def test_a_restored_credential_is_written_at_start(
    store: Store, runner: FakeRunner, tmp_path: Path
) -> None:
    """A credential in place before start (restored from the cache) is written at start."""
    store.restore("svc", token("restored-1"), NOW)
    sinks = FileSinks(store, [service(SinkConfig(tmp_path / "t"))], runner)
    sinks.start()
    await sinks.idle()
    assert (tmp_path / "t").read_text() == "restored-1"


async def test_nothing_is_written_before_a_credential_is_usable(
    store: Store, provider: FakeProvider, tmp_path: Path, runner: FakeRunner
) -> None:
    """No file appears while the first fetch fails, nor for an expired credential."""
    sinks = FileSinks(store, [service(SinkConfig(tmp_path / "t"))], runner)
    sinks.start()
    await fetched(store, provider, RuntimeError("down"))
    expired = AccessToken("expired-1", AuthKind.TOKEN, NOW - 10, NOW - 100)
    store.restore("svc", expired, NOW - 7200)
    await fetched(store, provider, RuntimeError("down"))
    await sinks.idle()
    assert not (tmp_path / "t").exists()


async def test_a_failed_write_is_logged_and_retried_at_the_next_fetch(
    store: Store, provider: FakeProvider, tmp_path: Path, runner: FakeRunner, logs: io.StringIO
) -> None:
    """A missing directory logs service, path and the OS error, never the credential;
    the next fetch writes it once the directory exists; no command ran for the failure."""
    path = tmp_path / "later" / "t"
    sinks = FileSinks(store, [service(SinkConfig(path, command=("true",)))], runner)
    sinks.start()
    await fetched(store, provider, token("tok-secret-1"))
    await sinks.idle()
    [failure] = logged(logs, "sink.write_failed")
    assert failure["service"] == "svc" and failure["path"] == str(path)
    assert failure["error"] == "No such file or directory" and "directory exists" in str(
        failure["fix"]
    )
    assert runner.runs == []
    (tmp_path / "later").mkdir()
    await fetched(store, provider, token("tok-secret-1"))  # unchanged, but not yet written
    await sinks.idle()
    assert path.read_text() == "tok-secret-1" and len(runner.runs) == 1
    assert "tok-secret-1" not in logs.getvalue()


@pytest.mark.usefixtures("every_repeat")
async def test_a_failed_write_is_retried_without_waiting_for_a_fetch(
    store: Store,
    provider: FakeProvider,
    tmp_path: Path,
    runner: FakeRunner,
    logs: io.StringIO,
) -> None:
    """A key may not change for days: a failed write is retried on a timer, with backoff,
    until it succeeds; then the retries stop."""
    loop = asyncio.get_running_loop()
    attempts: asyncio.Queue[bool] = asyncio.Queue()
    real = write_atomically

    def recorded(sink: SinkConfig, data: bytes) -> None:  # runs in a worker thread
        try:
            real(sink, data)
        except OSError:
            loop.call_soon_threadsafe(attempts.put_nowait, False)
            raise
        loop.call_soon_threadsafe(attempts.put_nowait, True)

    path = tmp_path / "later" / "t"
    sinks = FileSinks(
        store,
        [service(SinkConfig(path, command=("true",)))],
        runner,
        writer=recorded,
        retry=WriteRetry(first_s=0.01),
    )
    sinks.start()
    await fetched(store, provider, token("tok-1"))
    assert [await asyncio.wait_for(attempts.get(), 5) for _ in range(3)] == [False] * 3
    for _ in range(1000):  # the third failure's line follows its attempt on the loop
        if len(logged(logs, "sink.write_failed")) >= 3:
            break
        await asyncio.sleep(0)
    delays = [e["retry_in_s"] for e in logged(logs, "sink.write_failed")]
    assert delays[:3] == [0.01, 0.02, 0.04]
    (tmp_path / "later").mkdir()
    while not await asyncio.wait_for(attempts.get(), 5):
        pass  # a retry already under way may still fail
    await sinks.idle()
    assert path.read_text() == "tok-1" and len(runner.runs) == 1
    failed = len(logged(logs, "sink.write_failed"))
    await sinks.close(1.0)
    assert len(logged(logs, "sink.write_failed")) == failed


# -- the command ---------------------------------------------------------------------------


async def test_changes_during_a_command_run_it_once_more_after(
    store: Store, provider: FakeProvider, runner: FakeRunner, tmp_path: Path
) -> None:
    """Never two at once: three changes while a command runs make exactly one more run,
    which sees the latest file."""
    path = tmp_path / "t"
    sinks = FileSinks(store, [service(SinkConfig(path, command=("true",)))], runner)
    sinks.start()
    runner.release.clear()
    await fetched(store, provider, token("tok-1"))
    await asyncio.wait_for(runner.started.wait(), 5)
    for value in ("tok-2", "tok-3", "tok-4"):
        await fetched(store, provider, token(value))
    while path.read_text() != "tok-4":  # writes go on while the command runs
        await asyncio.wait(set(sinks._tasks), return_when=asyncio.FIRST_COMPLETED)
    assert len(runner.runs) == 1
    runner.release.set()
    await sinks.idle()
    assert [r[2] for r in runner.runs] == ["tok-1", "tok-4"]


async def test_command_output_is_logged_with_every_recent_credential_masked(
    store: Store, provider: FakeProvider, runner: FakeRunner, tmp_path: Path, logs: io.StringIO
) -> None:
    """A command echoing the current and the previous credential logs neither."""
    sinks = FileSinks(store, [service(SinkConfig(tmp_path / "t", command=("true",)))], runner)
    sinks.start()
    await fetched(store, provider, token("first-credential-1"))
    await sinks.idle()
    runner.output = b"reloaded with first-credential-1 and second-credential-2\n"
    await fetched(store, provider, token("second-credential-2"))
    await sinks.idle()
    finished = logged(logs, "sink.command_finished")
    assert finished[-1]["output"] == f"reloaded with {MASK} and {MASK}"
    assert finished[-1]["exit_status"] == 0
    assert "credential-1" not in logs.getvalue() and "credential-2" not in logs.getvalue()


# -- reloads and stopping ------------------------------------------------------------------


async def test_reload_moves_restarts_and_stops_sinks(
    store: Store, provider: FakeProvider, runner: FakeRunner, tmp_path: Path
) -> None:
    """A new path is written at once; a command-only change writes nothing; a sink
    removed stops, its file left in place."""
    first, second = tmp_path / "a", tmp_path / "b"
    sinks = FileSinks(store, [service(SinkConfig(first))], runner)
    sinks.start()
    await fetched(store, provider, token("tok-1"))
    await sinks.idle()
    sinks.update([service(SinkConfig(second, mode=0o640, command=("true",)))])
    await sinks.idle()
    assert second.read_text() == "tok-1" and stat.S_IMODE(second.stat().st_mode) == 0o640
    assert len(runner.runs) == 1
    inode = second.stat().st_ino
    sinks.update([service(SinkConfig(second, mode=0o640, command=("true", "other")))])
    await sinks.idle()
    assert second.stat().st_ino == inode and len(runner.runs) == 1
    sinks.update([service(None)])
    await fetched(store, provider, token("tok-2"))
    await sinks.idle()
    assert second.read_text() == "tok-1" and first.read_text() == "tok-1"
    assert len(runner.runs) == 1


async def test_close_cancels_a_command_past_the_grace_period(
    store: Store, provider: FakeProvider, runner: FakeRunner, tmp_path: Path
) -> None:
    """Stopping waits for a command at most the grace period, then cancels it."""
    sinks = FileSinks(store, [service(SinkConfig(tmp_path / "t", command=("true",)))], runner)
    sinks.start()
    runner.release.clear()
    await fetched(store, provider, token("tok-1"))
    await asyncio.wait_for(runner.started.wait(), 5)
    await asyncio.wait_for(sinks.close(0.05), 5)
    assert not sinks._tasks


# -- running a command for real ------------------------------------------------------------


def sink_running(tmp_path: Path, script: str, timeout_s: float = 5.0) -> SinkConfig:
    return SinkConfig(
        tmp_path / "t", command=(sys.executable, "-c", script), command_timeout_s=timeout_s
    )


async def test_the_command_gets_its_environment_and_no_stdin(tmp_path: Path) -> None:
    """The broker's environment plus TOKEN_BROKER_SERVICE and TOKEN_BROKER_SINK; stdin empty."""
    script = (
        "import os, sys; print(os.environ['TOKEN_BROKER_SERVICE'], "
        "os.environ['TOKEN_BROKER_SINK'], os.environ.get('PATH') is not None, "
        "repr(sys.stdin.read())); print('err', file=sys.stderr); sys.exit(3)"
    )
    result = await run_command("fraud", sink_running(tmp_path, script))
    assert result.status == 3 and not result.timed_out
    assert result.output.split() == [b"fraud", str(tmp_path / "t").encode(), b"True", b"''", b"err"]


async def test_the_command_never_inherits_a_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A variable holding the client secret (client_secret_env) or a token-shaped value is
    withheld from the command; the rest of the environment is passed."""
    secret = "sp-secret-" + "k" * 24
    register_secret(secret)
    monkeypatch.setenv("SP_SECRET", secret)
    monkeypatch.setenv("LEFTOVER_AUTH", "Bearer abc.def")
    monkeypatch.setenv("HARMLESS", "just-a-setting")
    script = "import os; print(sorted(os.environ))"
    result = await run_command("fraud", sink_running(tmp_path, script))
    names = result.output.decode()
    assert "'HARMLESS'" in names and "'TOKEN_BROKER_SERVICE'" in names
    assert "SP_SECRET" not in names and "LEFTOVER_AUTH" not in names


async def test_a_command_past_its_timeout_is_killed_with_its_children(tmp_path: Path) -> None:
    """A hanging command and the child it started are killed at the timeout."""
    script = (
        "import subprocess, sys; child = subprocess.Popen(['tail', '-f', '/dev/null']); "
        "print(child.pid, flush=True); child.wait()"
    )
    result = await asyncio.wait_for(run_command("svc", sink_running(tmp_path, script, 0.5)), 5)
    assert result.timed_out and result.status == -9
    child = int(result.output.split()[0])
    await asyncio.wait_for(exited(child), 5)


async def exited(pid: int) -> None:
    """Return when the process `pid` has ended (a pidfd turns readable; a zombie counts)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    ended = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(pidfd, ended.set)
    try:
        await ended.wait()
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


async def test_a_command_that_cannot_start_says_why(tmp_path: Path) -> None:
    """A program that vanished after the configuration was loaded is an error, not a crash."""
    sink = SinkConfig(tmp_path / "t", command=(str(tmp_path / "gone"),))
    result = await run_command("svc", sink)
    assert result.status is None and result.error == "No such file or directory"


async def test_endless_output_is_bounded(tmp_path: Path) -> None:
    """Output beyond what is kept is read and dropped, and marked cut."""
    script = "import sys; sys.stdout.write('word ' * 100000)"
    result = await run_command("svc", sink_running(tmp_path, script))
    assert result.status == 0 and result.cut and len(result.output) == OUTPUT_KEPT_BYTES


def test_output_cut_short_never_shows_part_of_a_credential() -> None:
    """A credential split by the cut is dropped with the rest of its word, then masked."""
    credential = "K" * 40
    kept = b"ok\n" + credential.encode()[:20]
    assert loggable(kept, True, [credential]) == "ok …(truncated)"
    assert loggable(credential.encode() + b" done", False, [credential]) == f"{MASK} done"
    long = loggable(b"x" * (OUTPUT_LOGGED_CHARS + 10), False, [])
    assert long.endswith(" …(truncated)") and len(long) == OUTPUT_LOGGED_CHARS + 13
