"""The configuration's frozen value objects and the built-in cloud profiles."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import ClassVar, Generic, Literal, TypeVar

from broker.models import fingerprint

DEFAULT_CONFIG_PATH = Path("/etc/token-broker/broker.toml")
DEFAULT_SOCKET_PATH = Path("/run/token-broker/broker.sock")
DEFAULT_TCP_HOST = "127.0.0.1"
DEFAULT_TCP_PORT = 8765
DEFAULT_CACHE_PATH = Path("/var/lib/token-broker/cache.bin")
API_KEY_DIGEST_BYTES = 32

AuthMode = Literal["auto", "token", "key"]
ServiceKind = Literal["azureml-webservice", "entra", "azureml-online-endpoint"]
LogFormat = Literal["auto", "json", "console"]
IdentityKind = Literal["secret", "certificate", "federated"]
SinkFormat = Literal["token", "header", "json"]
_V = TypeVar("_V", str, bytes)


class _Hidden(Generic[_V]):
    """A value that never shows itself in repr, str or format; `reveal()` gives it."""

    __slots__ = ("_value",)
    _value: _V
    _shown: ClassVar[str]

    def __init__(self, value: _V) -> None:
        self._value = value

    def reveal(self) -> _V:
        return self._value

    def __repr__(self) -> str:
        return self._shown

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _Hidden) and type(other) is type(self) and other._value == self._value
        )

    def __hash__(self) -> int:
        return hash(self._value)


class Secret(_Hidden[str]):
    """A secret string: a client secret, a password, a header's expected value."""

    __slots__ = ()
    _shown = "Secret('********')"


class SecretBytes(_Hidden[bytes]):
    """Secret bytes, such as a key file's raw content."""

    __slots__ = ()
    _shown = "SecretBytes(b'********')"


@dataclass(frozen=True, slots=True)
class UnixListener:
    enabled: bool = True
    path: Path = DEFAULT_SOCKET_PATH
    mode: int = 0o660
    owner: int | None = None  # uid to chown the socket to; None leaves the broker's own
    group: int | None = None  # gid to chown the socket to; None leaves the broker's own


@dataclass(frozen=True, slots=True)
class TcpListener:
    enabled: bool = True
    host: str = DEFAULT_TCP_HOST
    port: int = DEFAULT_TCP_PORT


@dataclass(frozen=True, slots=True)
class ListenConfig:
    """Both listeners, and the limits every connection to either of them is held to."""

    unix: UnixListener = field(default_factory=UnixListener)
    tcp: TcpListener = field(default_factory=TcpListener)
    max_connections: int = 256  # open connections accepted at once, both listeners together
    idle_timeout_s: float = 10.0  # silent or trickling connections are closed after this
    max_header_bytes: int = 8190  # longest request line, and longest header field
    max_body_bytes: int = 65536
    # Watch streams live for hours: they have a cap of their own below max_connections,
    # so that plain requests always keep max_connections - max_streams places.
    max_streams: int = 128
    stream_max_age_s: float = 3600.0  # a stream then ends, and its client reconnects
    # Shares of max_connections and of max_streams: the TCP listener's clients together
    # (they have no identity), the socket's the rest; one peer uid on the socket.
    tcp_share: float = 0.5
    uid_share: float = 0.25
    watch_heartbeat_s: float = 15.0  # a comment line on a quiet stream, for idle-cutting proxies
    # Token, health and readiness requests answered by the broker's own httptools parser
    # from bytes rendered once per credential; off, aiohttp answers every request.
    front_door: bool = True

    def cap(self, share: float, of: int) -> int:
        """`share` of `of` places, rounded down but never below one."""
        return max(1, int(share * of))


@dataclass(frozen=True, slots=True)
class LogConfig:
    format: LogFormat = "auto"
    level: str = "info"


@dataclass(frozen=True, slots=True)
class CloudProfile:
    """Every Azure host the broker talks to; nothing else is ever hard-coded."""

    name: str
    authority_host: str
    resource_manager: str
    region_api: str  # template with "{region}", e.g. "https://{region}.api.azureml.ms"
    ca_bundle: Path | None = None

    @property
    def arm_scope(self) -> str:
        return f"{self.resource_manager.rstrip('/')}/.default"

    def region_base(self, region: str) -> str:
        return self.region_api.format(region=region).rstrip("/")


CLOUDS: Mapping[str, CloudProfile] = {
    "AzureCloud": CloudProfile(
        "AzureCloud",
        "https://login.microsoftonline.com",
        "https://management.azure.com",
        "https://{region}.api.azureml.ms",
    ),
    "AzureChinaCloud": CloudProfile(
        "AzureChinaCloud",
        "https://login.chinacloudapi.cn",
        "https://management.chinacloudapi.cn",
        "https://{region}.api.ml.azure.cn",
    ),
    "AzureUSGovernment": CloudProfile(
        "AzureUSGovernment",
        "https://login.microsoftonline.us",
        "https://management.usgovcloudapi.net",
        "https://{region}.api.ml.azure.us",
    ),
}


@dataclass(frozen=True, slots=True)
class RefreshConfig:
    """How early and how often credentials are renewed."""

    margin_s: float = 60.0  # refresh this long before Azure's refreshAfter
    jitter_s: float = 10.0  # spread refreshes randomly over this much earlier time
    lifetime_fraction: float = 0.5  # when refreshAfter is unusable: refresh at this share of life
    key_interval_s: float = 3600.0  # re-list keys this often to pick up rotations
    clock_skew_s: float = 30.0  # stop serving a token this long before its expiry
    retry_min_s: float = 1.0  # first retry after a failed refresh
    retry_max_s: float = 300.0  # retries back off up to this
    timeout_s: float = 30.0  # bound on each upstream call
    max_concurrency: int = 4  # upstream fetches in flight at once, across all services
    client_refresh_window_s: float = 10.0  # a client-asked refresh of a service: once per this
    # The hard call budget, whatever the policy decides: token buckets of upstream fetches.
    service_calls_burst: int = 10  # fetches one service may make at once
    service_calls_per_minute: float = 6.0  # and then, sustained
    principal_calls_burst: int = 1000  # fetches one principal and subscription may make at once
    principal_calls_per_minute: float = 1200.0  # and then, sustained (ARM refills 25/s)


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The optional encrypted file that lets a restart serve credentials still valid."""

    enabled: bool = False
    path: Path = DEFAULT_CACHE_PATH
    key: SecretBytes | None = None  # the key file's bytes, stretched with HKDF by the cache
    key_source: str = ""  # where the key came from, for check-config: "file /x"


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """Fleet mode: brokers on many hosts share one refresh per service through Redis."""

    enabled: bool = False
    redis_url: str = ""  # redis://, rediss:// or unix://, never with a password in it
    ca_file: Path | None = None  # the CA bundle that signed a rediss:// server's certificate
    username: str | None = None  # a Redis ACL user; None: the default user
    password: Secret | None = None
    password_source: str = ""  # where the password came from, for check-config: "file /x"
    key_prefix: str = "token-broker:"
    encryption_key: SecretBytes | None = None  # shared by the fleet, stretched with HKDF
    key_source: str = ""  # where the key came from, for check-config
    lease_s: float = 30.0  # a refresh lease not renewed lapses after this (its holder died)
    connect_timeout_s: float = 2.0
    command_timeout_s: float = 1.0
    previous_keys: tuple[SecretBytes, ...] = ()  # keys being rolled: read with, never written
    previous_key_sources: tuple[str, ...] = ()  # where each came from, for check-config

    def __post_init__(self) -> None:
        if not 0 < self.command_timeout_s < self.lease_s:
            raise ValueError("command_timeout_s must be more than zero and less than lease_s")
        if self.connect_timeout_s <= 0:
            raise ValueError("connect_timeout_s must be more than zero")


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    """A service principal: tenant, client id and exactly one credential."""

    name: str
    tenant_id: str
    client_id: str
    kind: IdentityKind
    client_secret: Secret | None = None
    secret_source: str = ""  # where the secret came from, for check-config: "file /x", "env VAR"
    certificate_file: Path | None = None
    certificate_password: Secret | None = None
    federated_token_file: Path | None = None


@dataclass(frozen=True, slots=True)
class SinkConfig:
    """A file a service's current credential is copied to, and a command run after each copy."""

    path: Path  # absolute; replaced atomically, never rewritten in place
    format: SinkFormat = "token"  # bare value, "Bearer …" line, or the /v1/token JSON body
    mode: int = 0o600
    owner: int | None = None  # uid to chown the file to; None leaves the broker's own
    group: int | None = None  # gid to chown the file to; None leaves the broker's own
    command: tuple[str, ...] = ()  # argv, run without a shell; () runs nothing
    command_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.path.is_absolute():
            raise ValueError(f"a sink path must be absolute, not {self.path}")
        if not 0 <= self.mode <= 0o777 or self.mode & 0o007:
            raise ValueError(f"a sink mode must not give other users access, not {self.mode:o}")
        if self.command_timeout_s <= 0:
            raise ValueError("a sink command's timeout must be more than zero")


@dataclass(frozen=True, slots=True, kw_only=True)
class _Service:
    """What every kind of service has: the name clients use, the identity it is fetched as,
    who may ask for it, and where it is written."""

    name: str
    identity: str
    # who may ask for this service; an empty tuple puts no restriction of that kind
    allow_users: tuple[int, ...] = ()  # peer uids, on the Unix socket
    allow_groups: tuple[int, ...] = ()  # peer gids, on the Unix socket
    api_keys: tuple[str, ...] = ()  # names of Config.api_keys
    sink: SinkConfig | None = None  # a file the credential is written to, if any


# Each kind's `coordinates` say what its credential is for in Azure, every kind in one
# shape: the persisted cache restores a credential only for the same, and a reload keeps a
# service's credential only while they stay the same. The shape is the one caches saved by
# earlier versions were fingerprinted with (subscription, resource group, workspace, web
# service, region, auth, kind, scope, endpoint; auth was "auto" for every kind but web
# services), so that those caches still match.


@dataclass(frozen=True, slots=True, kw_only=True)
class WebServiceConfig(_Service):
    """An Azure ML web service (AKS or ACI, API v1): its token or one of its keys."""

    subscription_id: str
    resource_group: str
    workspace: str
    web_service: str
    region: str | None = None  # None: discovered from the workspace
    auth: AuthMode = "auto"
    kind: Literal["azureml-webservice"] = "azureml-webservice"

    @property
    def coordinates(self) -> tuple[str, ...]:
        where = (self.subscription_id, self.resource_group, self.workspace, self.web_service)
        return (*where, self.region or "", self.auth, self.kind, "", "")


@dataclass(frozen=True, slots=True, kw_only=True)
class OnlineEndpointConfig(_Service):
    """An Azure ML online endpoint (API v2): its token or key, as its auth mode says."""

    subscription_id: str
    resource_group: str
    workspace: str
    endpoint: str
    kind: Literal["azureml-online-endpoint"] = "azureml-online-endpoint"

    @property
    def coordinates(self) -> tuple[str, ...]:
        where = (self.subscription_id, self.resource_group, self.workspace)
        return (*where, "", "", "auto", self.kind, "", self.endpoint)


@dataclass(frozen=True, slots=True, kw_only=True)
class EntraScopeConfig(_Service):
    """The principal's own Entra token for a scope."""

    scope: str
    kind: Literal["entra"] = "entra"

    @property
    def coordinates(self) -> tuple[str, ...]:
        return ("", "", "", "", "", "auto", self.kind, self.scope, "")


ServiceConfig = WebServiceConfig | OnlineEndpointConfig | EntraScopeConfig
"""One credential local clients ask for by `name`; its `kind` tells which of the three."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key a client may present: only its SHA-256 is known, never the key itself."""

    name: str
    sha256: bytes = field(repr=False)  # the 32 raw bytes of the digest

    def __post_init__(self) -> None:
        if len(self.sha256) != API_KEY_DIGEST_BYTES:
            raise ValueError(f"an API key's SHA-256 has 32 bytes, not {len(self.sha256)}")


@dataclass(frozen=True, slots=True)
class CompatConfig:
    """Managed-identity compatible routes (IMDS and App Service) for unmodified SDKs."""

    imds: bool = False
    app_service_header: Secret | None = None
    resources: tuple[str, ...] = ()  # allowlist, without trailing "/"
    identity: str = ""
    header_source: str = ""

    @property
    def enabled(self) -> bool:
        return self.imds or self.app_service_header is not None


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """`ANY /v1/proxy/{service}/{path}`: requests forwarded to a service's scoring URI."""

    enabled: bool = True
    max_body_bytes: int = 16 << 20  # a longer request body is refused with 413
    retry_buffer_bytes: int = 64 << 10  # bodies up to this are kept to retry once after a 401
    timeout_s: float = 60.0  # bound on a whole forwarded call, body and answer included
    connect_timeout_s: float = 10.0  # bound on connecting to the scoring host
    max_header_bytes: int = 16384  # longest header line a scoring host may answer with
    max_connections: int = 64  # pooled connections to scoring hosts, all services together

    def __post_init__(self) -> None:
        if not 0 <= self.retry_buffer_bytes <= self.max_body_bytes:
            raise ValueError("retry_buffer_bytes must be from 0 to max_body_bytes")
        if not 0 < self.connect_timeout_s <= self.timeout_s:
            raise ValueError("connect_timeout_s must be more than zero and at most timeout_s")
        if self.max_connections < 1:
            raise ValueError("max_connections must be 1 or more")


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    cloud: CloudProfile
    identities: Mapping[str, IdentityConfig]
    services: tuple[ServiceConfig, ...]
    listen: ListenConfig = field(default_factory=ListenConfig)
    log: LogConfig = field(default_factory=LogConfig)
    refresh: RefreshConfig = field(default_factory=RefreshConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    api_keys: Mapping[str, ApiKey] = field(default_factory=lambda: MappingProxyType({}))
    compat: CompatConfig = field(default_factory=CompatConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)

    def service(self, name: str) -> ServiceConfig | None:
        return next((s for s in self.services if s.name == name), None)

    def service_identity(self, name: str) -> str | None:
        """What the credential of service `name` is: the cloud, the principal (tenant and
        client id) and the Azure coordinates, as one digest. A saved credential is restored,
        and a shared one adopted, only for the same; None for a service not configured."""
        service = self.service(name)
        if service is None:
            return None
        identity = self.identities[service.identity]
        return fingerprint(
            self.cloud.resource_manager,
            identity.tenant_id,
            identity.client_id,
            *service.coordinates,
        )
