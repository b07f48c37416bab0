"""The systemd files: they verify cleanly, keep a tight sandbox, and agree with the broker."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from broker.config import DEFAULT_CACHE_PATH, DEFAULT_CONFIG_PATH, DEFAULT_SOCKET_PATH, load_config

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parents[2]
SYSTEMD = REPO / "systemd"
SERVICE = SYSTEMD / "token-broker.service"
SOCKET = SYSTEMD / "token-broker.socket"
SYSUSERS = SYSTEMD / "token-broker.sysusers.conf"
TMPFILES = SYSTEMD / "token-broker.tmpfiles.conf"
EXAMPLE = REPO / "deploy" / "broker.toml.example"
INSTALLED_BINARY = "/usr/bin/token-broker"  # where deploy/README.md puts the symlink
MAX_EXPOSURE = 2.0
USER = "token-broker"


def systemd_tool(name: str) -> str:
    """The path of a systemd command; fails the test, with the fix, when it is missing."""
    path = shutil.which(name) or shutil.which(name, path="/usr/bin:/bin")
    if path is None:
        pytest.fail(
            f"{name} is not installed: these tests check the systemd units with it. Install "
            "systemd, which provides it (Debian/Ubuntu: apt-get install systemd).",
            pytrace=False,
        )
    return path


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=20, check=False)


def directives(path: Path) -> list[tuple[str, str, str]]:
    """Every `key=value` of a unit file as (section, key, value), in file order."""
    found: list[tuple[str, str, str]] = []
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        found.append((section, key.strip(), value.strip()))
    return found


def values(path: Path, key: str) -> list[str]:
    return [value for _, name, value in directives(path) if name == key]


def value(path: Path, key: str) -> str:
    """The one value of `key`; a key set more than once or never is a failure here."""
    found = values(path, key)
    assert len(found) == 1, f"{path.name}: expected one {key}=, found {found}"
    return found[0]


@pytest.fixture
def units(tmp_path: Path) -> Path:
    """The units in a temporary directory, ExecStart pointed at this venv's token-broker.

    `systemd-analyze verify` checks that ExecStart's binary exists and is executable; the
    installed path does not exist on a development machine, the venv's does after `make`.
    """
    binary = Path(sys.executable).parent / "token-broker"
    assert binary.exists(), f"{binary} is missing: run `make` (pip install -e '.[dev]') first"
    text = SERVICE.read_text()
    assert f"ExecStart={INSTALLED_BINARY} " in text
    (tmp_path / SERVICE.name).write_text(
        text.replace(f"ExecStart={INSTALLED_BINARY} ", f"ExecStart={binary} ")
    )
    shutil.copy(SOCKET, tmp_path / SOCKET.name)
    return tmp_path


def test_units_verify_without_a_single_warning(units: Path) -> None:
    """`systemd-analyze verify` accepts the service and the socket and prints nothing."""
    analyze = systemd_tool("systemd-analyze")
    result = run(analyze, "verify", "--man=no", SERVICE.name, SOCKET.name, cwd=units)
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == "", "verify warned:\n" + result.stdout + result.stderr


def test_service_sandbox_rates_at_most_2_0(units: Path) -> None:
    """`systemd-analyze security --offline=true` rates the service's exposure 2.0 or lower."""
    analyze = systemd_tool("systemd-analyze")
    result = run(analyze, "security", "--offline=true", "--no-pager", SERVICE.name, cwd=units)
    assert result.returncode == 0, result.stderr
    found = re.search(
        r"Overall exposure level for token-broker\.service: (\d+\.\d+)", result.stdout
    )
    assert found, "no exposure level in:\n" + result.stdout
    exposure = float(found.group(1))
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure} > {MAX_EXPOSURE}:\n{result.stdout}"


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("WatchdogSec", "30s"),
        ("ExecReload", "kill -HUP $MAINPID"),
        ("Restart", "on-failure"),
        ("RestartPreventExitStatus", "2"),
        ("User", USER),
        ("Group", USER),
        ("RuntimeDirectoryMode", "0750"),
        ("RuntimeDirectoryPreserve", "yes"),
        ("StateDirectoryMode", "0700"),
        ("UMask", "0077"),
        ("LimitCORE", "0"),
        ("CapabilityBoundingSet", ""),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("MemoryDenyWriteExecute", "yes"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
        ("SystemCallArchitectures", "native"),
        ("SystemCallErrorNumber", "EPERM"),
        ("ProtectProc", "invisible"),
        ("ProcSubset", "pid"),
        ("PrivateUsers", "no"),
    ],
)
def test_service_sets(key: str, expected: str) -> None:
    """The service sets each directive the daemon's protocol and its sandbox depend on."""
    assert value(SERVICE, key) == expected


def test_service_uses_a_static_user_and_reaches_azure() -> None:
    """No DynamicUser (clients join a stable group) and no IP allow list (Azure is remote)."""
    assert values(SERVICE, "DynamicUser") == []
    assert values(SERVICE, "IPAddressDeny") == []
    assert values(SERVICE, "PrivateNetwork") == []


def test_system_call_filter_keeps_what_the_daemon_calls() -> None:
    """The filter denies @privileged and @resources yet allows what the daemon calls."""
    # The daemon's resource.setrlimit(RLIMIT_CORE) is glibc's setrlimit(), which makes the
    # prlimit64 system call (in @default), not setrlimit (in @resources); its
    # prctl(PR_SET_DUMPABLE) is prctl (in @process). A denied call would fail with EPERM.
    analyze = systemd_tool("systemd-analyze")
    assert values(SERVICE, "SystemCallFilter") == ["@system-service", "~@privileged @resources"]

    def members(group: str) -> set[str]:
        listed = run(analyze, "syscall-filter", "--no-pager", group).stdout.split()
        calls = {name for name in listed if re.fullmatch(r"[a-z0-9_]+", name)}
        for nested in (name for name in listed[1:] if name.startswith("@")):
            calls |= members(nested)
        return calls

    allowed = members("@system-service") - members("@privileged") - members("@resources")
    assert {"prlimit64", "prctl", "chmod", "bind", "listen", "accept4"} <= allowed
    assert "setrlimit" not in allowed  # the reason the daemon must not call it directly


def test_unit_paths_are_the_broker_defaults() -> None:
    """ExecStart, the socket and the unit's directories are where the broker looks by default."""
    assert value(SERVICE, "ExecStart") == f"{INSTALLED_BINARY} run -c {DEFAULT_CONFIG_PATH}"
    listen = values(SOCKET, "ListenStream")
    assert listen == ["%t/token-broker/broker.sock"]
    assert Path(listen[0].replace("%t", "/run")) == DEFAULT_SOCKET_PATH
    assert Path("/run") / value(SERVICE, "RuntimeDirectory") == DEFAULT_SOCKET_PATH.parent
    assert Path("/var/lib") / value(SERVICE, "StateDirectory") == DEFAULT_CACHE_PATH.parent
    assert Path("/etc") / value(SERVICE, "ConfigurationDirectory") == DEFAULT_CONFIG_PATH.parent


def test_socket_unit_gives_the_socket_to_the_services_group() -> None:
    """The activated socket is 0660 and belongs to the service's user and group."""
    assert value(SOCKET, "SocketMode") == "0660"
    assert value(SOCKET, "SocketUser") == value(SERVICE, "User")
    assert value(SOCKET, "SocketGroup") == value(SERVICE, "Group")
    assert "#ListenStream=127.0.0.1:8765" in SOCKET.read_text()


def test_example_configuration_loads_with_the_units_credential(tmp_path: Path) -> None:
    """deploy/broker.toml.example is valid with the secret that LoadCredential= hands over."""
    name, _, source = value(SERVICE, "LoadCredential").partition(":")
    assert source == str(DEFAULT_CONFIG_PATH.parent / "sp-secret")
    assert "#LoadCredential=cache-key:/etc/token-broker/cache.key" in SERVICE.read_text()
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / name).write_text("secret-from-systemd\n")
    config_file = tmp_path / "broker.toml"
    config_file.write_text(EXAMPLE.read_text())
    config = load_config(config_file, environ={"CREDENTIALS_DIRECTORY": str(credentials)})
    [identity] = config.identities.values()
    assert identity.secret_source == f"systemd credential {name}"
    assert identity.client_secret is not None
    assert identity.client_secret.reveal() == "secret-from-systemd"
    assert config.listen.unix.path == DEFAULT_SOCKET_PATH
    assert 'key_credential = "cache-key"' in EXAMPLE.read_text()


def passwd_ids(root: Path, name: str) -> tuple[int, int]:
    for line in (root / "etc" / "passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2]), int(fields[3])
    raise AssertionError(f"{name} not in {root}/etc/passwd")


@pytest.mark.skipif(os.geteuid() != 0, reason="setting file owners needs root (CI runs as root)")
def test_sysusers_and_tmpfiles_give_the_files_their_owners(tmp_path: Path) -> None:
    """sysusers.d creates token-broker; tmpfiles.d then fixes /etc/token-broker and /run."""
    root = tmp_path / "root"
    (root / "etc" / "token-broker").mkdir(parents=True)
    (root / "run").mkdir()
    for name in ("broker.toml", "sp-secret"):
        (root / "etc" / "token-broker" / name).write_text("x")
        (root / "etc" / "token-broker" / name).chmod(0o644)
    sysusers = run(systemd_tool("systemd-sysusers"), f"--root={root}", str(SYSUSERS))
    assert sysusers.returncode == 0, sysusers.stderr
    tmpfiles = run(systemd_tool("systemd-tmpfiles"), "--create", f"--root={root}", str(TMPFILES))
    assert tmpfiles.returncode == 0, tmpfiles.stderr
    uid, gid = passwd_ids(root, USER)
    expected = {
        "etc/token-broker": (0o750, 0, gid),
        "etc/token-broker/broker.toml": (0o640, 0, gid),
        "etc/token-broker/sp-secret": (0o600, 0, 0),
        "run/token-broker": (0o750, uid, gid),
    }
    for relative, (mode, owner, group) in expected.items():
        info = (root / relative).stat()
        assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (mode, owner, group), (
            relative
        )
