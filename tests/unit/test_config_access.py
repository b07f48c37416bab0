"""Access control in the configuration: users, groups, API keys, and inline secrets."""

from __future__ import annotations

import grp
import hashlib
import pwd
import re
import tomllib
from pathlib import Path

import pytest

from broker.config import (
    ApiKey,
    Config,
    Secret,
    WebServiceConfig,
    hash_api_key,
    load_config,
    new_api_key,
    render_effective,
)
from broker.errors import ConfigError, ConfigProblem

pytestmark = pytest.mark.timeout(10)

SECRET = "inl1ne-SECRET-value-9z"
PASSWORD = "inl1ne-PASSWORD-value-8y"
ROOT_USER = pwd.getpwuid(0).pw_name
ROOT_GROUP = grp.getgrgid(0).gr_name
PEM = (
    "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    "-----BEGIN CERTIFICATE-----\nBBBB\n-----END CERTIFICATE-----\n"
)

IDENTITY = """
[identity.main]
tenant_id = "t"
client_id = "c"
"""

SERVICE = """
[[service]]
name = "fraud"
subscription_id = "sub-1"
resource_group = "rg"
workspace = "ws"
web_service = "fraud-svc"
"""


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A directory with a secret file and a PEM certificate beside the configuration."""
    (tmp_path / "sp").write_text("from-a-file\n")
    (tmp_path / "cert.pem").write_text(PEM)
    return tmp_path


def load(workdir: Path, text: str, mode: int) -> Config:
    path = workdir / "broker.toml"
    path.write_text(text)
    path.chmod(mode)
    return load_config(path, environ={})


def problems(workdir: Path, text: str, mode: int = 0o600) -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as caught:
        load(workdir, text, mode)
    return caught.value.problems


def only_problem(workdir: Path, text: str, mode: int = 0o600) -> ConfigProblem:
    found = problems(workdir, text, mode)
    assert len(found) == 1, [str(p) for p in found]
    return found[0]


def with_credential(lines: str) -> str:
    return IDENTITY + lines + SERVICE


# -- users and groups ----------------------------------------------------------------------


def test_socket_owner_and_group_resolve_names_and_keep_ids(workdir: Path) -> None:
    """owner and group take a name, resolved at load time, or a numeric id as it is."""
    text = f'[listen.unix]\nowner = "{ROOT_USER}"\ngroup = "{ROOT_GROUP}"\n'
    unix = load(workdir, text + with_credential('client_secret_file = "sp"\n'), 0o644).listen.unix
    assert (unix.owner, unix.group) == (0, 0)

    text = "[listen.unix]\nowner = 4242\ngroup = 0\n"
    unix = load(workdir, text + with_credential('client_secret_file = "sp"\n'), 0o644).listen.unix
    assert (unix.owner, unix.group) == (4242, 0)


def test_socket_owner_and_group_default_to_none(workdir: Path) -> None:
    """Without owner and group, the socket keeps the broker's own user and group."""
    config = load(workdir, with_credential('client_secret_file = "sp"\n'), 0o644)
    assert (config.listen.unix.owner, config.listen.unix.group) == (None, None)
    rendered = tomllib.loads(render_effective(config))["listen"]["unix"]
    assert "owner" not in rendered and "group" not in rendered


def test_service_allow_lists_resolve_names_in_order_without_repeats(workdir: Path) -> None:
    """allow_users and allow_groups mix names and ids; each id is kept once, first place."""
    text = with_credential('client_secret_file = "sp"\n') + (
        f'allow_users = [1001, "{ROOT_USER}", 0, 1001]\nallow_groups = ["{ROOT_GROUP}", 2000]\n'
    )
    service = load(workdir, text, 0o644).services[0]
    assert service.allow_users == (1001, 0)
    assert service.allow_groups == (0, 2000)


def test_empty_allow_lists_mean_no_restriction(workdir: Path) -> None:
    """Empty lists are valid and leave the service as open as one without them."""
    text = with_credential('client_secret_file = "sp"\n')
    empty = text + "allow_users = []\nallow_groups = []\napi_keys = []\n"
    assert load(workdir, empty, 0o644).services == load(workdir, text, 0o644).services


def test_a_service_built_without_access_fields_has_no_restrictions() -> None:
    """The access fields have defaults: a service built without them restricts no one."""
    service = WebServiceConfig(
        name="svc",
        identity="main",
        subscription_id="sub",
        resource_group="rg",
        workspace="ws",
        web_service="web",
        auth="key",
    )
    assert (service.allow_users, service.allow_groups, service.api_keys) == ((), (), ())


def test_every_bad_element_is_reported_at_its_index(workdir: Path) -> None:
    """Each wrong element of an allow list is its own problem, counted from 1."""
    text = with_credential('client_secret_file = "sp"\n') + (
        'allow_users = ["no-such-user-x7q", 0, true, "", -1]\n'
    )
    found = problems(workdir, text, 0o644)
    assert [p.key for p in found] == [
        "service[1].allow_users[1]",
        "service[1].allow_users[3]",
        "service[1].allow_users[4]",
        "service[1].allow_users[5]",
    ]
    line = text.splitlines().index('allow_users = ["no-such-user-x7q", 0, true, "", -1]') + 1
    assert {p.line for p in found} == {line}


# -- API keys ------------------------------------------------------------------------------


def test_new_api_keys_are_prefixed_random_and_url_safe() -> None:
    """new_api_key gives tbk_ and 43 URL-safe characters (256 bits), never the same twice."""
    keys = {new_api_key() for _ in range(50)}
    assert len(keys) == 50
    assert all(re.fullmatch(r"tbk_[A-Za-z0-9_-]{43}", key) for key in keys)


def test_hash_api_key_is_the_sha256_hex_digest() -> None:
    """hash_api_key matches `printf %s KEY | sha256sum`, the digest operators store."""
    assert hash_api_key("abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


def test_api_keys_load_as_raw_digests_in_file_order(workdir: Path) -> None:
    """[api_key.NAME] tables become ApiKeys in file order, each with the 32 digest bytes."""
    key = new_api_key()
    text = (
        with_credential('client_secret_file = "sp"\n')
        + 'api_keys = ["scorer", "scorer"]\n'
        + f'\n[api_key.scorer]\nsha256 = "{hash_api_key(key)}"\n'
        + f'\n[api_key.unused-one]\nsha256 = "{hash_api_key("other")}"\n'
    )
    config = load(workdir, text, 0o644)

    assert list(config.api_keys) == ["scorer", "unused-one"]
    assert config.api_keys["scorer"] == ApiKey("scorer", hashlib.sha256(key.encode()).digest())
    assert config.services[0].api_keys == ("scorer",)
    with pytest.raises(TypeError):
        config.api_keys["x"] = config.api_keys["scorer"]  # type: ignore[index]


def test_api_key_digest_never_shows(workdir: Path) -> None:
    """Neither repr nor check-config's rendering shows a key's digest."""
    digest = hash_api_key("k")
    text = with_credential('client_secret_file = "sp"\n') + f'\n[api_key.a]\nsha256 = "{digest}"\n'
    config = load(workdir, text, 0o644)
    shown = repr(config) + render_effective(config)
    assert digest not in shown and bytes.fromhex(digest).hex() not in shown
    assert repr(bytes.fromhex(digest)) not in shown
    assert tomllib.loads(render_effective(config))["api_key"] == {"a": {"sha256": "********"}}


def test_api_key_holds_exactly_a_sha256_digest() -> None:
    """An ApiKey built by hand with anything but 32 bytes is refused."""
    with pytest.raises(ValueError, match="32 bytes, not 31"):
        ApiKey("a", bytes(31))


# -- inline secrets ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700])
def test_inline_client_secret_is_accepted_in_a_private_file(workdir: Path, mode: int) -> None:
    """client_secret written in a file only its owner may read is a secret credential."""
    config = load(workdir, with_credential(f'client_secret = "{SECRET}"\n'), mode)
    identity = config.identities["main"]

    assert identity.kind == "secret"
    assert identity.client_secret == Secret(SECRET)
    assert identity.secret_source == f"inline in {workdir / 'broker.toml'} (mode {mode:04o})"
    text = render_effective(config)
    assert SECRET not in text and SECRET not in repr(config)
    assert tomllib.loads(text)["identity"]["main"]["client_secret"] == "********"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_inline_client_secret_is_refused_in_a_readable_file(workdir: Path, mode: int) -> None:
    """In a file others may read, client_secret is refused with the mode and the fix."""
    problem = only_problem(workdir, with_credential(f'client_secret = "{SECRET}"\n'), mode)
    path = workdir / "broker.toml"

    assert problem.key == "identity.main.client_secret"
    assert f"which has mode {mode:04o}" in problem.message
    assert problem.fix == (
        f"chmod 600 {path}, or move the secret to client_secret_file, client_secret_env "
        "or client_secret_credential"
    )
    assert SECRET not in str(problem)


def test_inline_secret_in_a_readable_file_is_refused_even_when_unused(workdir: Path) -> None:
    """A secret exposed in a readable file is reported even beside another credential."""
    text = with_credential(f'client_secret_file = "sp"\nclient_secret = "{SECRET}"\n')
    found = problems(workdir, text, 0o644)
    assert [p.key for p in found] == ["identity.main.client_secret"] * 2
    assert "mode 0644" in found[0].message
    assert "client_secret_file and client_secret are both set" in found[1].message


def test_inline_secret_counts_as_the_one_credential(workdir: Path) -> None:
    """An accepted inline secret beside another credential makes two, which is refused."""
    text = with_credential(f'certificate_file = "cert.pem"\nclient_secret = "{SECRET}"\n')
    problem = only_problem(workdir, text)
    assert problem.message == "certificate_file and client_secret are both set"


def test_inline_certificate_password_is_accepted_in_a_private_file(workdir: Path) -> None:
    """certificate_password may be written inline too, under the same rule."""
    text = with_credential(f'certificate_file = "cert.pem"\ncertificate_password = "{PASSWORD}"\n')
    identity = load(workdir, text, 0o600).identities["main"]

    assert identity.kind == "certificate"
    assert identity.certificate_password == Secret(PASSWORD)
    assert identity.secret_source == (
        f"certificate {workdir / 'cert.pem'}, password inline in {workdir / 'broker.toml'} "
        "(mode 0600)"
    )


def test_inline_certificate_password_is_refused_in_a_readable_file(workdir: Path) -> None:
    """In a readable file certificate_password is refused, pointing at the password keys."""
    text = with_credential(f'certificate_file = "cert.pem"\ncertificate_password = "{PASSWORD}"\n')
    problem = only_problem(workdir, text, 0o644)
    assert problem.key == "identity.main.certificate_password"
    assert "mode 0644" in problem.message
    assert "certificate_password_file or certificate_password_env" in problem.fix
    assert PASSWORD not in str(problem)


@pytest.mark.parametrize(
    ("lines", "key", "phrase"),
    [
        ("client_secret = 123456789\n", "client_secret", "expected a string, got an integer —"),
        ('client_secret = "  "\n', "client_secret", "client_secret is empty"),
        (
            'client_secret_file = "sp"\ncertificate_password = "p"\n',
            "certificate_password",
            "only used with certificate_file",
        ),
        (
            'certificate_file = "cert.pem"\ncertificate_password = "p"\n'
            'certificate_password_env = "X"\n',
            "certificate_password",
            "certificate_password_env and certificate_password are both set",
        ),
    ],
    ids=["not-a-string", "blank", "password-without-certificate", "two-passwords"],
)
def test_wrong_inline_secret_is_explained_without_its_value(
    workdir: Path, lines: str, key: str, phrase: str
) -> None:
    """A wrong inline secret is reported at its key, and its value is never shown."""
    problem = only_problem(workdir, with_credential(lines))
    assert problem.key == f"identity.main.{key}"
    assert phrase in f"{problem.message} — {problem.fix}"
    assert "123456789" not in str(problem)
