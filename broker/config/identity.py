"""The `[identity.NAME]` tables: who the broker signs in as, and where its secret lives.

Secrets are read here, once, at load time, into `Secret`s; a federated token file is only
checked, because the credential re-reads it on every sign-in. No problem ever quotes a
secret: file problems carry the OS's reason, never the content.

A secret written inline (`client_secret`, `certificate_password`) is accepted only while
the configuration file is private to its owner (mode 0600 or stricter); in any other file
it is refused, even when another credential makes it unused, because it is exposed there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from broker.config.model import IdentityConfig, Secret
from broker.config.reader import Sources, Table, kind_of, quote, systemd_credential

SECRET_KEYS = ("client_secret_file", "client_secret_env", "client_secret_credential")
CREDENTIAL_KEYS = (*SECRET_KEYS, "certificate_file", "federated_token_file", "client_secret")
PASSWORD_KEYS = ("certificate_password_file", "certificate_password_env", "certificate_password")
FEDERATED_ENV = "AZURE_FEDERATED_TOKEN_FILE"
TENANT_ENV = "AZURE_TENANT_ID"  # set, with the two below, by Azure workload identity
CLIENT_ENV = "AZURE_CLIENT_ID"
_FEDERATED_REFERENCES = (f"${FEDERATED_ENV}", f"${{{FEDERATED_ENV}}}")  # only these expand

_TENANT = re.compile(r"[A-Za-z0-9._-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class SecretKeys:
    """The keys of one secret: written `inline` (only in a private file), or in a file, an
    environment variable or a systemd credential named by `inline` + `_file`, `_env`,
    `_credential`. `what` names it in messages; `move_to` says where an exposed inline one
    belongs."""

    inline: str
    what: str
    move_to: str

    @property
    def file_key(self) -> str:
        return f"{self.inline}_file"


_CLIENT_SECRET = SecretKeys(
    "client_secret", "client secret", ", ".join(SECRET_KEYS[:-1]) + " or " + SECRET_KEYS[-1]
)
_CERTIFICATE_PASSWORD = SecretKeys(
    "certificate_password", "certificate password", " or ".join(PASSWORD_KEYS[:2])
)


def identities(root: Table, sources: Sources) -> dict[str, IdentityConfig]:
    """Every identity of the file, by name, in file order."""
    section = root.table("identity")
    found = section.tables("identities are named tables: write [identity.NAME] above their keys")
    if not section.data:
        root.problem(
            "identity",
            "no identity is defined",
            "add an [identity.NAME] table with tenant_id, client_id and one credential "
            f"({', '.join(CREDENTIAL_KEYS)})",
        )
    return {name: _identity(name, table, sources) for name, table in found}


def _identity(name: str, table: Table, sources: Sources) -> IdentityConfig:
    table.known("tenant_id", "client_id", *CREDENTIAL_KEYS, *PASSWORD_KEYS)
    for keys in (_CLIENT_SECRET, _CERTIFICATE_PASSWORD):
        if table.has(keys.inline):
            refuse_exposed_inline(table, keys, sources)
    tenant = _from_environment(table, "tenant_id", TENANT_ENV, sources)
    if tenant is None:
        tenant = table.required_text("tenant_id", "the Entra directory (tenant) ID, a GUID")
    if tenant and not _TENANT.fullmatch(tenant):
        table.problem(
            "tenant_id",
            f"tenant_id {quote(tenant)} is not a tenant ID or domain",
            "copy the Directory (tenant) ID of the app registration, a GUID",
        )
    client = _from_environment(table, "client_id", CLIENT_ENV, sources)
    if client is None:
        client = table.required_text("client_id", "the Application (client) ID of the principal")
    given = [key for key in CREDENTIAL_KEYS if table.has(key)]
    if len(given) != 1:
        table.problem(
            given[1] if given else None,
            f"{given[0]} and {given[1]} are both set" if given else "no credential is set",
            f"keep exactly one of {', '.join(CREDENTIAL_KEYS)}",
        )
        return IdentityConfig(name, tenant, client, "secret")
    if given[0] == "certificate_file":
        return _certificate(IdentityConfig(name, tenant, client, "certificate"), table, sources)
    for key in (k for k in PASSWORD_KEYS if table.has(k)):
        table.problem(key, f"{key} is only used with certificate_file", f"remove {key}")
    if given[0] == "federated_token_file":
        path = _federated_token_file(table, sources)
        source = f"federated token file {path}"
        return IdentityConfig(name, tenant, client, "federated", None, source, None, None, path)
    secret, source = read_secret(table, given[0], sources, _CLIENT_SECRET)
    return IdentityConfig(name, tenant, client, "secret", secret, source)


def _certificate(base: IdentityConfig, table: Table, sources: Sources) -> IdentityConfig:
    path = table.file_path("certificate_file", sources.base)
    content = table.readable("certificate_file", path) if path else None
    pem = path is not None and path.suffix.lower() not in (".pfx", ".p12")
    if pem and content is not None and not _is_key_and_certificate(content):
        table.problem(
            "certificate_file",
            f"{path} does not hold both a PEM private key and a PEM certificate",
            "give one PEM file with the key and the certificate (cat key.pem cert.pem), "
            "or a .pfx/.p12 file",
        )
    password, password_source = None, ""
    given = [key for key in PASSWORD_KEYS if table.has(key)]
    if len(given) > 1:
        table.problem(given[1], f"{given[0]} and {given[1]} are both set", "keep one of them")
    elif given:
        password, password_source = read_secret(table, given[0], sources, _CERTIFICATE_PASSWORD)
    if password_source and not password_source.startswith("inline"):
        password_source = f"from {password_source}"
    source = f"certificate {path}" + (f", password {password_source}" if password else "")
    return IdentityConfig(
        base.name,
        base.tenant_id,
        base.client_id,
        "certificate",
        secret_source=source,
        certificate_file=path,
        certificate_password=password,
    )


def _is_key_and_certificate(pem: bytes) -> bool:
    return b"PRIVATE KEY-----" in pem and b"-----BEGIN CERTIFICATE-----" in pem


def read_secret(
    table: Table, key: str, sources: Sources, keys: SecretKeys
) -> tuple[Secret | None, str]:
    """The secret `key` (one of `keys`) holds or points at, and where it was ("file /x",
    "env VAR", …)."""
    what = keys.what
    if key == keys.inline:
        return _inline_secret(table, key, what, sources)
    if key.endswith("_env"):
        return _secret_from_env(table, key, what, sources)
    if key.endswith("_file"):
        path = table.file_path(key, sources.base)
        return (_secret_from_file(table, key, what, path) if path else None), f"file {path}"
    name = table.required_text(key, "the name given to LoadCredential= in the systemd unit")
    path = systemd_credential(
        table, key, name, sources.environ, holds="secret", file_key=keys.file_key
    )
    if path is not None:
        return _secret_from_file(table, key, what, path), f"systemd credential {name}"
    return None, f"systemd credential {name}"


def _is_private(sources: Sources) -> bool:
    return not sources.file_mode & 0o077


def refuse_exposed_inline(table: Table, keys: SecretKeys, sources: Sources) -> None:
    """Report the inline secret of `keys` when the configuration file is not private."""
    mode = sources.file_mode
    if _is_private(sources):
        return
    table.problem(
        keys.inline,
        f"{keys.inline} is written inline in {sources.file}, which has mode {mode:04o}: "
        "other users can read it",
        f"chmod 600 {sources.file}, or move the secret to {keys.move_to}",
    )


def _inline_secret(
    table: Table, key: str, what: str, sources: Sources
) -> tuple[Secret | None, str]:
    """The secret written as `key` itself; its value is never described, even when wrong."""
    value = table.data[key]
    source = f"inline in {sources.file} (mode {sources.file_mode:04o})"
    if not isinstance(value, str):
        table.problem(
            key,
            f"expected a string, got {kind_of(value, show=False)}",
            f'write the {what} in quotes: {key} = "…"',
        )
        return None, source
    if not value.strip():
        table.problem(key, f"{key} is empty", f"write the {what} in quotes, or remove {key}")
        return None, source
    # the mode was checked, and any problem reported, before the credential was chosen
    return (Secret(value) if _is_private(sources) else None), source


def _secret_from_env(
    table: Table, key: str, what: str, sources: Sources
) -> tuple[Secret | None, str]:
    variable = table.required_text(key, "the name of an environment variable")
    if variable and not _ENV_NAME.fullmatch(variable):
        # not echoed: operators sometimes paste the secret itself where its variable belongs
        table.problem(
            key,
            f"{key} is not an environment variable name (letters, digits and _)",
            f"give the name of the variable that holds the {what}, not the {what} itself",
        )
        return None, "env"
    value = sources.environ.get(variable, "").rstrip()
    if value or not variable:
        return (Secret(value) if value else None), f"env {variable}"
    state = "is empty" if variable in sources.environ else "is not set"
    table.problem(
        key,
        f"environment variable {variable} {state}",
        f"set {variable} to the {what} in the broker's environment "
        "(systemd: EnvironmentFile=), or use a file",
    )
    return None, f"env {variable}"


def _secret_from_file(table: Table, key: str, what: str, path: Path) -> Secret | None:
    content = table.readable(key, path)
    if content is None:
        return None
    try:
        value = content.decode("utf-8").rstrip()
    except UnicodeDecodeError:
        table.problem(key, f"{path} is not UTF-8 text", f"write the {what} into it as plain text")
        return None
    if not value:
        table.problem(key, f"{path} is empty", f"write the {what} into it")
        return None
    return Secret(value)


def _from_environment(table: Table, key: str, variable: str, sources: Sources) -> str | None:
    """The value of `variable` when `key` is exactly `$variable` or `${variable}` (the only
    expansion there is), else None; a problem when that variable is not set."""
    if table.data.get(key) not in (f"${variable}", f"${{{variable}}}"):
        return None
    value = sources.environ.get(variable, "").strip()
    if not value:
        table.problem(
            key,
            f"{key} is ${variable}, which is not set",
            f"run in a pod with Azure workload identity enabled (it sets {variable}), "
            f"set {variable} in the broker's environment, or write the ID itself",
        )
        return ""
    return value


def _federated_token_file(table: Table, sources: Sources) -> Path | None:
    if table.data.get("federated_token_file") not in _FEDERATED_REFERENCES:
        path = table.file_path("federated_token_file", sources.base)
    elif value := sources.environ.get(FEDERATED_ENV, ""):
        path = sources.base / value
    else:
        table.problem(
            "federated_token_file",
            f"federated_token_file is ${FEDERATED_ENV}, which is not set",
            f"run in a pod with Azure workload identity enabled (it sets {FEDERATED_ENV}), "
            "or give the token file's path",
        )
        return None
    if path is not None:
        table.readable("federated_token_file", path)
    return path
