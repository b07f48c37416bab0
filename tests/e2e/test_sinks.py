"""File sinks against a real broker and the emulator: the file holds the served credential,
is replaced whole on each change, and its command runs after each change, never leaking."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import stat
import sys
import threading
from pathlib import Path

import pytest

from broker.config import load_config
from broker.daemon import Daemon
from broker.emulator import Emulator
from broker.emulator import seed as demo
from broker.log import MASK
from tests.conftest import config_text
from tests.e2e.conftest import Broker, StartBroker

pytestmark = pytest.mark.timeout(30)

FRAUD = {"fraud": demo.TOKEN_SERVICE}
CHURN = {"churn": demo.KEY_SERVICE}

# Appends what the command saw to the file named by argv[1]: its environment, the digest
# of the sink file (never the credential), and whether stdin was empty. With argv[2], the
# first run waits for a writer on that FIFO before it ends.
RECORDER = """\
import hashlib, json, os, pathlib, sys
record = pathlib.Path(sys.argv[1])
first = not record.exists()
sink = os.environ["TOKEN_BROKER_SINK"]
seen = {
    "service": os.environ["TOKEN_BROKER_SERVICE"],
    "sink": sink,
    "digest": hashlib.sha256(pathlib.Path(sink).read_bytes()).hexdigest(),
    "stdin": sys.stdin.read(),
}
with record.open("a") as out:
    out.write(json.dumps(seen) + "\\n")
if first and len(sys.argv) > 2:
    open(sys.argv[2]).read()
"""


def with_sinks(emulator: Emulator, short_dir: Path, sinks: dict[str, tuple[str, str]]) -> str:
    """A configuration serving `sinks`' services, each followed by its [service.sink] lines."""
    services = {name: web_service for name, (web_service, _) in sinks.items()}
    text = config_text(emulator, short_dir, services=services, refresh="retry_min_s = 0.05")
    head, *blocks = text.split("\n[[service]]\n")
    text = head
    for block, (_, lines) in zip(blocks, sinks.values(), strict=True):
        text += "\n[[service]]\n" + block + "\n[service.sink]\n" + lines
    return text


def recorder(record: Path, *extra: str) -> str:
    argv = [sys.executable, "-c", RECORDER, str(record), *extra]
    return f"command = {json.dumps(argv)}\n"


def records(record: Path) -> list[dict[str, str]]:
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text().splitlines()]


def log_events(logs: io.StringIO, name: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in logs.getvalue().splitlines()]
    return [line for line in lines if line["event"] == name]


async def settled(broker: Broker) -> None:
    await broker.settled()
    await asyncio.wait_for(broker.daemon.sinks.idle(), 20)


async def holds(path: Path, value: str) -> None:
    """Return once the file holds `value`; each read is in a thread, so the loop runs on."""
    while await asyncio.to_thread(path.read_text) != value:
        pass


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize("form", ["token", "header", "json"])
async def test_the_file_holds_what_the_api_serves_with_the_configured_mode(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, form: str
) -> None:
    """Each format holds exactly what GET /v1/token/{service} answers, with mode 0640."""
    path = short_dir / "fraud.cred"
    lines = f'path = "{path}"\nformat = "{form}"\nmode = "0640"\n'
    broker = await start_broker(with_sinks(emulator, short_dir, {"fraud": (FRAUD["fraud"], lines)}))
    await settled(broker)
    client = broker.client()
    served = await client.get("/v1/token/fraud")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    if form == "token":
        assert path.read_text() == served.json()["access_token"]
    elif form == "header":
        assert path.read_text() == (await client.get("/v1/token/fraud?format=header")).text
    else:
        assert json.loads(path.read_text()) == served.json()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
async def test_the_file_belongs_to_the_configured_owner_and_group(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path
) -> None:
    """As root, owner and group (numeric here, so they need not exist) are set on the file."""
    path = short_dir / "fraud.cred"
    lines = f'path = "{path}"\nowner = 4242\ngroup = 4343\n'
    broker = await start_broker(with_sinks(emulator, short_dir, {"fraud": (FRAUD["fraud"], lines)}))
    await settled(broker)
    facts = path.stat()
    assert (facts.st_uid, facts.st_gid, stat.S_IMODE(facts.st_mode)) == (4242, 4343, 0o600)


async def test_rewritten_on_refresh_and_the_command_runs_after_each_change(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path
) -> None:
    """A refreshed token is written and the command runs again with its environment."""
    emulator.state.set_token_lifetime(4.0, refresh_after_s=2.0)
    path, record = short_dir / "fraud.token", short_dir / "record"
    lines = f'path = "{path}"\n' + recorder(record)
    broker = await start_broker(with_sinks(emulator, short_dir, {"fraud": (FRAUD["fraud"], lines)}))
    await settled(broker)
    first = path.read_text()
    entry = await broker.next_result("fraud")  # the refresher's, before refreshAfter
    await asyncio.wait_for(broker.daemon.sinks.idle(), 20)
    assert entry.token is not None and path.read_text() == entry.token.value != first
    seen = records(record)
    assert [r["digest"] for r in seen] == [digest(first), digest(entry.token.value)]
    assert all(r["service"] == "fraud" and r["sink"] == str(path) for r in seen)
    assert all(r["stdin"] == "" for r in seen)


async def test_no_command_for_a_fetch_that_brings_the_same_credential(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path
) -> None:
    """Re-listing a key that did not change neither rewrites the file nor runs the command."""
    path, record = short_dir / "churn.key", short_dir / "record"
    lines = f'path = "{path}"\n' + recorder(record)
    broker = await start_broker(with_sinks(emulator, short_dir, {"churn": (CHURN["churn"], lines)}))
    await settled(broker)
    inode = path.stat().st_ino
    for _ in range(3):
        await broker.daemon.store.fetch("churn")
    await asyncio.wait_for(broker.daemon.sinks.idle(), 20)
    assert emulator.state.count("mms.listkeys") == 4
    assert path.stat().st_ino == inode and len(records(record)) == 1


async def test_changes_while_the_command_runs_make_one_more_run(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path
) -> None:
    """Never two runs at once: three changes during a run give exactly one run after it,
    which sees the latest file."""
    path, record, gate = short_dir / "fraud.token", short_dir / "record", short_dir / "gate"
    os.mkfifo(gate)
    lines = f'path = "{path}"\n' + recorder(record, str(gate))
    broker = await start_broker(with_sinks(emulator, short_dir, {"fraud": (FRAUD["fraud"], lines)}))
    writer = await asyncio.wait_for(asyncio.to_thread(open, gate, "w"), 20)  # the run waits
    try:
        store = broker.daemon.store
        for _ in range(3):
            await store.fetch("fraud")
        latest = store.entry("fraud").token
        assert latest is not None
        await asyncio.wait_for(holds(path, latest.value), 10)  # writes go on meanwhile
        assert len(records(record)) == 1
    finally:
        writer.close()  # the first run ends
    await asyncio.wait_for(broker.daemon.sinks.idle(), 20)
    assert [r["digest"] for r in records(record)][1:] == [digest(latest.value)]
    assert len(records(record)) == 2


async def test_a_reader_never_sees_a_partial_file(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path
) -> None:
    """A thread reading the file in a tight loop through 40 refreshes sees only whole
    credentials, each one the broker held."""
    path = short_dir / "fraud.json"
    lines = f'path = "{path}"\nformat = "json"\n'
    broker = await start_broker(with_sinks(emulator, short_dir, {"fraud": (FRAUD["fraud"], lines)}))
    await settled(broker)
    store = broker.daemon.store
    held: set[str] = set()
    seen: list[str] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            seen.append(path.read_text())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(40):
            entry = store.entry("fraud")
            assert entry.token is not None
            held.add(entry.token.value)
            await store.fetch("fraud")
            await asyncio.wait_for(broker.daemon.sinks.idle(), 20)
        entry = store.entry("fraud")
        assert entry.token is not None
        held.add(entry.token.value)
    finally:
        done.set()
        reader.join()
    assert len(seen) > 40 and len({text for text in seen}) > 10
    assert {json.loads(text)["access_token"] for text in seen} <= held


async def test_a_command_past_its_timeout_is_killed(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, logs: io.StringIO
) -> None:
    """A command that never ends is killed at command_timeout_s and says so in the log."""
    path = short_dir / "fraud.token"
    lines = f'path = "{path}"\ncommand = ["tail", "-f", "/dev/null"]\ncommand_timeout_s = 0.5\n'
    broker = await start_broker(with_sinks(emulator, short_dir, {"fraud": (FRAUD["fraud"], lines)}))
    await settled(broker)
    [timed_out] = log_events(logs, "sink.command_timed_out")
    assert timed_out["service"] == "fraud" and timed_out["exit_status"] == -9
    assert (await broker.client().get("/v1/token/fraud")).status == 200


async def test_a_failing_write_is_logged_and_serving_goes_on(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, logs: io.StringIO
) -> None:
    """A sink in a missing directory logs a warning naming it; clients are served as ever."""
    path = short_dir / "absent" / "fraud.token"
    lines = f'path = "{path}"\n'
    broker = await start_broker(with_sinks(emulator, short_dir, {"fraud": (FRAUD["fraud"], lines)}))
    await settled(broker)
    served = await broker.client("tcp").get("/v1/token/fraud")
    assert served.status == 200
    [failure] = log_events(logs, "sink.write_failed")
    assert failure["service"] == "fraud" and failure["path"] == str(path)
    assert failure["error"] == "No such file or directory"
    assert served.json()["access_token"] not in logs.getvalue()


async def test_the_credential_never_reaches_the_log_even_when_the_command_prints_it(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path, logs: io.StringIO
) -> None:
    """A command that cats the file (bare key and JSON token) logs only masked output."""
    fraud, churn = short_dir / "fraud.json", short_dir / "churn.key"
    sinks = {
        "fraud": (
            FRAUD["fraud"],
            f'path = "{fraud}"\nformat = "json"\ncommand = ["cat", "{fraud}"]\n',
        ),
        "churn": (CHURN["churn"], f'path = "{churn}"\ncommand = ["cat", "{churn}"]\n'),
    }
    broker = await start_broker(with_sinks(emulator, short_dir, sinks))
    await settled(broker)
    credentials = [
        (await broker.client().get(f"/v1/token/{name}")).json()["access_token"] for name in sinks
    ]
    finished = log_events(logs, "sink.command_finished")
    assert {f["service"] for f in finished} == {"fraud", "churn"}
    assert all(MASK in str(f["output"]) for f in finished)
    for credential in credentials:
        assert credential not in logs.getvalue()


async def test_reload_applies_a_sink_change_without_fetching_again(
    start_broker: StartBroker, emulator: Emulator, short_dir: Path
) -> None:
    """A sink-only change keeps the credential and writes it to the new path; removing the
    service stops its sink and leaves the file in place."""
    first, second = short_dir / "a.token", short_dir / "b.token"
    config = short_dir / "broker.toml"
    sink = {"fraud": (FRAUD["fraud"], f'path = "{first}"\n')}
    broker = await start_broker(with_sinks(emulator, short_dir, sink))
    await settled(broker)
    token = first.read_text()
    calls = emulator.state.count("mms.token")
    config.write_text(
        with_sinks(emulator, short_dir, {"fraud": (FRAUD["fraud"], f'path = "{second}"\n')})
    )
    await broker.daemon.reload(load_config(config))
    await asyncio.wait_for(broker.daemon.sinks.idle(), 20)
    assert second.read_text() == token == first.read_text()
    assert emulator.state.count("mms.token") == calls
    assert (await broker.client().get("/v1/token/fraud")).json()["access_token"] == token

    config.write_text(config_text(emulator, short_dir, services=CHURN))
    await broker.daemon.reload(load_config(config))
    await settled(broker)
    assert second.read_text() == token


async def test_a_restored_credential_is_written_at_start(
    emulator: Emulator, short_dir: Path
) -> None:
    """After a restart with the persisted cache, the sink is written before Azure answers."""
    key = short_dir / "cache.key"
    key.write_bytes(bytes(range(48)))
    key.chmod(0o600)
    path = short_dir / "fraud.token"
    text = with_sinks(emulator, short_dir, {"fraud": (FRAUD["fraud"], f'path = "{path}"\n')})
    text += f'\n[cache]\nenabled = true\npath = "{short_dir / "cache.bin"}"\nkey_file = "{key}"\n'
    config = short_dir / "broker.toml"
    config.write_text(text)
    async with Daemon(load_config(config)) as daemon:
        token = (await daemon.store.credential("fraud")).token
        await asyncio.wait_for(daemon.sinks.idle(), 20)
    assert token is not None and path.read_text() == token.value
    path.unlink()
    emulator.state.fail("mms.token", status=503)
    async with Daemon(load_config(config)) as daemon:
        await asyncio.wait_for(daemon.sinks.idle(), 20)
        assert path.read_text() == token.value
