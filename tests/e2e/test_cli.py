"""The command line: check-config, token and status against a running broker, and `run`."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from broker.cli import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, main
from broker.emulator import Emulator
from tests.conftest import CLIENT_SECRET, config_text
from tests.e2e.conftest import StartBroker

pytestmark = pytest.mark.timeout(30)


def test_check_config_prints_masked_configuration(
    emulator: Emulator, short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A valid file is printed back with its secret masked, exit 0."""
    path = short_dir / "broker.toml"
    path.write_text(config_text(emulator, short_dir))
    assert main(["check-config", "-c", str(path)]) == EXIT_OK
    out, err = capsys.readouterr()
    assert "[[service]]" in out and "valid" in err
    assert CLIENT_SECRET not in out + err


def test_broken_config_exits_2_without_traceback(short_dir: Path) -> None:
    """A broken file gets file, key and fix on stderr and exit code 2, from the real command."""
    path = short_dir / "broker.toml"
    path.write_text('[listen.tcp]\nport = "eighty"\n')
    result = subprocess.run(
        [sys.executable, "-m", "broker", "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == EXIT_CONFIG
    assert "Traceback" not in result.stderr
    assert str(path) in result.stderr and "port" in result.stderr


BROKEN = {
    "unknown key": ("[listen.tcp]\nprot = 1\n", "listen.tcp.prot", 'did you mean "port"'),
    "wrong type": ('[listen.tcp]\nport = "8765"\n', "listen.tcp.port", "integer"),
    "missing identity": ('identity = "ghost"', "service[1].identity", "ghost"),
    "two credentials": ('client_secret_env = "X"', "identity.main", "keep exactly one"),
    "duplicate service": ("DUPLICATE", "service[3].name", "already used"),
    "unreadable secret file": ("MISSING_SECRET", "identity.main.client_secret_file", "cannot read"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_each_broken_config_case_exits_2(
    case: str, emulator: Emulator, short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each broken-configuration case names the file, the key and the fix, exit code 2."""
    change, key, phrase = BROKEN[case]
    text = config_text(emulator, short_dir)
    if change == "DUPLICATE":
        text += text[text.index("[[service]]") :]
    elif change == "MISSING_SECRET":
        text = text.replace("client-secret", "no-such-secret-file")
    elif change.startswith("[listen.tcp]"):
        text = text.replace('[listen.tcp]\nhost = "127.0.0.1"\nport = 0\n', change)
    elif change.startswith("identity"):
        text = text.replace("[[service]]\n", f"[[service]]\n{change}\n", 1)
    else:
        text = text.replace("[identity.main]\n", f"[identity.main]\n{change}\n")
    path = short_dir / "broker.toml"
    path.write_text(text)
    assert main(["check-config", "-c", str(path)]) == EXIT_CONFIG
    out, err = capsys.readouterr()
    assert out == ""
    assert str(path) in err and f"[{key}" in err and phrase in err, err
    assert "Traceback" not in err and CLIENT_SECRET not in err


def test_missing_config_file_exits_2(short_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A configuration path that does not exist is named in the error, exit 2."""
    assert main(["run", "-c", str(short_dir / "absent.toml")]) == EXIT_CONFIG
    assert "absent.toml" in capsys.readouterr().err


async def test_token_and_status_commands(
    start_broker: StartBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    """`token` prints the JSON or the header line, `status` a table, over the socket and TCP."""
    broker = await start_broker()
    await broker.settled()
    sock = str(broker.daemon.unix_path)
    host, port = broker.daemon.tcp_address or ("", 0)
    assert await asyncio.to_thread(main, ["token", "fraud", "--socket", sock]) == EXIT_OK
    body = json.loads(capsys.readouterr().out)
    assert body["service"] == "fraud"
    url = f"http://{host}:{port}"
    assert await asyncio.to_thread(main, ["token", "fraud", "--header", "--url", url]) == EXIT_OK
    assert capsys.readouterr().out == f"Bearer {body['access_token']}\n"
    assert await asyncio.to_thread(main, ["status", "--socket", sock]) == EXIT_OK
    table = capsys.readouterr().out
    assert "fraud" in table and "churn" in table and "fresh" in table
    assert body["access_token"] not in table


async def test_token_command_reports_refusal(
    start_broker: StartBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unknown service or an unreachable broker is a message and exit 1."""
    broker = await start_broker()
    sock = str(broker.daemon.unix_path)
    assert await asyncio.to_thread(main, ["token", "nope", "--socket", sock]) == EXIT_FAILURE
    assert "nope" in capsys.readouterr().err
    missing = str(Path(sock).with_name("absent.sock"))
    assert await asyncio.to_thread(main, ["token", "fraud", "--socket", missing]) == EXIT_FAILURE
    assert "cannot reach the broker" in capsys.readouterr().err


def test_api_key_new_prints_the_key_once_and_its_digest(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`api-key new NAME` prints a fresh key and the [api_key.NAME] table holding its digest."""
    assert main(["api-key", "new", "scorer"]) == EXIT_OK
    out = capsys.readouterr().out
    key = next(line for line in out.splitlines() if line.startswith("tbk_"))
    assert f'sha256 = "{hashlib.sha256(key.encode()).hexdigest()}"' in out
    assert "[api_key.scorer]" in out
    assert main(["api-key", "new", "scorer"]) == EXIT_OK
    assert key not in capsys.readouterr().out  # a new key every time


async def test_token_command_sends_the_api_key(
    start_broker: StartBroker,
    emulator: Emulator,
    short_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`token --api-key` fetches a key-protected service over TCP."""
    key = "tbk_cli-test-key-000000000000000000"
    digest = hashlib.sha256(key.encode()).hexdigest()
    text = config_text(emulator, short_dir, extra_service_keys='api_keys = ["cli"]')
    broker = await start_broker(text + f'\n[api_key.cli]\nsha256 = "{digest}"\n')
    host, port = broker.daemon.tcp_address or ("", 0)
    url = f"http://{host}:{port}"
    assert await asyncio.to_thread(main, ["token", "fraud", "--url", url]) == EXIT_FAILURE
    assert "X-Token-Broker-Key" in capsys.readouterr().err
    argv = ["token", "fraud", "--url", url, "--api-key", key, "--header"]
    assert await asyncio.to_thread(main, argv) == EXIT_OK
    assert capsys.readouterr().out.startswith("Bearer ")


@pytest.mark.parametrize("command", [["demo"], ["emulator", "--port", "0"]])
def test_without_the_emulator_extra_the_command_says_how_to_get_it(
    command: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A production install has no trustme: `demo` and `emulator` name the extra, exit 1."""
    monkeypatch.setitem(sys.modules, "trustme", None)  # what an install without it looks like
    assert main(command) == 1
    err = capsys.readouterr().err
    assert "pip install 'token-broker[emulator]'" in err
    assert "Traceback" not in err
