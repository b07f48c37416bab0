"""The [fleet] table: off by default, each source of its password and key read, every bad
value named with its key and fix, and check-config showing where secrets are, never them."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.config import Config, FleetConfig, load_config, render_effective
from broker.errors import ConfigError, ConfigProblem

pytestmark = pytest.mark.timeout(10)

PASSWORD = "r3dis-PASSWORD-value"
FLEET_KEY = bytes(range(40))
OLD_KEY = bytes(range(50, 90))
OLDER_KEY = bytes(range(100, 140))

BASE = """\
[cloud]
name = "AzureCloud"

[identity.main]
tenant_id = "t"
client_id = "11111111-0000-0000-0000-000000000001"
client_secret_env = "SECRET"

[[service]]
name = "aml"
kind = "entra"
scope = "https://ml.azure.com/.default"

[fleet]
"""
ON = 'enabled = true\nredis_url = "redis://127.0.0.1:6379/0"\nencryption_key_file = "fleet.key"\n'


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A directory with the files the tables below name: keys, a password, a CA."""
    for name, content, mode in [
        ("fleet.key", FLEET_KEY, 0o600),
        ("old.key", OLD_KEY, 0o600),
        ("older.key", OLDER_KEY, 0o600),
        ("creds/fleet-key-old", OLD_KEY, 0o400),
        ("short.key", b"k" * 31, 0o600),
        ("loose.key", FLEET_KEY, 0o644),
        ("redis-password", (PASSWORD + "\n").encode(), 0o600),
        ("ca.pem", b"-----BEGIN CERTIFICATE-----\nAA\n-----END CERTIFICATE-----\n", 0o644),
        ("creds/fleet-key", FLEET_KEY, 0o400),
        ("creds/redis-password", PASSWORD.encode(), 0o400),
    ]:
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content)
        path.chmod(mode)
    return tmp_path


def environ(workdir: Path) -> dict[str, str]:
    return {
        "SECRET": "s3cr3t-value",
        "REDIS_PASSWORD": PASSWORD,
        "CREDENTIALS_DIRECTORY": str(workdir / "creds"),
    }


def load(workdir: Path, fleet: str, mode: int = 0o644) -> Config:
    path = workdir / "broker.toml"
    path.write_text(BASE + fleet)
    path.chmod(mode)
    return load_config(path, environ=environ(workdir))


def only_problem(workdir: Path, fleet: str, mode: int = 0o644) -> ConfigProblem:
    with pytest.raises(ConfigError) as caught:
        load(workdir, fleet, mode)
    found = caught.value.problems
    assert len(found) == 1, [str(p) for p in found]
    return found[0]


def test_off_by_default_and_unchecked_while_off(workdir: Path) -> None:
    """Without `enabled = true` fleet mode is off, and its other keys wait unchecked."""
    assert load(workdir, "").fleet == FleetConfig()
    waiting = 'redis_url = "http://nope"\nencryption_key_file = "missing.key"\n'
    assert load(workdir, waiting).fleet == FleetConfig()
    assert "[fleet]" not in render_effective(load(workdir, waiting))


def test_every_key_is_read(workdir: Path) -> None:
    """A full table loads into the frozen FleetConfig, secrets read from their files."""
    config = load(
        workdir,
        'enabled = true\nredis_url = "rediss://redis.internal:6380/2"\nca_file = "ca.pem"\n'
        'username = "broker"\npassword_file = "redis-password"\nkey_prefix = "prod:"\n'
        'encryption_key_file = "fleet.key"\nlease_s = 12\nconnect_timeout_s = 0.5\n'
        "command_timeout_s = 0.25\n",
    ).fleet
    assert config.enabled and config.redis_url == "rediss://redis.internal:6380/2"
    assert config.ca_file == workdir / "ca.pem" and config.username == "broker"
    assert config.password is not None and config.password.reveal() == PASSWORD
    assert config.password_source == f"file {workdir / 'redis-password'}"
    assert config.encryption_key is not None and config.encryption_key.reveal() == FLEET_KEY
    assert config.key_source == f"file {workdir / 'fleet.key'}"
    assert (config.key_prefix, config.lease_s) == ("prod:", 12.0)
    assert (config.connect_timeout_s, config.command_timeout_s) == (0.5, 0.25)


def test_defaults_when_enabled(workdir: Path) -> None:
    """Enabled with only a URL and a key: no user, no password, the documented timings."""
    config = load(workdir, ON).fleet
    assert config.username is None and config.password is None
    assert (config.key_prefix, config.lease_s) == ("token-broker:", 30.0)
    assert (config.connect_timeout_s, config.command_timeout_s) == (2.0, 1.0)


@pytest.mark.parametrize(
    ("password", "source"),
    [
        ('password_env = "REDIS_PASSWORD"', "env REDIS_PASSWORD"),
        ('password_credential = "redis-password"', "systemd credential redis-password"),
    ],
)
def test_password_from_environment_or_systemd_credential(
    workdir: Path, password: str, source: str
) -> None:
    """The Redis password may come from an environment variable or a systemd credential."""
    config = load(workdir, ON + password + "\n").fleet
    assert config.password is not None and config.password.reveal() == PASSWORD
    assert config.password_source == source


def test_inline_password_in_a_private_file(workdir: Path) -> None:
    """An inline password is accepted in a file only its owner can read."""
    config = load(workdir, ON + f'password = "{PASSWORD}"\n', mode=0o600).fleet
    assert config.password is not None and config.password.reveal() == PASSWORD


def test_encryption_key_from_a_systemd_credential(workdir: Path) -> None:
    """The encryption key may be a systemd credential."""
    text = ON.replace(
        'encryption_key_file = "fleet.key"', 'encryption_key_credential = "fleet-key"'
    )
    config = load(workdir, text).fleet
    assert config.encryption_key is not None and config.encryption_key.reveal() == FLEET_KEY
    assert config.key_source == "systemd credential fleet-key"


def test_check_config_shows_where_secrets_are_never_them(workdir: Path) -> None:
    """check-config renders [fleet] with the password's and key's sources, never their values."""
    config = load(workdir, ON + 'username = "broker"\npassword_env = "REDIS_PASSWORD"\n')
    text = render_effective(config)
    assert PASSWORD not in text and FLEET_KEY.hex() not in text
    assert PASSWORD not in repr(config)
    fleet = tomllib.loads(text)["fleet"]
    assert fleet == {
        "enabled": True,
        "redis_url": "redis://127.0.0.1:6379/0",
        "username": "broker",
        "password": "env REDIS_PASSWORD",
        "key_prefix": "token-broker:",
        "encryption_key": f"file {workdir / 'fleet.key'}",
        "lease_s": 30.0,
        "connect_timeout_s": 2.0,
        "command_timeout_s": 1.0,
    }


def test_previous_keys_from_files_and_systemd_credentials(workdir: Path) -> None:
    """Keys being rolled are read from files and systemd credentials, in order, and
    check-config shows where each is, never its bytes."""
    text = ON + (
        'previous_encryption_key_files = ["old.key", "older.key"]\n'
        'previous_encryption_key_credentials = ["fleet-key-old"]\n'
    )
    config = load(workdir, text)
    fleet = config.fleet
    assert [key.reveal() for key in fleet.previous_keys] == [OLD_KEY, OLDER_KEY, OLD_KEY]
    sources = (
        f"file {workdir / 'old.key'}",
        f"file {workdir / 'older.key'}",
        "systemd credential fleet-key-old",
    )
    assert fleet.previous_key_sources == sources
    rendered = render_effective(config)
    assert tomllib.loads(rendered)["fleet"]["previous_encryption_keys"] == list(sources)
    for key in (FLEET_KEY, OLD_KEY, OLDER_KEY):
        assert key.hex() not in rendered and repr(key) not in repr(config)


def test_no_previous_keys_by_default(workdir: Path) -> None:
    """Without a key being rolled there are none, and check-config shows no such key."""
    config = load(workdir, ON)
    assert config.fleet.previous_keys == () == config.fleet.previous_key_sources
    assert "previous_encryption_keys" not in render_effective(config)


def _on(**changes: str) -> str:
    """ON with some of its lines changed (a value of "" removes the key)."""
    lines = dict(line.split(" = ", 1) for line in ON.splitlines())
    lines.update(changes)
    return "".join(f"{k} = {v}\n" for k, v in lines.items() if v)


@pytest.mark.parametrize(
    ("fleet", "key", "phrases"),
    [
        pytest.param(
            _on(redis_url=""), "fleet.redis_url", ['missing required key "redis_url"'], id="no-url"
        ),
        pytest.param(
            _on(redis_url='"http://redis:6379"'),
            "fleet.redis_url",
            ["must start with redis://, rediss:// (TLS) or unix://", '"http://"'],
            id="http-url",
        ),
        pytest.param(
            _on(redis_url=f'"redis://:{PASSWORD}@redis:6379"'),
            "fleet.redis_url",
            ["holds a password", "password_file", "password_env", "password_credential"],
            id="password-in-url",
        ),
        pytest.param(
            _on(redis_url=f'"redis://broker:{PASSWORD}@redis:6379"'),
            "fleet.redis_url",
            ["holds a password"],
            id="user-and-password-in-url",
        ),
        pytest.param(
            _on(redis_url='"redis://broker@redis:6379"'),
            "fleet.redis_url",
            ["holds a user name", 'username = "broker"'],
            id="user-in-url",
        ),
        pytest.param(
            _on(redis_url='"rediss://redis:6380?ssl_cert_reqs=none"'),
            "fleet.redis_url",
            ["options after ? or #", "[fleet] keys"],
            id="url-options",
        ),
        pytest.param(
            _on(redis_url='"redis://redis:port"'),
            "fleet.redis_url",
            ["is not a URL"],
            id="bad-port",
        ),
        pytest.param(
            _on(redis_url='"redis:///0"'), "fleet.redis_url", ["has no host"], id="no-host"
        ),
        pytest.param(
            _on(redis_url='"redis://redis:6379/cache"'),
            "fleet.redis_url",
            ["must be a database number such as /0", '"/cache"'],
            id="bad-database",
        ),
        pytest.param(
            _on(redis_url='"unix://run/redis.sock"'),
            "fleet.redis_url",
            ["needs the socket's absolute path", "unix:///run/redis/redis.sock"],
            id="relative-socket",
        ),
        pytest.param(
            _on(ca_file='"ca.pem"'),
            "fleet.ca_file",
            ["only used with a rediss:// redis_url"],
            id="ca-without-tls",
        ),
        pytest.param(
            _on(redis_url='"rediss://redis:6380"', ca_file='"nope.pem"'),
            "fleet.ca_file",
            ["No such file or directory"],
            id="ca-missing",
        ),
        pytest.param(
            _on(username='"two words"'),
            "fleet.username",
            ["a Redis ACL user name without spaces"],
            id="username-spaces",
        ),
        pytest.param(
            _on(password=f'"{PASSWORD}"'),
            "fleet.password",
            [
                "password is written inline",
                "mode 0644",
                "chmod 600",
                "password_file, password_env or password_credential",
            ],
            id="inline-password-in-a-readable-file",
        ),
        pytest.param(
            _on(password_file='"redis-password"', password_env='"REDIS_PASSWORD"'),
            "fleet.password_env",
            ["password_file and password_env are both set", "keep one of them"],
            id="two-passwords",
        ),
        pytest.param(
            _on(password_env='"UNSET_VARIABLE"'),
            "fleet.password_env",
            ["environment variable UNSET_VARIABLE is not set", "Redis password"],
            id="password-env-unset",
        ),
        pytest.param(
            _on(password_env=f'"{PASSWORD}-!"'),
            "fleet.password_env",
            ["not an environment variable name", "not the Redis password itself"],
            id="password-pasted-as-variable",
        ),
        pytest.param(
            _on(password_file='"nope"'),
            "fleet.password_file",
            ["No such file or directory"],
            id="password-file-missing",
        ),
        pytest.param(
            _on(password_credential='"../redis-password"'),
            "fleet.password_credential",
            ["must be a credential name, not a path", "password_file"],
            id="password-credential-path",
        ),
        pytest.param(
            _on(encryption_key_file=""),
            "fleet",
            ["fleet mode is enabled but has no encryption key", "head -c 32 /dev/urandom"],
            id="no-key",
        ),
        pytest.param(
            _on(encryption_key_credential='"fleet-key"'),
            "fleet.encryption_key_credential",
            ["encryption_key_file and encryption_key_credential are both set"],
            id="two-keys",
        ),
        pytest.param(
            _on(encryption_key='"0123456789abcdef0123456789abcdef"'),
            "fleet.encryption_key",
            ["never reads the fleet's encryption key from its configuration file"],
            id="inline-key",
        ),
        pytest.param(
            _on(encryption_key_file='"short.key"'),
            "fleet.encryption_key_file",
            ["holds 31 bytes; a fleet encryption key needs at least 32"],
            id="short-key",
        ),
        pytest.param(
            _on(encryption_key_file='"loose.key"'),
            "fleet.encryption_key_file",
            ["has mode 0644: other users could read the key", "chmod 600"],
            id="readable-key",
        ),
        pytest.param(
            _on(encryption_key_file='"nope.key"'),
            "fleet.encryption_key_file",
            ["No such file or directory"],
            id="missing-key",
        ),
        pytest.param(
            _on(previous_encryption_key_files='["old.key", "short.key"]'),
            "fleet.previous_encryption_key_files[2]",
            ["holds 31 bytes; a fleet encryption key needs at least 32", "being rolled"],
            id="short-previous-key",
        ),
        pytest.param(
            _on(previous_encryption_key_files='["loose.key"]'),
            "fleet.previous_encryption_key_files[1]",
            ["has mode 0644: other users could read the key", "chmod 600"],
            id="readable-previous-key",
        ),
        pytest.param(
            _on(previous_encryption_key_files='["nope.key"]'),
            "fleet.previous_encryption_key_files[1]",
            ["No such file or directory"],
            id="missing-previous-key",
        ),
        pytest.param(
            _on(previous_encryption_key_files='"old.key"'),
            "fleet.previous_encryption_key_files",
            ["expected an array, got a string", '["/etc/token-broker/old.key"]'],
            id="previous-key-not-an-array",
        ),
        pytest.param(
            _on(previous_encryption_key_files="[1]"),
            "fleet.previous_encryption_key_files[1]",
            ["expected the path of a key file"],
            id="previous-key-not-a-path",
        ),
        pytest.param(
            _on(previous_encryption_key_credentials='["a/b"]'),
            "fleet.previous_encryption_key_credentials",
            ["must be a credential name, not a path"],
            id="previous-credential-a-path",
        ),
        pytest.param(
            _on(key_prefix='"a b"'),
            "fleet.key_prefix",
            ["printable ASCII characters without spaces or braces"],
            id="prefix-space",
        ),
        pytest.param(
            _on(key_prefix='"tb:{x}"'),
            "fleet.key_prefix",
            ["without spaces or braces", "{hash tag}"],
            id="prefix-braces",
        ),
        pytest.param(
            _on(lease_s="0"), "fleet.lease_s", ["lease_s must be more than zero"], id="lease-zero"
        ),
        pytest.param(
            _on(connect_timeout_s="-1"),
            "fleet.connect_timeout_s",
            ["connect_timeout_s must be more than zero"],
            id="connect-negative",
        ),
        pytest.param(
            _on(lease_s="2", command_timeout_s="2"),
            "fleet.command_timeout_s",
            ["command_timeout_s (2) must be less than lease_s (2)"],
            id="command-not-below-lease",
        ),
        pytest.param(_on(lease="30"), "fleet.lease", ['did you mean "lease_s"?'], id="unknown-key"),
        pytest.param(
            _on(enabled='"yes"'),
            "fleet.enabled",
            ["expected a boolean"],
            id="enabled-quoted",
        ),
    ],
)
def test_each_mistake_names_its_key_and_fix(
    workdir: Path, fleet: str, key: str, phrases: list[str]
) -> None:
    """Every broken [fleet] value gives one problem naming the file, its key and the fix."""
    problem = only_problem(workdir, fleet)
    shown = str(problem)
    assert problem.key == key, shown
    assert problem.file == str(workdir / "broker.toml") and problem.line is not None
    for phrase in phrases:
        assert phrase in shown, shown
    assert PASSWORD not in shown


BROKER_UID = 10001  # the image's user, and the pod's runAsGroup and fsGroup
SYSTEM_PYTHON = Path("/usr/bin/python3")
REPO = Path(__file__).resolve().parents[2]
SAME_PYTHON = SYSTEM_PYTHON.exists() and subprocess.run(
    [str(SYSTEM_PYTHON), "-c", "import sys; print(sys.version_info[:2])"],
    capture_output=True,
    text=True,
    check=False,
).stdout.strip() == str(sys.version_info[:2])

LOAD_AS_BROKER = """
import sys
from pathlib import Path
from broker.config import load_config
from broker.errors import ConfigError
try:
    load_config(Path(sys.argv[1]), environ={"SECRET": "s"})
except ConfigError as exc:
    print("; ".join(str(p) for p in exc.problems))
else:
    print("loaded")
"""


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory any user may enter, for a broker run as another user."""
    path = Path(tempfile.mkdtemp(prefix="tb-keys-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def load_as_broker(directory: Path, owner: int, group: int, mode: int) -> str:
    """Load a [fleet] whose key file has that owner, group and mode, as the user 10001
    (group 10001) a container runs the broker as; "loaded" or the problems."""
    key = directory / "fleet.key"
    key.write_bytes(FLEET_KEY)
    os.chown(key, owner, group)
    key.chmod(mode)
    config = directory / "broker.toml"
    config.write_text(BASE + ON)
    config.chmod(0o644)
    # The venv's interpreter may live under /root, which another user cannot enter: the
    # system's Python of the same minor version runs with the venv's packages instead.
    packages = [p for p in sys.path if p.endswith("site-packages")]
    with _traversable(REPO, *map(Path, packages)):
        return _run_as_broker(config, packages, directory)


@contextlib.contextmanager
def _traversable(*places: Path) -> Iterator[None]:
    """Let others read `places` (Python's importer lists a path entry) and pass through the
    directories above them for the test's length, as a clone in a private temporary
    directory would not; restored after."""
    changed: list[tuple[Path, int]] = []
    for place in places:
        for directory in (place, *place.parents):
            wanted = stat.S_IXOTH | (stat.S_IROTH if directory == place else 0)
            mode = stat.S_IMODE(directory.stat().st_mode)
            if mode & wanted != wanted and directory not in dict(changed):
                changed.append((directory, mode))
                directory.chmod(mode | wanted)
    try:
        yield
    finally:
        for directory, mode in changed:
            directory.chmod(mode)


def _run_as_broker(config: Path, packages: list[str], directory: Path) -> str:
    return subprocess.run(
        [str(SYSTEM_PYTHON), "-c", LOAD_AS_BROKER, str(config)],
        user=BROKER_UID,
        group=BROKER_UID,
        extra_groups=[],
        env={"PYTHONPATH": os.pathsep.join([str(REPO), *packages])},
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
        cwd=directory,
    ).stdout.strip()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to root and another group needs root")
@pytest.mark.skipif(not SAME_PYTHON, reason="needs /usr/bin/python3 of this Python's version")
@pytest.mark.parametrize(
    ("owner", "group", "mode", "loaded"),
    [
        pytest.param(0, BROKER_UID, 0o440, True, id="kubernetes-secret-0440"),
        pytest.param(0, BROKER_UID, 0o640, True, id="root-and-the-brokers-group-0640"),
        pytest.param(BROKER_UID, BROKER_UID, 0o400, True, id="the-brokers-own-0400"),
        pytest.param(0, BROKER_UID, 0o460, False, id="group-may-write"),
        pytest.param(0, BROKER_UID + 1, 0o444, False, id="others-may-read"),
        pytest.param(BROKER_UID + 1, BROKER_UID, 0o440, False, id="another-owner"),
        pytest.param(BROKER_UID, BROKER_UID, 0o640, False, id="the-brokers-own-0640"),
    ],
)
def test_a_key_only_root_and_the_brokers_group_may_read_is_accepted(
    shared_dir: Path, owner: int, group: int, mode: int, loaded: bool
) -> None:
    """A key file owned by root that only the broker's own group may read besides (what a
    Kubernetes Secret volume gives with the pod's fsGroup) is the broker's alone; any other
    access by a group or by others is refused with the mode and the fix."""
    said = load_as_broker(shared_dir, owner, group, mode)
    if loaded:
        assert said == "loaded", said
    else:
        assert f"has mode {mode:04o}" in said and "chmod 600" in said and "fsGroup" in said, said


def test_a_broker_running_as_root_trusts_no_group(workdir: Path) -> None:
    """A broker running as root refuses a key its group may read: root's group vouches for
    nobody (and a key owned by its own user needs no group)."""
    (workdir / "group.key").write_bytes(FLEET_KEY)
    (workdir / "group.key").chmod(0o440)
    problem = only_problem(workdir, _on(encryption_key_file='"group.key"'))
    assert "has mode 0440" in str(problem)
