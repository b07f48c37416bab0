"""The configuration loader: valid files freeze into objects, broken ones explain themselves."""

from __future__ import annotations

import grp
import hashlib
import pwd
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType

import pytest

from broker.config import (
    CLOUDS,
    DEFAULT_CACHE_PATH,
    DEFAULT_SOCKET_PATH,
    CacheConfig,
    Config,
    ListenConfig,
    LogConfig,
    RefreshConfig,
    Secret,
    SecretBytes,
    WebServiceConfig,
    hash_api_key,
    load_config,
    render_effective,
)
from broker.errors import ConfigError, ConfigProblem

pytestmark = pytest.mark.timeout(10)

SECRET = "s3cr3t-VALUE-xyz"
SCORER_KEY = "tbk_scorer-KEY-0123456789abcdefghijklmnopqrstuv"
ROOT_USER = pwd.getpwuid(0).pw_name
ROOT_GROUP = grp.getgrgid(0).gr_name
PASSWORD = "p4ssw0rd-VALUE-abc"
CACHE_KEY = bytes(range(256))[::7] + b"\n\xff"  # raw bytes: not text, newline kept
CREDENTIAL_KEY = b"c2VjcmV0LWNhY2hlLWtleS1mb3ItdGVzdHMtMDEyMzQ1Njc4OQ=="
PEM = (
    "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    "-----BEGIN CERTIFICATE-----\nBBBB\n-----END CERTIFICATE-----\n"
)

IDENTITY = """
[identity.main]
tenant_id = "00000000-0000-0000-0000-000000000001"
client_id = "11111111-0000-0000-0000-000000000001"
client_secret_file = "sp"
"""

SERVICE = """
[[service]]
name = "fraud"
subscription_id = "sub-1"
resource_group = "rg"
workspace = "ws"
web_service = "fraud-svc"
"""

MINIMAL = IDENTITY + SERVICE

CACHE_ON = '[cache]\nenabled = true\npath = "state/cache.bin"\n'  # a key source to be added

FULL = (
    (
        """
[listen]
max_connections = 32
idle_timeout_s = 2.5
max_header_bytes = 1024
max_body_bytes = 0

[listen.unix]
enabled = true
path = "run/broker.sock"
mode = "0640"
owner = "ROOT-USER"
group = 2000

[listen.tcp]
enabled = true
host = "::1"
port = 0

[log]
format = "json"
level = "debug"

[cloud]
name = "custom"
authority_host = "https://127.0.0.1:8443"
resource_manager = "https://127.0.0.1:8443"
region_api = "https://127.0.0.1:8443/regions/{region}"
ca_bundle = "ca.pem"

[refresh]
margin_s = 5
jitter_s = 0
lifetime_fraction = 0.75
key_interval_s = 600
clock_skew_s = 2.5
retry_min_s = 0.5
retry_max_s = 60
timeout_s = 10
max_concurrency = 2
client_refresh_window_s = 0

[cache]
enabled = true
path = "state/cache.bin"
key_file = "cache.key"

[identity.main]
tenant_id = "00000000-0000-0000-0000-000000000001"
client_id = "11111111-0000-0000-0000-000000000001"
client_secret_file = "sp"

[identity.env]
tenant_id = "contoso.onmicrosoft.com"
client_id = "c-env"
client_secret_env = "SP_SECRET"

[identity.systemd]
tenant_id = "t"
client_id = "c-systemd"
client_secret_credential = "client-secret"

[identity.cert]
tenant_id = "t"
client_id = "c-cert"
certificate_file = "cert.pem"
certificate_password_env = "CERT_PASSWORD"

[identity."work load"]
tenant_id = "t"
client_id = "c-federated"
federated_token_file = "$AZURE_FEDERATED_TOKEN_FILE"

[api_key.scorer]
sha256 = "SCORER-DIGEST"

[api_key."batch.v2"]  # defined, used by no service: allowed
sha256 = "BATCH-DIGEST"

[[service]]
name = "fraud"
identity = "main"
subscription_id = "sub-1"
resource_group = "rg"
workspace = "ws"
web_service = "fraud-svc"
region = "eastus"
auth = "token"
allow_users = ["ROOT-USER", 1001, 0]
allow_groups = ["ROOT-GROUP", 2000]
api_keys = ["scorer"]

[[service]]
name = "churn.v2"
identity = "work load"
subscription_id = "sub-1"
resource_group = "rg"
workspace = "ws"
web_service = "churn-svc"
auth = "key"
allow_users = []
"""
    )
    .replace("ROOT-USER", ROOT_USER)
    .replace("ROOT-GROUP", ROOT_GROUP)
)
FULL = FULL.replace("SCORER-DIGEST", hash_api_key(SCORER_KEY))
FULL = FULL.replace("BATCH-DIGEST", hashlib.sha256(b"batch").hexdigest())


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A directory holding every file the configurations below name."""
    (tmp_path / "sp").write_text(SECRET + "\n")
    (tmp_path / "empty").write_text("  \n")
    (tmp_path / "latin1").write_bytes(b"s3cr\xe9t\n")
    (tmp_path / "cert.pem").write_text(PEM)
    (tmp_path / "cert.pfx").write_bytes(b"\x30\x82binary")
    (tmp_path / "key-only.pem").write_text(PEM.split("-----BEGIN CERTIFICATE")[0])
    (tmp_path / "password").write_text(PASSWORD)
    (tmp_path / "ca.pem").write_text(PEM)
    (tmp_path / "token").write_text("eyJhbGciOi.fake.jwt")
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "client-secret").write_text(SECRET)
    (tmp_path / "adir").mkdir()
    (tmp_path / "state").mkdir()
    for name, content, mode in [
        ("cache.key", CACHE_KEY, 0o600),
        ("short.key", b"x" * 31, 0o600),
        ("loose.key", CACHE_KEY, 0o640),
        ("creds/cache-key", CREDENTIAL_KEY, 0o400),
    ]:
        (tmp_path / name).write_bytes(content)
        (tmp_path / name).chmod(mode)
    return tmp_path


def environment(workdir: Path, **overrides: str | None) -> dict[str, str]:
    """The default environment of these tests, with some variables changed or removed."""
    env: dict[str, str | None] = {
        "SP_SECRET": SECRET,
        "CERT_PASSWORD": PASSWORD,
        "CREDENTIALS_DIRECTORY": str(workdir / "creds"),
        "AZURE_FEDERATED_TOKEN_FILE": str(workdir / "token"),
    }
    env.update(overrides)
    return {name: value for name, value in env.items() if value is not None}


def write(workdir: Path, text: str, mode: int = 0o644) -> Path:
    """The configuration file, with `mode` whatever the umask (it decides inline secrets)."""
    path = workdir / "broker.toml"
    path.write_text(text)
    path.chmod(mode)
    return path


def load(workdir: Path, text: str, environ: Mapping[str, str] | None = None) -> Config:
    env = environment(workdir) if environ is None else environ
    return load_config(write(workdir, text), environ=env)


def problems(
    workdir: Path, text: str, environ: Mapping[str, str] | None = None
) -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as caught:
        load(workdir, text, environ)
    return caught.value.problems


def only_problem(
    workdir: Path, text: str, environ: Mapping[str, str] | None = None
) -> ConfigProblem:
    found = problems(workdir, text, environ)
    assert len(found) == 1, [str(p) for p in found]
    return found[0]


# -- valid files ---------------------------------------------------------------------------


def test_full_file_loads_every_section(workdir: Path) -> None:
    """A file using every section and every credential kind loads into the expected objects."""
    config = load(workdir, FULL)

    assert config.listen.unix.path == workdir / "run" / "broker.sock"
    assert config.listen.unix.mode == 0o640
    assert (config.listen.unix.owner, config.listen.unix.group) == (0, 2000)
    assert (config.listen.max_connections, config.listen.idle_timeout_s) == (32, 2.5)
    assert (config.listen.max_header_bytes, config.listen.max_body_bytes) == (1024, 0)
    assert (config.listen.tcp.host, config.listen.tcp.port) == ("::1", 0)
    assert config.log == LogConfig("json", "debug")
    assert config.cloud.name == "custom"
    assert config.cloud.region_base("westeurope") == "https://127.0.0.1:8443/regions/westeurope"
    assert config.cloud.ca_bundle == workdir / "ca.pem"
    assert config.refresh.clock_skew_s == 2.5
    assert config.refresh.jitter_s == 0.0
    assert config.refresh.max_concurrency == 2 and config.refresh.client_refresh_window_s == 0.0
    assert config.cache == CacheConfig(
        True,
        workdir / "state" / "cache.bin",
        SecretBytes(CACHE_KEY),
        f"file {workdir / 'cache.key'}",
    )
    assert list(config.identities) == ["main", "env", "systemd", "cert", "work load"]
    assert [s.name for s in config.services] == ["fraud", "churn.v2"]
    assert config.service("churn.v2") is config.services[1]
    assert config.services[1].identity == "work load"
    fraud, churn = config.services
    assert isinstance(fraud, WebServiceConfig) and isinstance(churn, WebServiceConfig)
    assert churn.region is None
    assert fraud.region == "eastus"
    assert config.services[0].allow_users == (0, 1001)  # root by name and by id: once
    assert config.services[0].allow_groups == (0, 2000)
    assert config.services[0].api_keys == ("scorer",)
    assert config.services[1].allow_users == config.services[1].allow_groups == ()
    assert config.services[1].api_keys == ()
    assert list(config.api_keys) == ["scorer", "batch.v2"]
    assert config.api_keys["scorer"].name == "scorer"
    assert config.api_keys["scorer"].sha256 == hashlib.sha256(SCORER_KEY.encode()).digest()


def test_credential_kinds_are_read_from_their_sources(workdir: Path) -> None:
    """Each credential source yields the right kind, secret and human description."""
    ids = load(workdir, FULL).identities

    assert ids["main"].kind == "secret"
    assert ids["main"].client_secret == Secret(SECRET)  # trailing newline stripped
    assert ids["main"].secret_source == f"file {workdir / 'sp'}"
    assert ids["env"].client_secret == Secret(SECRET)
    assert ids["env"].secret_source == "env SP_SECRET"
    assert ids["systemd"].client_secret == Secret(SECRET)
    assert ids["systemd"].secret_source == "systemd credential client-secret"
    assert ids["cert"].kind == "certificate"
    assert ids["cert"].certificate_file == workdir / "cert.pem"
    assert ids["cert"].certificate_password == Secret(PASSWORD)
    assert ids["cert"].client_secret is None
    assert ids["work load"].kind == "federated"
    assert ids["work load"].federated_token_file == workdir / "token"
    assert ids["work load"].client_secret is None


def test_rendered_configuration_parses_back_without_secrets(workdir: Path) -> None:
    """render_effective gives TOML that tomllib reads back, in section order, with no secret."""
    config = load(workdir, FULL)
    text = render_effective(config)
    parsed = tomllib.loads(text)

    assert SECRET not in text and PASSWORD not in text
    assert hash_api_key(SCORER_KEY) not in text and SCORER_KEY not in text
    assert list(parsed) == [
        *("listen", "log", "cloud", "refresh", "cache", "identity", "api_key", "service"),
        "proxy",
    ]
    assert parsed["listen"]["unix"]["mode"] == "0640"
    assert (parsed["listen"]["unix"]["owner"], parsed["listen"]["unix"]["group"]) == (0, 2000)
    assert {k: v for k, v in parsed["listen"].items() if k not in ("unix", "tcp")} == {
        "max_connections": 32,
        "idle_timeout_s": 2.5,
        "max_header_bytes": 1024,
        "max_body_bytes": 0,
        "max_streams": 16,  # by default half of max_connections, up to 128
        "stream_max_age_s": 3600.0,
        "watch_heartbeat_s": 15.0,
        "tcp_share": 0.5,
        "uid_share": 0.25,
        "front_door": True,
    }
    assert parsed["api_key"] == {
        "scorer": {"sha256": "********"},
        "batch.v2": {"sha256": "********"},
    }
    assert parsed["service"][0]["allow_users"] == [0, 1001]
    assert parsed["service"][0]["allow_groups"] == [0, 2000]
    assert parsed["service"][0]["api_keys"] == ["scorer"]
    assert parsed["service"][1]["allow_users"] == parsed["service"][1]["api_keys"] == []
    assert parsed["refresh"]["lifetime_fraction"] == 0.75
    assert parsed["refresh"]["max_concurrency"] == 2
    assert parsed["cache"] == {
        "enabled": True,
        "path": str(workdir / "state" / "cache.bin"),
        "key": f"file {workdir / 'cache.key'}",
    }
    assert parsed["identity"]["main"]["credential"] == f"file {workdir / 'sp'}"
    assert parsed["identity"]["main"]["client_secret"] == "********"
    assert parsed["identity"]["cert"]["certificate_password"] == "********"
    assert "region" not in parsed["service"][1]
    assert [s["name"] for s in parsed["service"]] == ["fraud", "churn.v2"]


def test_defaults_fill_every_absent_section(workdir: Path) -> None:
    """A file with one identity and one service gets every other setting from the defaults."""
    path = write(workdir, MINIMAL)
    config = load_config(path, environ={})

    assert config.path == path
    assert config.listen == ListenConfig()
    assert config.listen.unix.path == DEFAULT_SOCKET_PATH
    assert config.log == LogConfig()
    assert config.refresh == RefreshConfig()
    assert config.cache == CacheConfig(False, DEFAULT_CACHE_PATH)
    assert config.cloud == CLOUDS["AzureCloud"]
    (service,) = config.services
    assert isinstance(service, WebServiceConfig)
    assert service.auth == "auto"
    assert config.services[0].allow_users == config.services[0].allow_groups == ()
    assert config.services[0].api_keys == ()
    assert config.api_keys == {} and isinstance(config.api_keys, MappingProxyType)
    parsed = tomllib.loads(render_effective(config))
    assert parsed["listen"]["tcp"] == {"enabled": True, "host": "127.0.0.1", "port": 8765}
    assert parsed["listen"]["unix"] == {
        "enabled": True,
        "path": str(DEFAULT_SOCKET_PATH),
        "mode": "0660",
    }
    assert parsed["listen"]["max_connections"] == 256 and parsed["listen"]["idle_timeout_s"] == 10.0
    assert parsed["listen"]["max_header_bytes"] == 8190
    assert parsed["listen"]["max_body_bytes"] == 65536
    assert "api_key" not in parsed
    assert parsed["cloud"]["authority_host"] == "https://login.microsoftonline.com"
    assert parsed["refresh"]["max_concurrency"] == 4  # an integer, not 4.0
    assert parsed["cache"] == {"enabled": False, "path": str(DEFAULT_CACHE_PATH)}


def test_service_identity_may_be_omitted_when_there_is_one(workdir: Path) -> None:
    """With a single identity, a service without identity = uses it."""
    assert load(workdir, MINIMAL).services[0].identity == "main"


def test_identities_are_an_immutable_mapping(workdir: Path) -> None:
    """Config.identities is a read-only mapping, so no layer can change who we are."""
    identities = load(workdir, MINIMAL).identities

    assert isinstance(identities, MappingProxyType)
    with pytest.raises(TypeError):
        identities["x"] = identities["main"]  # type: ignore[index]


@pytest.mark.parametrize("name", list(CLOUDS))
def test_each_named_cloud_selects_its_hosts(workdir: Path, name: str) -> None:
    """Every built-in cloud name selects that cloud's profile."""
    config = load(workdir, f'[cloud]\nname = "{name}"\n' + MINIMAL)
    assert config.cloud == CLOUDS[name]


@pytest.mark.parametrize(
    ("written", "mode"),
    [
        ('"0660"', 0o660),
        ('"660"', 0o660),
        ('"0o600"', 0o600),
        ('"0600"', 0o600),
        ("0o640", 0o640),
        ('"0"', 0),
    ],
)
def test_socket_mode_accepts_octal_strings_and_octal_integers(
    workdir: Path, written: str, mode: int
) -> None:
    """The socket mode is read as octal, whether quoted digits or a TOML 0o integer."""
    config = load(workdir, f"[listen.unix]\nmode = {written}\n" + MINIMAL)
    assert config.listen.unix.mode == mode


@pytest.mark.parametrize(
    ("written", "phrase"),
    [
        ('"0666"', "lets other users use the socket"),
        ('"0661"', "lets other users use the socket"),
        ('"0770"', "sets execute bits"),
        ("660", "TOML reads it as the decimal 660"),
        ('"4660"', "not a permission mode"),
        ('"rw-rw----"', 'expected an octal permission mode such as "0660"'),
        ("true", "got a boolean"),
    ],
)
def test_socket_mode_refuses_unsafe_or_unreadable_modes(
    workdir: Path, written: str, phrase: str
) -> None:
    """A mode that opens the socket to others, sets odd bits, or is not octal is refused."""
    problem = only_problem(workdir, f"[listen.unix]\nmode = {written}\n" + MINIMAL)
    assert problem.key == "listen.unix.mode"
    assert phrase in problem.message


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "localhost"])
def test_loopback_hosts_are_accepted(workdir: Path, host: str) -> None:
    """Loopback literals and localhost are valid TCP hosts."""
    assert load(workdir, f'[listen.tcp]\nhost = "{host}"\n' + MINIMAL).listen.tcp.host == host


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "example.com", "[::1]"])
def test_non_loopback_hosts_are_refused(workdir: Path, host: str) -> None:
    """The TCP listener never binds beyond loopback, because it serves live credentials."""
    problem = only_problem(workdir, f'[listen.tcp]\nhost = "{host}"\n' + MINIMAL)
    assert problem.key == "listen.tcp.host"
    assert "serves live credentials" in problem.message
    assert "127.0.0.1" in problem.fix


def test_certificate_may_be_pfx_with_password_file(workdir: Path) -> None:
    """A .pfx certificate is accepted as is, and its password can come from a file."""
    text = IDENTITY.replace('client_secret_file = "sp"', 'certificate_file = "cert.pfx"\n')
    text += 'certificate_password_file = "password"\n' + SERVICE
    identity = load(workdir, text).identities["main"]
    assert identity.certificate_password == Secret(PASSWORD)
    assert identity.secret_source.endswith("password from file " + str(workdir / "password"))


@pytest.mark.parametrize(
    "reference", ["$AZURE_FEDERATED_TOKEN_FILE", "${AZURE_FEDERATED_TOKEN_FILE}"]
)
def test_federated_token_file_may_come_from_the_environment(workdir: Path, reference: str) -> None:
    """The federated token file may be given as $AZURE_FEDERATED_TOKEN_FILE, as AKS sets it."""
    text = with_identity(f'federated_token_file = "{reference}"\n')
    identity = load(workdir, text).identities["main"]
    assert identity.federated_token_file == workdir / "token"
    assert identity.secret_source == f"federated token file {workdir / 'token'}"


@pytest.mark.parametrize("braces", [False, True])
def test_tenant_and_client_ids_may_come_from_workload_identity(workdir: Path, braces: bool) -> None:
    """With Azure workload identity, tenant_id and client_id may name the variables the
    webhook injects, so the manifest does not repeat the IDs."""
    tenant, client = "$AZURE_TENANT_ID", "$AZURE_CLIENT_ID"
    if braces:
        tenant, client = "${AZURE_TENANT_ID}", "${AZURE_CLIENT_ID}"
    text = MINIMAL.replace(
        'tenant_id = "00000000-0000-0000-0000-000000000001"', f'tenant_id = "{tenant}"'
    ).replace('client_id = "11111111-0000-0000-0000-000000000001"', f'client_id = "{client}"')
    env = environment(workdir) | {"AZURE_TENANT_ID": "contoso.example", "AZURE_CLIENT_ID": "c-wi"}
    identity = load(workdir, text, env).identities["main"]
    assert (identity.tenant_id, identity.client_id) == ("contoso.example", "c-wi")


@pytest.mark.parametrize("key", ["tenant_id", "client_id"])
def test_unset_workload_identity_variable_is_explained(workdir: Path, key: str) -> None:
    """`$AZURE_TENANT_ID` with the variable unset is one problem naming it, not two."""
    variable = {"tenant_id": "AZURE_TENANT_ID", "client_id": "AZURE_CLIENT_ID"}[key]
    value = {
        "tenant_id": "00000000-0000-0000-0000-000000000001",
        "client_id": "11111111-0000-0000-0000-000000000001",
    }[key]
    text = MINIMAL.replace(f'{key} = "{value}"', f'{key} = "${variable}"')
    problem = only_problem(workdir, text)
    assert problem.key == f"identity.main.{key}"
    assert f"${variable}, which is not set" in problem.message
    assert "workload identity" in problem.fix


def test_relative_paths_are_taken_from_the_config_files_directory(workdir: Path) -> None:
    """A relative path in the file means the same wherever the broker is started from."""
    config = load(workdir, MINIMAL)
    assert config.identities["main"].secret_source == f"file {workdir / 'sp'}"


def with_credential_key() -> str:
    """MINIMAL with the cache enabled and its key in the systemd credential cache-key."""
    return CACHE_ON + 'key_credential = "cache-key"\n' + MINIMAL


def test_cache_key_may_be_a_systemd_credential(workdir: Path) -> None:
    """key_credential reads the key from $CREDENTIALS_DIRECTORY, byte for byte."""
    config = load(workdir, with_credential_key())
    assert config.cache.key is not None and config.cache.key.reveal() == CREDENTIAL_KEY
    assert config.cache.key_source == "systemd credential cache-key"
    assert config.cache.path == workdir / "state" / "cache.bin"


def test_disabled_cache_leaves_its_other_keys_unchecked(workdir: Path) -> None:
    """With enabled = false, a missing key file or directory is no problem yet."""
    text = '[cache]\nenabled = false\npath = "nope/cache.bin"\nkey_file = "nope"\n' + MINIMAL
    config = load(workdir, text)
    assert config.cache == CacheConfig(False, workdir / "nope" / "cache.bin")


def test_cache_key_never_shows(workdir: Path) -> None:
    """The cache key appears in no repr and no rendering, only where it came from."""
    config = load(workdir, FULL)
    shown = repr(config) + str(config.cache.key) + render_effective(config)
    assert "cache.key" in shown
    assert repr(CACHE_KEY) not in shown and CACHE_KEY.hex() not in shown
    assert "c2VjcmV0" not in render_effective(load(workdir, with_credential_key()))


# -- broken files --------------------------------------------------------------------------


def with_identity(lines: str) -> str:
    """MINIMAL with the main identity's credential replaced by `lines`."""
    return IDENTITY.replace('client_secret_file = "sp"\n', lines) + SERVICE


def with_service(lines: str) -> str:
    """MINIMAL with `lines` added to the service table."""
    return MINIMAL + lines


CUSTOM = """
[cloud]
name = "custom"
authority_host = "https://127.0.0.1:8443"
resource_manager = "https://127.0.0.1:8443"
region_api = "https://127.0.0.1:8443/regions/{region}"
"""

SECOND_IDENTITY = (
    '\n[identity.other]\ntenant_id = "t"\nclient_id = "c"\nclient_secret_file = "sp"\n'
)


def with_api_key(lines: str, name: str = "scorer") -> str:
    """MINIMAL with an [api_key.NAME] table holding `lines`."""
    return MINIMAL + f"\n[api_key.{name}]\n" + lines


DIGEST = hashlib.sha256(b"key").hexdigest()

LISTEN_LIMIT_CASES = [
    # (id, TOML text, expected key, a phrase of the message or fix)
    (
        "max-connections-zero",
        "[listen]\nmax_connections = 0\n" + MINIMAL,
        "listen.max_connections",
        "max_connections must be 1 or more, got 0",
    ),
    (
        "max-connections-quoted",
        '[listen]\nmax_connections = "64"\n' + MINIMAL,
        "listen.max_connections",
        "write max_connections = 64 without quotes",
    ),
    (
        "idle-timeout-zero",
        "[listen]\nidle_timeout_s = 0\n" + MINIMAL,
        "listen.idle_timeout_s",
        "idle_timeout_s must be more than zero, got 0",
    ),
    (
        "idle-timeout-negative",
        "[listen]\nidle_timeout_s = -1.5\n" + MINIMAL,
        "listen.idle_timeout_s",
        "more than zero",
    ),
    (
        "idle-timeout-infinite",
        "[listen]\nidle_timeout_s = inf\n" + MINIMAL,
        "listen.idle_timeout_s",
        "finite",
    ),
    (
        "max-header-small",
        "[listen]\nmax_header_bytes = 1023\n" + MINIMAL,
        "listen.max_header_bytes",
        "max_header_bytes must be from 1024 to 65536, got 1023",
    ),
    (
        "max-header-large",
        "[listen]\nmax_header_bytes = 65537\n" + MINIMAL,
        "listen.max_header_bytes",
        "from 1024 to 65536",
    ),
    (
        "max-body-negative",
        "[listen]\nmax_body_bytes = -1\n" + MINIMAL,
        "listen.max_body_bytes",
        "max_body_bytes must be 0 or more, got -1",
    ),
    (
        "max-body-fraction",
        "[listen]\nmax_body_bytes = 1.5\n" + MINIMAL,
        "listen.max_body_bytes",
        "expected an integer, got a number (1.5)",
    ),
    (
        "listen-unknown-limit",
        "[listen]\nmax_conections = 5\n" + MINIMAL,
        "listen.max_conections",
        'did you mean "max_connections"?',
    ),
]

UNKNOWN_NAME = "no-such-account-x7q"

ACCOUNT_CASES = [
    (
        "owner-unknown",
        f'[listen.unix]\nowner = "{UNKNOWN_NAME}"\n' + MINIMAL,
        "listen.unix.owner",
        f'no user named "{UNKNOWN_NAME}" on this machine — create the user or use a numeric id',
    ),
    (
        "group-unknown",
        f'[listen.unix]\ngroup = "{UNKNOWN_NAME}"\n' + MINIMAL,
        "listen.unix.group",
        f'no group named "{UNKNOWN_NAME}" on this machine — create the group or use a numeric id',
    ),
    (
        "owner-negative",
        "[listen.unix]\nowner = -1\n" + MINIMAL,
        "listen.unix.owner",
        "owner must be a user id from 0 to 4294967294, got -1",
    ),
    (
        "group-too-large",
        "[listen.unix]\ngroup = 4294967295\n" + MINIMAL,
        "listen.unix.group",
        "from 0 to 4294967294",
    ),
    (
        "owner-quoted-id",
        '[listen.unix]\nowner = "987654"\n' + MINIMAL,
        "listen.unix.owner",
        "write it without quotes (987654) if it is a numeric id",
    ),
    (
        "owner-empty",
        '[listen.unix]\nowner = ""\n' + MINIMAL,
        "listen.unix.owner",
        "expected a user name or a numeric id, got an empty string",
    ),
    (
        "group-boolean",
        "[listen.unix]\ngroup = true\n" + MINIMAL,
        "listen.unix.group",
        "expected a group name or a numeric id, got a boolean (true)",
    ),
    (
        "allow-users-not-an-array",
        with_service(f'allow_users = "{ROOT_USER}"\n'),
        "service[1].allow_users",
        f'expected an array, got a string ("{ROOT_USER}") — write allow_users = ["alice", 1001]',
    ),
    (
        "allow-users-element-type",
        with_service(f'allow_users = ["{ROOT_USER}", 1.5]\n'),
        "service[1].allow_users[2]",
        "expected a user name or a numeric id, got a number (1.5)",
    ),
    (
        "allow-users-unknown",
        with_service(f'allow_users = [0, "{UNKNOWN_NAME}"]\n'),
        "service[1].allow_users[2]",
        f'no user named "{UNKNOWN_NAME}"',
    ),
    (
        "allow-users-negative",
        with_service("allow_users = [-5]\n"),
        "service[1].allow_users[1]",
        "allow_users[1] must be a user id from 0 to 4294967294, got -5",
    ),
    (
        "allow-groups-unknown",
        with_service(f'allow_groups = ["{UNKNOWN_NAME}"]\n'),
        "service[1].allow_groups[1]",
        "create the group or use a numeric id",
    ),
    (
        "allow-groups-table",
        with_service("allow_groups = [{ name = 'x' }]\n"),
        "service[1].allow_groups[1]",
        "expected a group name or a numeric id, got a table",
    ),
]

API_KEY_CASES = [
    (
        "service-api-key-unknown",
        with_api_key(f'sha256 = "{DIGEST}"\n', "scorer")
        + SERVICE.replace("fraud", "b")
        + 'api_keys = ["scorer", "socrer"]\n',
        "service[2].api_keys[2]",
        'no API key named "socrer" — define [api_key.socrer] or use one of the defined API '
        "keys: scorer",
    ),
    (
        "service-api-key-none-defined",
        with_service('api_keys = ["scorer"]\n'),
        "service[1].api_keys[1]",
        "defined API keys: none is defined",
    ),
    (
        "service-api-key-not-a-name",
        with_api_key(f'sha256 = "{DIGEST}"\n') + SERVICE.replace("fraud", "b") + "api_keys = [1]\n",
        "service[2].api_keys[1]",
        "expected the name of an [api_key.NAME] table, got an integer (1)",
    ),
    (
        "service-api-keys-not-an-array",
        with_service('api_keys = "scorer"\n'),
        "service[1].api_keys",
        'write api_keys = ["scorer"]',
    ),
    (
        "api-key-raw-key-as-digest",
        with_api_key('sha256 = "correct-horse-battery-staple"\n'),
        "api_key.scorer.sha256",
        "this is not a SHA-256 hex digest (64 characters 0-9 a-f) — store the digest, never "
        "the key: `printf %s KEY | sha256sum`",
    ),
    (
        "api-key-generated-key-as-digest",
        with_api_key(f'sha256 = "{SCORER_KEY}"\n'),
        "api_key.scorer.sha256",
        "this is an API key, not its SHA-256 hex digest",
    ),
    (
        "api-key-short-digest",
        with_api_key(f'sha256 = "{DIGEST[:63]}"\n'),
        "api_key.scorer.sha256",
        "not a SHA-256 hex digest",
    ),
    (
        "api-key-sha256sum-line",
        with_api_key(f'sha256 = "{DIGEST}  -"\n'),
        "api_key.scorer.sha256",
        "not a SHA-256 hex digest",
    ),
    (
        "api-key-uppercase",
        with_api_key(f'sha256 = "{DIGEST.upper()}"\n'),
        "api_key.scorer.sha256",
        "the digest has capital letters — write it in lowercase",
    ),
    (
        "api-key-digest-not-a-string",
        with_api_key("sha256 = 12345\n"),
        "api_key.scorer.sha256",
        "expected a string of 64 hex digits, got an integer",
    ),
    (
        "api-key-missing-digest",
        with_api_key(""),
        "api_key.scorer",
        'missing required key "sha256"',
    ),
    (
        "api-key-inline-key",
        with_api_key(f'sha256 = "{DIGEST}"\nkey = "{SCORER_KEY}"\n'),
        "api_key.scorer.key",
        "never reads an API key from its configuration file",
    ),
    (
        "api-key-bad-name",
        with_api_key(f'sha256 = "{DIGEST}"\n', '"score r"'),
        "api_key.score r",
        "use 1 to 64 letters, digits",
    ),
    (
        "api-key-named-like-a-key",
        with_api_key(f'sha256 = "{DIGEST}"\n', SCORER_KEY),
        "api_key",
        "named with what looks like an API key",
    ),
    (
        "api-key-without-name",
        MINIMAL + f'\n[api_key]\nsha256 = "{DIGEST}"\n',
        "api_key.sha256",
        "write [api_key.NAME]",
    ),
    (
        "api-key-same-digest",
        with_api_key(f'sha256 = "{DIGEST}"\n', "a") + f'\n[api_key.b]\nsha256 = "{DIGEST}"\n',
        "api_key.b.sha256",
        "the same digest as [api_key.a] — give each client its own key",
    ),
]

BROKEN = [
    # (id, TOML text, expected key, a phrase of the message or fix)
    ("unknown-key", "[listen.tcp]\nprot = 1\n" + MINIMAL, "listen.tcp.prot", 'unknown key "prot"'),
    ("unknown-table", "[servce]\n" + MINIMAL, "servce", 'did you mean "service"?'),
    ("unknown-service-key", with_service("wrkspace = 1\n"), "service[1].wrkspace", "workspace"),
    (
        "port-as-string",
        '[listen.tcp]\nport = "8765"\n' + MINIMAL,
        "listen.tcp.port",
        'expected an integer, got a string ("8765") — write port = 8765 without quotes',
    ),
    (
        "port-out-of-range",
        "[listen.tcp]\nport = 70000\n" + MINIMAL,
        "listen.tcp.port",
        "0 to 65535",
    ),
    (
        "enabled-as-string",
        '[listen.unix]\nenabled = "true"\n' + MINIMAL,
        "listen.unix.enabled",
        "write enabled = true without quotes",
    ),
    ("listen-not-a-table", "listen = 1\n" + MINIMAL, "listen", "expected a table"),
    (
        "no-listener",
        "[listen.unix]\nenabled = false\n[listen.tcp]\nenabled = false\n" + MINIMAL,
        "listen",
        "both listeners are disabled",
    ),
    ("log-format", '[log]\nformat = "jsno"\n' + MINIMAL, "log.format", 'did you mean "json"?'),
    ("log-level", '[log]\nlevel = "verbose"\n' + MINIMAL, "log.level", "debug, info, warning"),
    (
        "cloud-name",
        '[cloud]\nname = "azurecloud"\n' + MINIMAL,
        "cloud.name",
        'did you mean "AzureCloud"?',
    ),
    (
        "host-without-custom",
        '[cloud]\nauthority_host = "https://x"\n' + MINIMAL,
        "cloud.authority_host",
        'only used with name = "custom"',
    ),
    (
        "custom-missing-host",
        CUSTOM.replace('region_api = "https://127.0.0.1:8443/regions/{region}"', "") + MINIMAL,
        "cloud.region_api",
        'missing required key "region_api"',
    ),
    (
        "custom-http",
        CUSTOM.replace('authority_host = "https', 'authority_host = "http') + MINIMAL,
        "cloud.authority_host",
        "must be an https:// URL",
    ),
    (
        "custom-no-region",
        CUSTOM.replace("/regions/{region}", "/regions") + MINIMAL,
        "cloud.region_api",
        'must contain "{region}"',
    ),
    (
        "custom-bad-braces",
        CUSTOM.replace("/regions/{region}", "/{region}/{zone}") + MINIMAL,
        "cloud.region_api",
        "no other braces",
    ),
    (
        "custom-ca-missing",
        CUSTOM + 'ca_bundle = "nope.pem"\n' + MINIMAL,
        "cloud.ca_bundle",
        "No such file or directory",
    ),
    (
        "refresh-negative",
        "[refresh]\nmargin_s = -1\n" + MINIMAL,
        "refresh.margin_s",
        "zero or more",
    ),
    (
        "refresh-zero-timeout",
        "[refresh]\ntimeout_s = 0\n" + MINIMAL,
        "refresh.timeout_s",
        "more than zero",
    ),
    (
        "refresh-fraction",
        "[refresh]\nlifetime_fraction = 1\n" + MINIMAL,
        "refresh.lifetime_fraction",
        "between 0 and 1",
    ),
    (
        "refresh-retry-order",
        "[refresh]\nretry_min_s = 10\nretry_max_s = 5\n" + MINIMAL,
        "refresh.retry_max_s",
        "less than retry_min_s",
    ),
    (
        "refresh-quoted",
        '[refresh]\ntimeout_s = "30"\n' + MINIMAL,
        "refresh.timeout_s",
        "write timeout_s = 30 without quotes",
    ),
    (
        "refresh-infinite",
        "[refresh]\nkey_interval_s = inf\n" + MINIMAL,
        "refresh.key_interval_s",
        "finite",
    ),
    (
        "refresh-bool",
        "[refresh]\njitter_s = true\n" + MINIMAL,
        "refresh.jitter_s",
        "expected a number, got a boolean",
    ),
    (
        "refresh-concurrency-zero",
        "[refresh]\nmax_concurrency = 0\n" + MINIMAL,
        "refresh.max_concurrency",
        "must be 1 or more, got 0",
    ),
    (
        "refresh-concurrency-fraction",
        "[refresh]\nmax_concurrency = 2.5\n" + MINIMAL,
        "refresh.max_concurrency",
        "expected an integer, got a number (2.5)",
    ),
    (
        "refresh-concurrency-quoted",
        '[refresh]\nmax_concurrency = "4"\n' + MINIMAL,
        "refresh.max_concurrency",
        "write max_concurrency = 4 without quotes",
    ),
    (
        "refresh-window-negative",
        "[refresh]\nclient_refresh_window_s = -1\n" + MINIMAL,
        "refresh.client_refresh_window_s",
        "zero or more",
    ),
    (
        "cache-unknown-key",
        "[cache]\nenabeld = true\n" + MINIMAL,
        "cache.enabeld",
        'did you mean "enabled"?',
    ),
    (
        "cache-inline-key",
        CACHE_ON + 'key_file = "cache.key"\nkey = "0123456789abcdef"\n' + MINIMAL,
        "cache.key",
        "never reads the cache key from its configuration file",
    ),
    (
        "cache-enabled-quoted",
        '[cache]\nenabled = "true"\n' + MINIMAL,
        "cache.enabled",
        "write enabled = true without quotes",
    ),
    (
        "cache-without-key",
        CACHE_ON + MINIMAL,
        "cache",
        "head -c 32 /dev/urandom > /etc/token-broker/cache.key && chmod 600",
    ),
    (
        "cache-two-keys",
        CACHE_ON + 'key_file = "cache.key"\nkey_credential = "cache-key"\n' + MINIMAL,
        "cache.key_credential",
        "key_file and key_credential are both set",
    ),
    (
        "cache-key-missing",
        CACHE_ON + 'key_file = "nope.key"\n' + MINIMAL,
        "cache.key_file",
        "No such file or directory",
    ),
    (
        "cache-key-directory",
        CACHE_ON + 'key_file = "adir"\n' + MINIMAL,
        "cache.key_file",
        "not a regular file",
    ),
    (
        "cache-key-blank-path",
        CACHE_ON + 'key_file = ""\n' + MINIMAL,
        "cache.key_file",
        "key_file is empty",
    ),
    (
        "cache-key-short",
        CACHE_ON + 'key_file = "short.key"\n' + MINIMAL,
        "cache.key_file",
        "holds 31 bytes; a cache key needs at least 32",
    ),
    (
        "cache-key-readable-by-group",
        CACHE_ON + 'key_file = "loose.key"\n' + MINIMAL,
        "cache.key_file",
        "has mode 0640: other users could read the key",
    ),
    (
        "cache-credential-path",
        CACHE_ON + 'key_credential = "../cache.key"\n' + MINIMAL,
        "cache.key_credential",
        "must be a credential name, not a path",
    ),
    (
        "cache-credential-missing",
        CACHE_ON + 'key_credential = "other"\n' + MINIMAL,
        "cache.key_credential",
        "No such file or directory",
    ),
    (
        "cache-credential-empty",
        CACHE_ON + 'key_credential = ""\n' + MINIMAL,
        "cache.key_credential",
        "key_credential is empty",
    ),
    (
        "cache-directory-missing",
        '[cache]\nenabled = true\npath = "nope/cache.bin"\nkey_file = "cache.key"\n' + MINIMAL,
        "cache.path",
        "the cache's directory",
    ),
    (
        "cache-path-is-a-directory",
        '[cache]\nenabled = true\npath = "adir"\nkey_file = "cache.key"\n' + MINIMAL,
        "cache.path",
        "is a directory",
    ),
    (
        "tenant-missing",
        MINIMAL.replace('tenant_id = "00000000-0000-0000-0000-000000000001"\n', ""),
        "identity.main.tenant_id",
        'missing required key "tenant_id"',
    ),
    (
        "tenant-odd",
        MINIMAL.replace('"00000000-0000-0000-0000-000000000001"', '"a/b"'),
        "identity.main.tenant_id",
        "not a tenant ID",
    ),
    (
        "client-empty",
        MINIMAL.replace('"11111111-0000-0000-0000-000000000001"', '""'),
        "identity.main.client_id",
        "client_id is empty",
    ),
    (
        "client-as-number",
        MINIMAL.replace('"11111111-0000-0000-0000-000000000001"', "42"),
        "identity.main.client_id",
        'write client_id = "42" with quotes',
    ),
    (
        "two-credentials",
        with_identity('client_secret_file = "sp"\ncertificate_file = "cert.pem"\n'),
        "identity.main.certificate_file",
        "client_secret_file and certificate_file are both set",
    ),
    ("no-credential", with_identity(""), "identity.main", "no credential is set"),
    (
        "inline-secret-in-a-readable-file",
        with_identity(f'client_secret = "{SECRET}"\n'),
        "identity.main.client_secret",
        "which has mode 0644: other users can read it — chmod 600 ",
    ),
    (
        "inline-secret-fix",
        with_identity(f'client_secret = "{SECRET}"\n'),
        "identity.main.client_secret",
        "or move the secret to client_secret_file, client_secret_env or client_secret_credential",
    ),
    (
        "inline-password-in-a-readable-file",
        with_identity(f'certificate_file = "cert.pem"\ncertificate_password = "{PASSWORD}"\n'),
        "identity.main.certificate_password",
        "mode 0644: other users can read it — chmod 600 ",
    ),
    (
        "password-without-cert",
        with_identity('client_secret_file = "sp"\ncertificate_password_env = "CERT_PASSWORD"\n'),
        "identity.main.certificate_password_env",
        "only used with certificate_file",
    ),
    (
        "two-passwords",
        with_identity(
            'certificate_file = "cert.pem"\n'
            'certificate_password_env = "CERT_PASSWORD"\ncertificate_password_file = "password"\n'
        ),
        "identity.main.certificate_password_env",
        "both set",
    ),
    (
        "secret-file-missing",
        with_identity('client_secret_file = "nope"\n'),
        "identity.main.client_secret_file",
        "No such file or directory",
    ),
    (
        "secret-file-empty",
        with_identity('client_secret_file = "empty"\n'),
        "identity.main.client_secret_file",
        "is empty",
    ),
    (
        "secret-file-directory",
        with_identity('client_secret_file = "adir"\n'),
        "identity.main.client_secret_file",
        "not a regular file",
    ),
    (
        "secret-path-nul",
        with_identity('client_secret_file = "s\\u0000p"\n'),
        "identity.main.client_secret_file",
        "the path is not valid",
    ),
    (
        "secret-file-not-utf8",
        with_identity('client_secret_file = "latin1"\n'),
        "identity.main.client_secret_file",
        "is not UTF-8 text",
    ),
    (
        "secret-file-blank-path",
        with_identity('client_secret_file = ""\n'),
        "identity.main.client_secret_file",
        "client_secret_file is empty",
    ),
    (
        "env-name-is-a-secret",
        with_identity(f'client_secret_env = "{SECRET}"\n'),
        "identity.main.client_secret_env",
        "not an environment variable name",
    ),
    (
        "env-unset",
        with_identity('client_secret_env = "NOT_THERE"\n'),
        "identity.main.client_secret_env",
        "environment variable NOT_THERE is not set",
    ),
    (
        "credential-path",
        with_identity('client_secret_credential = "../sp"\n'),
        "identity.main.client_secret_credential",
        "not a path",
    ),
    (
        "credential-missing",
        with_identity('client_secret_credential = "other"\n'),
        "identity.main.client_secret_credential",
        "No such file or directory",
    ),
    (
        "certificate-missing",
        with_identity('certificate_file = "nope.pem"\n'),
        "identity.main.certificate_file",
        "cannot read",
    ),
    (
        "certificate-without-cert",
        with_identity('certificate_file = "key-only.pem"\n'),
        "identity.main.certificate_file",
        "both a PEM private key and a PEM certificate",
    ),
    (
        "federated-missing",
        with_identity('federated_token_file = "nope"\n'),
        "identity.main.federated_token_file",
        "No such file or directory",
    ),
    (
        "identity-without-name",
        '[identity]\ntenant_id = "t"\n' + SERVICE,
        "identity.tenant_id",
        "write [identity.NAME]",
    ),
    ("no-identity", SERVICE, "identity", "no identity is defined"),
    ("no-service", IDENTITY, "service", "add a [[service]] table"),
    (
        "service-single-brackets",
        IDENTITY + SERVICE.replace("[[service]]", "[service]"),
        "service",
        "double brackets",
    ),
    (
        "service-missing-key",
        MINIMAL.replace('workspace = "ws"\n', ""),
        "service[1].workspace",
        'missing required key "workspace"',
    ),
    (
        "service-bad-name",
        MINIMAL.replace('name = "fraud"', 'name = "a/b"'),
        "service[1].name",
        "cannot be used in a URL",
    ),
    (
        "service-dots",
        MINIMAL.replace('name = "fraud"', 'name = ".."'),
        "service[1].name",
        "not only dots",
    ),
    (
        "service-duplicate",
        MINIMAL + SERVICE.replace("fraud-svc", "other-svc"),
        "service[2].name",
        'service name "fraud" is already used by service[1]',
    ),
    (
        "service-unknown-identity",
        with_service('identity = "nobody"\n'),
        "service[1].identity",
        "define [identity.nobody] or use one of: main",
    ),
    (
        "service-identity-ambiguous",
        MINIMAL + SECOND_IDENTITY,
        "service[1].identity",
        "one of: main, other",
    ),
    (
        "service-identity-not-a-string",
        IDENTITY + SECOND_IDENTITY + SERVICE + "identity = 1\n",
        "service[1].identity",
        "expected a string, got an integer (1)",
    ),
    ("service-auth", with_service('auth = "tokn"\n'), "service[1].auth", 'did you mean "token"?'),
    (
        "service-region",
        with_service('region = "East US"\n'),
        "service[1].region",
        "not an Azure region name",
    ),
    (
        "service-path-segment",
        MINIMAL.replace('resource_group = "rg"', 'resource_group = "rg/x"'),
        "service[1].resource_group",
        "cannot contain '/'",
    ),
    *LISTEN_LIMIT_CASES,
    *ACCOUNT_CASES,
    *API_KEY_CASES,
]


@pytest.mark.parametrize(
    ("text", "key", "phrase"), [pytest.param(*case[1:], id=case[0]) for case in BROKEN]
)
def test_broken_configuration_is_explained(workdir: Path, text: str, key: str, phrase: str) -> None:
    """Each kind of mistake yields exactly one problem, at the right key, saying what to do."""
    problem = only_problem(workdir, text)
    assert problem.key == key
    assert phrase in f"{problem.message} — {problem.fix}"
    assert problem.file == str(workdir / "broker.toml")
    assert problem.line is not None or key in ("identity", "service")


@pytest.mark.parametrize(
    ("env", "credential", "phrase"),
    [
        ({"SP_SECRET": None}, 'client_secret_env = "SP_SECRET"', "SP_SECRET is not set"),
        ({"SP_SECRET": ""}, 'client_secret_env = "SP_SECRET"', "SP_SECRET is empty"),
        (
            {"CREDENTIALS_DIRECTORY": None},
            'client_secret_credential = "client-secret"',
            "needs $CREDENTIALS_DIRECTORY, which is not set",
        ),
        (
            {"AZURE_FEDERATED_TOKEN_FILE": None},
            'federated_token_file = "$AZURE_FEDERATED_TOKEN_FILE"',
            "$AZURE_FEDERATED_TOKEN_FILE, which is not set",
        ),
        (
            {"CERT_PASSWORD": None},
            'certificate_file = "cert.pem"\ncertificate_password_env = "CERT_PASSWORD"',
            "CERT_PASSWORD is not set",
        ),
    ],
    ids=["env-unset", "env-empty", "no-credentials-directory", "no-federated-env", "no-password"],
)
def test_missing_environment_is_explained(
    workdir: Path, env: dict[str, str | None], credential: str, phrase: str
) -> None:
    """A credential that needs an absent environment variable is reported, naming it."""
    problem = only_problem(workdir, with_identity(credential + "\n"), environment(workdir, **env))
    assert problem.key.startswith("identity.main.")
    assert phrase in problem.message


def test_cache_credential_needs_the_credentials_directory(workdir: Path) -> None:
    """key_credential outside systemd (no $CREDENTIALS_DIRECTORY) says how to fix it."""
    env = environment(workdir, CREDENTIALS_DIRECTORY=None)
    problem = only_problem(workdir, with_credential_key(), env)
    assert problem.key == "cache.key_credential"
    assert "needs $CREDENTIALS_DIRECTORY" in problem.message
    assert "LoadCredential=cache-key:" in problem.fix and "key_file" in problem.fix


def test_unreadable_secret_file_gives_the_os_reason(workdir: Path) -> None:
    """A secret file the OS refuses to read is reported with the OS's reason. The refusal is
    real, for root too: a process's own memory is a regular file whose first page is not
    mapped, so reading it fails with EIO."""
    memory = "/proc/self/mem"
    text = MINIMAL.replace('client_secret_file = "sp"', f'client_secret_file = "{memory}"')
    assert text != MINIMAL
    problem = only_problem(workdir, text)
    assert problem.message == f"cannot read {memory}: Input/output error"


def test_several_problems_are_reported_together_in_file_order(workdir: Path) -> None:
    """One load reports every problem of the file at once, sorted by line."""
    text = '[listen.tcp]\nhost = "0.0.0.0"\nport = "x"\n' + with_service('auth = "no"\n')
    found = problems(workdir, text, environ={})

    assert [p.key for p in found] == ["listen.tcp.host", "listen.tcp.port", "service[1].auth"]
    assert [p.line for p in found] == [2, 3, text.splitlines().index('auth = "no"') + 1]


def test_unknown_key_line_number(workdir: Path) -> None:
    """An unknown key in a later table is placed on the line where it is written."""
    text = MINIMAL + SERVICE.replace("fraud", "b") + "regoin = 'eastus'\n"
    problem = only_problem(workdir, text)
    assert problem.key == "service[2].regoin"
    assert problem.line == text.splitlines().index("regoin = 'eastus'") + 1
    assert 'did you mean "region"?' in problem.fix


def test_missing_key_points_at_its_table_header(workdir: Path) -> None:
    """A missing required key is placed on the line of the table that should hold it."""
    text = "\n\n" + MINIMAL.replace('client_id = "11111111-0000-0000-0000-000000000001"\n', "")
    problem = only_problem(workdir, text)
    assert problem.key == "identity.main.client_id"
    assert problem.line == text.splitlines().index("[identity.main]") + 1


def test_syntax_error_gives_its_line(workdir: Path) -> None:
    """A TOML syntax error is one problem carrying the line tomllib reported."""
    problem = only_problem(workdir, '[log]\nlevel = "info"\nformat = json\n' + MINIMAL)
    assert problem.key == ""
    assert problem.line == 3
    assert problem.message.startswith("TOML syntax error: Invalid value")
    assert str(problem).startswith(f"{workdir / 'broker.toml'}:3: ")


def test_unterminated_string_points_at_the_end(workdir: Path) -> None:
    """A syntax error at the end of the document is placed on the last line."""
    problem = only_problem(workdir, MINIMAL + 'name = "open\n')
    assert problem.line == len((MINIMAL + 'name = "open\n').splitlines())


@pytest.mark.parametrize(
    ("make", "phrase", "fix"),
    [
        (lambda d: d / "absent.toml", "No such file or directory", "create it"),
        (lambda d: d / "adir", "not a regular file", "-c PATH"),
        (lambda d: _written(d / "latin1.toml", b"name = '\xe9'\n"), "not UTF-8 text", "UTF-8"),
    ],
    ids=["missing", "directory", "not-utf8"],
)
def test_unusable_config_file_is_one_problem(
    workdir: Path, make: Callable[[Path], Path], phrase: str, fix: str
) -> None:
    """A configuration file that is missing, not a file or not text is one keyless problem."""
    path = make(workdir)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    (problem,) = caught.value.problems
    assert (problem.key, problem.line) == ("", None)
    assert phrase in problem.message and fix in problem.fix
    assert problem.message.startswith(f"cannot read {path}")


def _written(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def test_no_problem_ever_shows_a_secret(workdir: Path) -> None:
    """Whatever goes wrong, no problem, message or rendering contains a secret's value."""
    text = (
        '[listen.tcp]\nhost = "0.0.0.0"\n'
        + IDENTITY.replace('client_secret_file = "sp"', f'client_secret = "{SECRET}"')
        + '\n[identity.b]\ntenant_id = "t"\nclient_id = "c"\n'
        + f'client_secret_env = "{SECRET}"\n'
        + '\n[identity.c]\ntenant_id = "t"\nclient_id = 5\nclient_secret_file = "sp"\n'
        + '\n[identity.d]\ntenant_id = "t"\nclient_id = "d"\nclient_secret_env = "SP_SECRET"\n'
        + '\n[identity.e]\ntenant_id = "t"\nclient_id = "e"\ncertificate_file = "cert.pem"\n'
        + f'certificate_password = "{PASSWORD}"\n'
        + f'\n[api_key.a]\nsha256 = "{SECRET}"\nkey = "{SECRET}"\n'
        + f'\n[api_key.b]\nsha256 = "{SCORER_KEY}"\n'
        + f'\n[api_key.{SCORER_KEY}]\nsha256 = "{SCORER_KEY}"\n'
        + SERVICE
        + f'api_keys = ["{SCORER_KEY}"]\n'
    )
    with pytest.raises(ConfigError) as caught:
        load(workdir, text)

    assert len(caught.value.problems) >= 10
    for secret in (SECRET, PASSWORD, SCORER_KEY):
        assert secret not in str(caught.value)
        assert secret not in repr(caught.value.problems)


def test_secret_never_shows_in_repr_of_the_loaded_config(workdir: Path) -> None:
    """Printing the loaded configuration or its rendering never reveals a secret."""
    config = load(workdir, FULL)
    assert SECRET not in repr(config) and PASSWORD not in repr(config)
    assert SECRET not in render_effective(config)


def test_problem_lines_follow_quoted_and_array_headers(workdir: Path) -> None:
    """Problems under a quoted table name or a later [[service]] land on their own lines."""
    text = FULL.replace('client_id = "c-federated"', "client_id = 7").replace(
        'auth = "key"', 'auth = "keys"'
    )
    found = problems(workdir, text)
    lines = text.splitlines()

    assert [(p.key, p.line) for p in found] == [
        ("identity.work load.client_id", lines.index("client_id = 7") + 1),
        ("service[2].auth", lines.index('auth = "keys"') + 1),
    ]
