"""Fleet mode's deployment files: compose/fleet.yaml (Redis, two brokers and their secrets)
parses, validates and runs its parts for real here (the secrets' maker, Redis's start and
healthcheck on Debian's redis-server, the brokers' configuration through check-config and a
fleet under the ACL it gives)."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.assembly import new_fleet
from broker.config import load_config
from broker.models import AccessToken, AuthKind
from broker.saved_credentials import Saved

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
FLEET_COMPOSE = DEPLOY / "compose" / "fleet.yaml"
BROKERS = ("broker-1", "broker-2")
SECRETS_DIR = "/run/token-broker-fleet"  # where the brokers and Redis mount fleet-secrets
SH = "/bin/sh"  # what the images' `sh -c` and CMD-SHELL run
README_ACL = re.compile(r"^ACL SETUSER (\S+) on >PASSWORD (.+)$", re.MULTILINE)

Manifest = dict[str, Any]


def fleet_compose() -> Manifest:
    loaded: Manifest = yaml.safe_load(FLEET_COMPOSE.read_text())
    return loaded


def services() -> Manifest:
    found: Manifest = fleet_compose()["services"]
    return found


def volumes_of(service: Manifest) -> dict[str, tuple[str, str]]:
    """A service's mounts: target -> (source, options)."""
    found = {}
    for spec in service.get("volumes", []):
        source, target, *options = spec.split(":")
        found[target] = (source, options[0] if options else "rw")
    return found


def shell(text: str) -> str:
    """A compose string as the container's shell sees it: `$$` is compose's `$`."""
    return text.replace("$$", "$")


def readme_acl() -> tuple[str, str]:
    """The user and rules of the README's ACL for the broker's user."""
    found = README_ACL.search((REPO / "README.md").read_text())
    assert found is not None, "README.md lost its ACL SETUSER line"
    return found.group(1), found.group(2)


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Path:
    """The files fleet-secrets makes, made by its own code in a directory of the test's."""
    directory = tmp_path / "fleet-secrets"
    directory.mkdir()
    make_secrets(directory)
    return directory


def make_secrets(directory: Path) -> None:
    code = services()["fleet-secrets"]["entrypoint"][-1]
    assert "/var/lib/token-broker" in code
    subprocess.run(
        [sys.executable, "-I", "-S", "-c", code.replace("/var/lib/token-broker", str(directory))],
        check=True,
        timeout=20,
    )


def test_fleet_compose_validates_against_the_compose_spec() -> None:
    """deploy/compose/fleet.yaml is valid for the Compose Specification (schema bundled)."""
    checker = Path(sys.executable).parent / "check-jsonschema"
    result = subprocess.run(
        [str(checker), "--builtin-schema", "vendor.compose-spec", str(FLEET_COMPOSE)],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_two_brokers_share_one_configuration_redis_and_secrets() -> None:
    """Both brokers run one configuration with the same secrets (read-only), each its own
    socket volume, beside the emulator and Redis on one loopback, the second started once
    the first is up; every service is read-only, with no capability and no published port."""
    found = services()
    mounts = [volumes_of(found[name]) for name in BROKERS]
    assert mounts[0]["/etc/token-broker/broker.toml"] == mounts[1]["/etc/token-broker/broker.toml"]
    for each in mounts:
        assert each[SECRETS_DIR] == ("fleet-secrets", "ro")
    assert mounts[0]["/run/token-broker"][0] != mounts[1]["/run/token-broker"][0]
    for name in BROKERS:
        broker = found[name]
        assert broker["command"] == ["run", "-c", "/etc/token-broker/broker.toml"]
        assert broker["network_mode"] == "service:emulator"
        assert broker["depends_on"]["redis"]["condition"] == "service_healthy"
        assert broker["healthcheck"]["test"] == ["CMD", "token-broker", "probe", "live"]
    assert found["broker-2"]["depends_on"]["broker-1"]["condition"] == "service_healthy"
    redis = found["redis"]
    assert redis["network_mode"] == "service:emulator"
    assert volumes_of(redis)[SECRETS_DIR] == ("fleet-secrets", "ro")
    assert redis["depends_on"]["fleet-secrets"]["condition"] == "service_completed_successfully"
    assert volumes_of(found["fleet-secrets"])["/var/lib/token-broker"][0] == "fleet-secrets"
    for name, service in found.items():
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "ports" not in service, name


def test_the_secrets_are_made_once_and_private(tmp_path: Path, secrets_dir: Path) -> None:
    """fleet-secrets makes a 32-byte key and a password, mode 0600 each, and keeps them
    when run again (a restart must not split the fleet)."""
    key, password = secrets_dir / "fleet.key", secrets_dir / "redis-password"
    assert len(key.read_bytes()) == 32 and re.fullmatch(r"[0-9a-f]{64}", password.read_text())
    for path in (key, password):
        assert path.stat().st_mode & 0o777 == 0o600
    before = key.read_bytes(), password.read_bytes()
    make_secrets(secrets_dir)
    assert (key.read_bytes(), password.read_bytes()) == before


def brokers_config(tmp_path: Path, secrets_dir: Path, redis_port: int | None = None) -> Path:
    """compose/fleet.toml as the brokers read it, its mounted paths moved under tmp_path
    (and Redis's port to `redis_port`, when given)."""
    [(source, _)] = {
        volumes_of(services()[name])["/etc/token-broker/broker.toml"] for name in BROKERS
    }
    text = (FLEET_COMPOSE.parent / source).read_text()
    ca = tmp_path / "emulator-ca.pem"
    ca.write_text("not parsed at load time")
    text = text.replace("/emulator-ca/emulator-ca.pem", str(ca))
    text = text.replace(SECRETS_DIR, str(secrets_dir))
    if redis_port is not None:
        text = text.replace("127.0.0.1:6379", f"127.0.0.1:{redis_port}")
    path = tmp_path / "broker.toml"
    path.write_text(text)
    return path


def test_the_brokers_configuration_passes_check_config(tmp_path: Path, secrets_dir: Path) -> None:
    """compose/fleet.toml passes `token-broker check-config` with the environment compose
    gives the brokers and the files fleet-secrets makes: fleet mode on the Redis and user
    of fleet.yaml, the password and key shown by where they are, never their bytes."""
    config = brokers_config(tmp_path, secrets_dir)
    environment = services()["broker-1"]["environment"]
    result = subprocess.run(
        [sys.executable, "-m", "broker", "check-config", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={"PATH": "/usr/bin:/bin", **environment},
    )
    assert result.returncode == 0, result.stderr
    fleet = tomllib.loads(result.stdout)["fleet"]
    script = shell(services()["redis"]["entrypoint"][-1])
    assert fleet["redis_url"] == "redis://127.0.0.1:6379/0" and "--port 6379" in script
    assert f"user {fleet['username']} on " in script
    assert fleet["password"] == f"file {secrets_dir / 'redis-password'}"
    assert fleet["encryption_key"] == f"file {secrets_dir / 'fleet.key'}"
    password = (secrets_dir / "redis-password").read_text()
    assert password not in result.stdout + result.stderr
    assert tomllib.loads(result.stdout)["listen"]["tcp"]["enabled"] is False


@pytest.fixture
def compose_redis(tmp_path: Path, secrets_dir: Path) -> Iterator[int]:
    """Redis started by fleet.yaml's own entrypoint script, on Debian's redis-server, with
    its paths under tmp_path and a free port; the port."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is missing: `make test` installs Debian's package")
    port = _free_port()
    script = shell(services()["redis"]["entrypoint"][-1])
    for mounted, here in [
        ("/tmp/users.acl", tmp_path / "users.acl"),
        ("--dir /tmp", f"--dir {tmp_path}"),
        (SECRETS_DIR, secrets_dir),
        ("--port 6379", f"--port {port}"),
    ]:
        assert mounted in script
        script = script.replace(mounted, str(here))
    process = subprocess.Popen([SH, "-c", script], cwd=tmp_path, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not _listening(port):
        assert process.poll() is None, "Redis did not start from fleet.yaml's script"
        assert time.monotonic() < deadline, "Redis never listened"
        time.sleep(0.02)
    yield port
    process.terminate()
    process.wait(10)


def test_redis_starts_with_the_readmes_acl_and_passes_its_healthcheck(
    tmp_path: Path, secrets_dir: Path, compose_redis: int
) -> None:
    """Redis's script writes the README's ACL (less +client|setinfo, which Redis 7.0 lacks
    and redis-py does without), private to Redis, with the default user off; the
    healthcheck passes, and a client without the password gets nothing."""
    user, rules = readme_acl()
    acl = (tmp_path / "users.acl").read_text()
    password = (secrets_dir / "redis-password").read_text()
    assert (
        acl
        == f"user default off\nuser {user} on >{password} {rules.replace(' +client|setinfo', '')}\n"
    )
    assert (tmp_path / "users.acl").stat().st_mode & 0o077 == 0
    check = shell(services()["redis"]["healthcheck"]["test"][1])
    check = check.replace(SECRETS_DIR, str(secrets_dir)).replace("-p 6379", f"-p {compose_redis}")
    assert subprocess.run([SH, "-c", check], timeout=10, check=False).returncode == 0
    anonymous = subprocess.run(
        [shutil.which("redis-cli") or "/usr/bin/redis-cli", "-p", str(compose_redis), "get", "x"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert "NOAUTH" in anonymous.stdout + anonymous.stderr


async def test_a_broker_of_the_compose_fleet_shares_under_that_acl(
    tmp_path: Path, secrets_dir: Path, compose_redis: int
) -> None:
    """A broker with compose/fleet.toml's [fleet] takes the lease, writes and reads back an
    entry on that Redis as its ACL user: the ACL allows all the broker does."""
    config = load_config(
        brokers_config(tmp_path, secrets_dir, compose_redis),
        environ=services()["broker-1"]["environment"],
    )
    fleet = new_fleet(config, config.service_identity)
    assert fleet is not None
    try:
        lease = await fleet.lease("fraud")
        assert lease is not None
        now = time.time()
        saved = Saved(
            AccessToken("compose-fleet-TOKEN-1", AuthKind.TOKEN, now + 600, now + 300), now
        )
        assert await fleet.write("fraud", saved, 600)
        await lease.release()
        assert await fleet.read("fraud") == saved
        assert fleet.health == "up"
    finally:
        await fleet.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False
