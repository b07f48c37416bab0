"""`token-broker once` as a real process against the emulator: it fetches, writes the sink
files, runs their commands, reports each service and exits 0, 1 or 2, never listening."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from broker.cli import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, main
from broker.config import load_config
from broker.daemon import Daemon
from broker.emulator import Emulator
from broker.emulator import seed as demo
from broker.errors import ConfigError
from broker.oneshot import as_json, as_text, run_once
from tests.conftest import CLIENT_SECRET, config_text

pytestmark = pytest.mark.timeout(60)

BOTH = {"fraud": demo.TOKEN_SERVICE, "churn": demo.KEY_SERVICE}
QUICK_RETRIES = "retry_min_s = 0.05\nretry_max_s = 0.2"


@dataclass
class Ran:
    code: int
    out: str
    err: str
    wall_s: float
    exit_lag_s: float  # from its last line on stdout to its exit

    def json(self) -> Any:
        return json.loads(self.out)

    def service(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = next(s for s in self.json()["services"] if s["service"] == name)
        return found


async def once(path: Path, *args: str, within: float = 40.0) -> Ran:
    """Run `token-broker once -c path args…` as its own process (the emulator answers from
    this one's event loop, so the wait must not block it)."""
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker",
        "once",
        "-c",
        str(path),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None and proc.stderr is not None
    out: list[bytes] = []
    printed_at = started

    async def read_out(stream: asyncio.StreamReader) -> None:
        nonlocal printed_at
        async for line in stream:
            out.append(line)
            printed_at = time.monotonic()

    try:
        _, err, _ = await asyncio.wait_for(
            asyncio.gather(read_out(proc.stdout), proc.stderr.read(), proc.wait()), within
        )
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    exited_at = time.monotonic()
    assert proc.returncode is not None
    text = b"".join(out).decode()
    return Ran(proc.returncode, text, err.decode(), exited_at - started, exited_at - printed_at)


def with_sinks(text: str, sinks: dict[str, str]) -> str:
    """`text` with a [service.sink] table (its lines given) after each named service."""
    head, *blocks = text.split("\n[[service]]\n")
    for block in blocks:
        name = block.split('name = "', 1)[1].split('"', 1)[0]
        head += "\n[[service]]\n" + block
        if name in sinks:
            head += "\n[service.sink]\n" + sinks[name]
    return head


def sink_files(short_dir: Path, names: list[str]) -> dict[str, str]:
    return {name: f'path = "{short_dir / (name + ".cred")}"\n' for name in names}


def write(short_dir: Path, text: str) -> Path:
    path = short_dir / "broker.toml"
    path.write_text(text)
    return path


def never_leaked(ran: Ran, *files: Path) -> None:
    """Neither the client secret nor any credential written appears in what was printed."""
    printed = ran.out + ran.err
    assert CLIENT_SECRET not in printed
    for file in files:
        if file.exists():
            assert file.read_text().strip() not in printed


async def test_every_service_fetched_and_written_exits_0(
    emulator: Emulator, short_dir: Path
) -> None:
    """All services succeed: exit 0, each sink holds a credential the emulator accepts, the
    table says fresh and where each came from, nothing secret is printed, nothing listens."""
    text = config_text(emulator, short_dir, services=BOTH)
    path = write(short_dir, with_sinks(text, sink_files(short_dir, list(BOTH))))
    ran = await once(path)
    assert ran.code == EXIT_OK, ran.err
    fraud, churn = short_dir / "fraud.cred", short_dir / "churn.cred"
    token_service = emulator.state.web_service(
        demo.SUBSCRIPTION_ID, demo.RESOURCE_GROUP, demo.WORKSPACE, demo.TOKEN_SERVICE
    )
    assert token_service is not None
    assert emulator.state.token_is_valid(fraud.read_text(), token_service)
    assert churn.read_text() in emulator.state.current_keys(
        demo.SUBSCRIPTION_ID, demo.RESOURCE_GROUP, demo.WORKSPACE, demo.KEY_SERVICE
    )
    header, *rows = ran.out.splitlines()
    assert header.split() == ["SERVICE", "STATE", "EXPIRES", "SOURCE", "REASON"]
    assert [row.split()[:2] for row in rows] == [["fraud", "fresh"], ["churn", "fresh"]]
    assert all(row.split()[-2:] == ["azure", "-"] for row in rows)
    never_leaked(ran, fraud, churn)
    assert not (short_dir / "broker.sock").exists()


async def test_json_summary_has_its_documented_shape(emulator: Emulator, short_dir: Path) -> None:
    """--json prints one JSON document: ok, timeout_s, elapsed_s, fleet (null without one)
    and a row per service with the documented keys, never the credential."""
    text = config_text(emulator, short_dir, services=BOTH)
    path = write(short_dir, with_sinks(text, sink_files(short_dir, ["churn"])))
    ran = await once(path, "--json", "--timeout", "20")
    assert ran.code == EXIT_OK, ran.err
    report = ran.json()
    assert set(report) == {"ok", "timeout_s", "elapsed_s", "fleet", "services"}
    assert report["ok"] is True and report["timeout_s"] == 20.0 and report["fleet"] is None
    assert 0 < report["elapsed_s"] < 20
    keys = {"service", "ok", "state", "auth", "expires_on", "source", "sink", "attempts"}
    keys |= {"reason", "status", "aad_code"}
    assert all(set(row) == keys for row in report["services"])
    fraud, churn = ran.service("fraud"), ran.service("churn")
    assert (fraud["auth"], fraud["sink"], fraud["attempts"]) == ("token", None, 1)
    assert fraud["expires_on"].endswith("+00:00")
    assert (churn["auth"], churn["expires_on"]) == ("key", None)
    assert churn["sink"] == str(short_dir / "churn.cred")
    never_leaked(ran, short_dir / "churn.cred")


async def test_a_service_refused_by_azure_fails_with_its_http_reason(
    emulator: Emulator, short_dir: Path
) -> None:
    """A 403 on one service: exit 1, its reason names the HTTP status and the fix, it is not
    retried; the other service's file is still written."""
    emulator.state.fail("mms.token", status=403, service=demo.TOKEN_SERVICE)
    text = config_text(emulator, short_dir, services=BOTH)
    path = write(short_dir, with_sinks(text, sink_files(short_dir, list(BOTH))))
    ran = await once(path, "--json")
    assert ran.code == EXIT_FAILURE
    fraud = ran.service("fraud")
    assert (fraud["ok"], fraud["state"], fraud["status"], fraud["attempts"]) == (
        False,
        "failed",
        403,
        1,
    )
    assert "HTTP 403" in fraud["reason"] and "Reader" in fraud["reason"]
    assert not (short_dir / "fraud.cred").exists()
    assert ran.service("churn")["ok"] is True
    assert (short_dir / "churn.cred").read_text()
    assert "1 of 2 services failed: fraud" in ran.err
    never_leaked(ran, short_dir / "churn.cred")


async def test_a_sign_in_refused_by_entra_fails_with_its_aadsts_code(
    emulator: Emulator, short_dir: Path
) -> None:
    """A service whose identity has a wrong secret fails with AADSTS7000215 in the table;
    the service of the other identity is fetched and written."""
    wrong = short_dir / "wrong-secret"
    wrong.write_text("not-the-secret-at-all\n")
    wrong.chmod(0o600)
    text = config_text(
        emulator,
        short_dir,
        services={"churn": demo.KEY_SERVICE},
        extra_service_keys='identity = "main"',
    )
    text += f"""
[identity.stale]
tenant_id = "{demo.TENANT_ID}"
client_id = "{demo.CLIENT_ID}"
client_secret_file = "{wrong}"

[[service]]
name = "fraud"
identity = "stale"
subscription_id = "{demo.SUBSCRIPTION_ID}"
resource_group = "{demo.RESOURCE_GROUP}"
workspace = "{demo.WORKSPACE}"
web_service = "{demo.TOKEN_SERVICE}"
"""
    path = write(short_dir, with_sinks(text, sink_files(short_dir, ["churn", "fraud"])))
    ran = await once(path)
    assert ran.code == EXIT_FAILURE
    rows = {line.split()[0]: line for line in ran.out.splitlines()[1:]}
    assert rows["fraud"].split()[1] == "failed" and "AADSTS7000215" in rows["fraud"]
    assert rows["churn"].split()[1] == "fresh"
    assert (short_dir / "churn.cred").read_text()
    assert not (short_dir / "fraud.cred").exists()
    assert "not-the-secret-at-all" not in ran.out + ran.err
    never_leaked(ran, short_dir / "churn.cred")


async def test_failures_a_retry_heals_are_retried_on_the_policy(
    emulator: Emulator, short_dir: Path
) -> None:
    """Two 503s then an answer: the service succeeds on its third attempt, exit 0."""
    emulator.state.fail("mms.token", status=503, times=2, service=demo.TOKEN_SERVICE)
    path = write(
        short_dir,
        config_text(
            emulator, short_dir, services={"fraud": demo.TOKEN_SERVICE}, refresh=QUICK_RETRIES
        ),
    )
    ran = await once(path, "--json")
    assert ran.code == EXIT_OK, ran.err
    assert ran.service("fraud")["attempts"] == 3
    assert emulator.state.count("mms.token", demo.TOKEN_SERVICE) == 3


async def test_retries_wait_for_the_call_budget(emulator: Emulator, short_dir: Path) -> None:
    """With a budget of one call and then one every 2 s, the retry after a 503 waits for the
    budget (and says so) rather than calling again at once."""
    emulator.state.fail("mms.token", status=503, times=1, service=demo.TOKEN_SERVICE)
    refresh = "retry_min_s = 0.05\nservice_calls_burst = 1\nservice_calls_per_minute = 30"
    path = write(
        short_dir,
        config_text(emulator, short_dir, services={"fraud": demo.TOKEN_SERVICE}, refresh=refresh),
    )
    ran = await once(path, "--json")
    assert ran.code == EXIT_OK, ran.err
    assert ran.service("fraud")["attempts"] == 2
    assert ran.json()["elapsed_s"] >= 1.5
    assert "upstream.budget_exhausted" in ran.err


async def test_a_failure_that_lasts_ends_at_the_deadline_with_its_reason(
    emulator: Emulator, short_dir: Path
) -> None:
    """A service answering 500 every time is retried until the deadline, then fails with
    the HTTP reason; the run ends by --timeout."""
    emulator.state.fail("mms.token", status=500, service=demo.TOKEN_SERVICE)
    path = write(
        short_dir,
        config_text(emulator, short_dir, services=BOTH, refresh=QUICK_RETRIES),
    )
    ran = await once(path, "--json", "--timeout", "2")
    assert ran.code == EXIT_FAILURE
    fraud = ran.service("fraud")
    assert fraud["state"] in {"failed", "timed_out"} and fraud["status"] == 500
    assert "HTTP 500" in fraud["reason"] and fraud["attempts"] > 2
    assert ran.json()["elapsed_s"] <= 2.5
    assert ran.service("churn")["ok"] is True


async def test_a_hung_azure_call_ends_the_run_at_the_timeout(
    emulator: Emulator, short_dir: Path
) -> None:
    """A call that never answers: the run ends at --timeout (not at the 30 s call timeout)
    with "timed out after 3 s", and the other service's file is written."""
    emulator.state.fail("mms.token", kind="hang", service=demo.TOKEN_SERVICE)
    text = config_text(emulator, short_dir, services=BOTH)
    path = write(short_dir, with_sinks(text, sink_files(short_dir, list(BOTH))))
    ran = await once(path, "--json", "--timeout", "3")
    assert ran.code == EXIT_FAILURE
    fraud = ran.service("fraud")
    assert (fraud["state"], fraud["reason"]) == ("timed_out", "timed out after 3 s")
    assert 3 <= ran.json()["elapsed_s"] < 3.5
    assert ran.exit_lag_s < 1.0
    assert (short_dir / "churn.cred").read_text()
    assert not (short_dir / "fraud.cred").exists()


async def test_a_hung_sign_in_ends_the_run_at_the_timeout(
    emulator: Emulator, short_dir: Path
) -> None:
    """A sign-in that Entra never answers, from 2 s on, holds one of MSAL's worker threads,
    which nothing cancels, until 6 s: the run still reports at the 4 s --timeout and the
    process exits then, without waiting for the thread."""
    emulator.state.fail("entra.openid", kind="slow", delay_s=2.0)
    emulator.state.fail("entra.token", kind="hang")
    path = write(short_dir, config_text(emulator, short_dir, services=BOTH, refresh=QUICK_RETRIES))
    ran = await once(path, "--json", "--timeout", "4")
    assert ran.code == EXIT_FAILURE
    assert [row["state"] for row in ran.json()["services"]] == ["timed_out", "timed_out"]
    assert emulator.state.count("entra.token") == 1
    assert 4 <= ran.json()["elapsed_s"] < 4.5
    assert ran.exit_lag_s < 1.0  # waiting for the thread would take 2 s more


async def test_service_option_fetches_only_the_services_named(
    emulator: Emulator, short_dir: Path
) -> None:
    """--service churn asks Azure for churn only, writes only its file, reports only it."""
    text = config_text(emulator, short_dir, services=BOTH)
    path = write(short_dir, with_sinks(text, sink_files(short_dir, list(BOTH))))
    ran = await once(path, "--service", "churn", "--json")
    assert ran.code == EXIT_OK, ran.err
    assert [row["service"] for row in ran.json()["services"]] == ["churn"]
    assert emulator.state.count("mms.listkeys", demo.KEY_SERVICE) == 1
    assert emulator.state.count("mms.describe", demo.TOKEN_SERVICE) == 0
    assert emulator.state.count("mms.token") == 0
    assert (short_dir / "churn.cred").exists() and not (short_dir / "fraud.cred").exists()


async def test_an_unknown_service_name_is_a_configuration_error(
    emulator: Emulator, short_dir: Path
) -> None:
    """--service ghost exits 2 naming it, the file and the names there are, with no
    traceback and no call to Azure."""
    path = write(short_dir, config_text(emulator, short_dir, services=BOTH))
    ran = await once(path, "--service", "fraud", "--service", "ghost")
    assert ran.code == EXIT_CONFIG
    assert "'ghost'" in ran.err and str(path) in ran.err and "fraud, churn" in ran.err
    assert "Traceback" not in ran.err and ran.out == ""
    assert emulator.state.count("entra.token") == 0


async def test_a_broken_configuration_exits_2_with_file_key_and_fix(short_dir: Path) -> None:
    """A broken file: exit 2, the file, the key and the fix on stderr, no traceback."""
    path = write(short_dir, "[listen.tcp]\nprot = 1\n")
    ran = await once(path)
    assert ran.code == EXIT_CONFIG
    assert (
        str(path) in ran.err and "listen.tcp.prot" in ran.err and 'did you mean "port"' in ran.err
    )
    assert "Traceback" not in ran.err and ran.out == ""


async def test_sink_commands_run_and_a_failing_one_fails_its_service(
    emulator: Emulator, short_dir: Path
) -> None:
    """Each sink's command runs once after its file is written, before the exit; a command
    that exits 3 makes its service fail with that status."""
    record = short_dir / "ran"
    ok_command = [sys.executable, "-c", f"open({str(record)!r}, 'a').write('churn\\n')"]
    bad_command = [sys.executable, "-c", "raise SystemExit(3)"]
    sinks = sink_files(short_dir, list(BOTH))
    sinks["churn"] += f"command = {json.dumps(ok_command)}\n"
    sinks["fraud"] += f"command = {json.dumps(bad_command)}\n"
    path = write(short_dir, with_sinks(config_text(emulator, short_dir, services=BOTH), sinks))
    ran = await once(path, "--json")
    assert ran.code == EXIT_FAILURE
    assert record.read_text() == "churn\n"
    fraud = ran.service("fraud")
    assert fraud["reason"] == "the sink's command exited with status 3"
    assert fraud["state"] == "fresh" and (short_dir / "fraud.cred").exists()
    assert ran.service("churn")["ok"] is True


async def test_a_sink_that_cannot_be_written_fails_its_service(
    emulator: Emulator, short_dir: Path
) -> None:
    """A sink file in a directory that does not exist: its service fails saying so."""
    sinks = {"fraud": f'path = "{short_dir / "absent" / "fraud.cred"}"\n'}
    path = write(
        short_dir,
        with_sinks(config_text(emulator, short_dir, services={"fraud": demo.TOKEN_SERVICE}), sinks),
    )
    ran = await once(path, "--json")
    assert ran.code == EXIT_FAILURE
    reason = ran.service("fraud")["reason"]
    assert reason.startswith("the credential could not be written to ") and "absent" in reason


async def test_the_persisted_cache_serves_a_second_run_and_the_daemon_after_it(
    emulator: Emulator, short_dir: Path
) -> None:
    """With [cache] on, a run saves what it fetched: the next run takes the token from the
    cache without asking Azure (the key is listed again), and so does a daemon started next."""
    key = short_dir / "cache.key"
    key.write_bytes(bytes(range(48)))
    key.chmod(0o600)
    text = config_text(emulator, short_dir, services=BOTH)
    text += f'\n[cache]\nenabled = true\npath = "{short_dir / "cache.bin"}"\nkey_file = "{key}"\n'
    path = write(short_dir, with_sinks(text, sink_files(short_dir, ["fraud"])))
    first = await once(path, "--json")
    assert first.code == EXIT_OK, first.err
    written = (short_dir / "fraud.cred").read_text()
    tokens = emulator.state.count("mms.token")
    second = await once(path, "--json")
    assert second.code == EXIT_OK, second.err
    assert [second.service(name)["source"] for name in BOTH] == ["cache", "azure"]
    assert second.service("fraud")["attempts"] == 0
    assert emulator.state.count("mms.token") == tokens
    assert (short_dir / "fraud.cred").read_text() == written
    async with Daemon(load_config(path)) as daemon:
        entry = daemon.store.entry("fraud")
        assert entry.token is not None and entry.token.value == written
        assert emulator.state.count("mms.token") == tokens


async def test_the_report_in_process_says_how_each_service_ended(
    emulator: Emulator, short_dir: Path
) -> None:
    """run_once itself (the command's core, in this process): one service delivered, one
    refused, one cut at the deadline; the table and the JSON say so, with no credential."""
    emulator.state.fail("mms.token", status=403, service=demo.TOKEN_SERVICE)
    emulator.state.fail("arm.endpoint_token", kind="hang")
    text = config_text(emulator, short_dir, services=BOTH) + (
        f'\n[[service]]\nname = "online"\nkind = "azureml-online-endpoint"\n'
        f'subscription_id = "{demo.SUBSCRIPTION_ID}"\n'
        f'resource_group = "{demo.RESOURCE_GROUP}"\n'
        f'workspace = "{demo.WORKSPACE}"\nendpoint = "{demo.ENDPOINT_TOKEN}"\n'
    )
    path = write(short_dir, with_sinks(text, sink_files(short_dir, ["churn"])))
    report = await run_once(load_config(path), timeout_s=2.0)
    assert not report.ok and report.timed_out
    states = {o.service: (o.ok, o.state, o.source) for o in report.outcomes}
    assert states == {
        "fraud": (False, "failed", None),
        "churn": (True, "fresh", "azure"),
        "online": (False, "timed_out", None),
    }
    assert [o.service for o in report.failed] == ["fraud", "online"]
    table = as_text(report).splitlines()
    assert table[0].split() == ["SERVICE", "STATE", "EXPIRES", "SOURCE", "REASON"]
    assert table[2].split()[:5] == ["churn", "fresh", "never", "(key)", "azure"]
    assert table[3].endswith("timed out after 2 s")
    shown = json.loads(json.dumps(as_json(report)))
    assert [row["state"] for row in shown["services"]] == ["failed", "fresh", "timed_out"]
    assert (short_dir / "churn.cred").read_text() not in as_text(report) + json.dumps(shown)


async def test_an_unknown_service_is_refused_before_anything_runs(
    emulator: Emulator, short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command refuses --service ghost with exit 2 before it signs in or configures
    anything (in this process: it must not harden or log as a run would)."""
    path = write(short_dir, config_text(emulator, short_dir, services=BOTH))
    assert main(["once", "-c", str(path), "--service", "ghost"]) == EXIT_CONFIG
    assert "no service named 'ghost'" in capsys.readouterr().err
    with pytest.raises(ConfigError) as refused:
        await run_once(load_config(path), ["ghost", "fraud", "ghost"])
    assert len(refused.value.problems) == 1
    assert emulator.state.count("entra.token") == 0
