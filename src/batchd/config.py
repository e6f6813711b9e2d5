"""Configuration: one :class:`Settings` object, built once at start-up and passed down.

Sources, highest priority first: ``BATCHD_*`` environment variables (nested with ``__``, e.g.
``BATCHD_ENGINE__EMBEDDED=false``; lists and tables as JSON), the TOML file given with
``--config`` (or ``BATCHD_CONFIG``), then the defaults below. An unknown key, a wrong type or a
deployment without what its backend needs stops the start with a message naming the key.
"""

from __future__ import annotations

import re
import tomllib
import urllib.request
from collections.abc import Collection
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings.exceptions import SettingsError

from batchd.errors import ConfigError

DEFAULT_CHAT_MODEL = "smollm2-135m-instruct"
DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"
DEFAULT_MODERATION_MODEL = "omni-moderation-latest"  # the embedded defaults' moderation model
MODERATION_LOCAL_MODEL = "minilm-moderation"  # the embedded content filter as /v1/moderations
# what ``local_model`` may name
LOCAL_MODELS = (DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDING_MODEL, MODERATION_LOCAL_MODEL)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class S3Settings(_Strict):
    endpoint_url: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    region: str | None = None


class AuthSettings(_Strict):
    keys: dict[str, str] = Field(default_factory=dict, description="API key -> project")


class Deployment(_Strict):
    model: str
    backend: Literal["openai", "local"] = "openai"
    base_url: str | None = None
    local_model: str | None = None
    api_key: str | None = None
    api_style: Literal["openai", "azure", "anthropic"] = Field(
        default="openai",
        description="openai: key as 'Authorization: Bearer', paths under base_url/v1; "
        "azure: key as 'api-key', paths without /v1 (classic deployment URLs); "
        "anthropic: a server that speaks Anthropic's POST /v1/messages, key as 'x-api-key' "
        "with 'anthropic-version: 2023-06-01' (unless headers set it); it runs the message "
        "batches of its model, their params passed through unchanged",
    )
    headers: dict[str, str] = Field(
        default_factory=dict, description="sent upstream on every request of this deployment"
    )
    max_concurrency: Annotated[int, Field(ge=1, le=100_000)] | Literal["auto"] = Field(
        default=64,
        description='requests in flight across all workers; "auto": found by the engine, '
        "up to max_concurrency_cap",
    )
    max_concurrency_cap: int = Field(default=256, ge=1, le=100_000)
    max_attempts: int = Field(
        default=10,
        ge=1,
        le=1000,
        description="tries of one request for 408/5xx/timeouts/connection errors (429s do "
        "not count); then the last answer goes to the error file",
    )
    rpm: int = Field(default=0, ge=0)
    tpm: int = Field(default=0, ge=0)
    enqueued_token_limit: int = Field(default=0, ge=0)
    timeout: float = Field(default=600.0, gt=0, description="seconds for one upstream request")
    max_response_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        description="largest upstream answer, compressed and decompressed; larger: an error line",
    )
    threads: int = Field(
        default=1,
        ge=0,
        le=1024,
        description="backend = local: CPU threads for the model's matrix products; 0 = a core each",
    )

    @property
    def adaptive(self) -> bool:
        """``max_concurrency = "auto"``: the engine finds the limit (engine/adaptive.py)."""
        return self.max_concurrency == "auto"

    @property
    def speaks_messages(self) -> bool:
        """``api_style = "anthropic"``: it serves Anthropic's ``/v1/messages`` (and only that)."""
        return self.api_style == "anthropic"

    @property
    def concurrency_limit(self) -> int:
        """The most requests ever in flight: ``max_concurrency``, or the cap with ``auto``."""
        m = self.max_concurrency
        return self.max_concurrency_cap if m == "auto" else m

    @model_validator(mode="after")
    def _backend_needs(self) -> Deployment:
        if self.backend == "openai":
            if not self.base_url:
                raise ValueError(f"deployment {self.model!r}: backend 'openai' needs base_url")
            _check_upstream_url(self.model, self.base_url)
            for name, value in self.headers.items():
                if not _TOKEN.match(name) or not _HEADER_VALUE.match(value):
                    raise ValueError(
                        f"deployment {self.model!r}: invalid header {name!r} (names are "
                        "RFC 9110 tokens; values printable ASCII, no line breaks)"
                    )
                if self.api_key and name.lower() in ("authorization", "api-key", "x-api-key"):
                    raise ValueError(
                        f"deployment {self.model!r}: headers.{name} and api_key both send a "
                        "key; set one of them"
                    )
            if self.api_key is not None and not _HEADER_VALUE.match(self.api_key):
                raise ValueError(f"deployment {self.model!r}: api_key must be printable ASCII")
        elif self.api_style == "anthropic":
            raise ValueError(
                f"deployment {self.model!r}: api_style 'anthropic' needs backend 'openai' "
                "(an HTTP server with base_url)"
            )
        if self.backend == "local":
            if not self.local_model:
                object.__setattr__(self, "local_model", self.model)
            if self.local_model not in LOCAL_MODELS:
                raise ValueError(
                    f"deployment {self.model!r}: unknown local_model {self.local_model!r}; "
                    f"known: {', '.join(LOCAL_MODELS)}"
                )
        return self


_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP header name (RFC 9110)
_HEADER_VALUE = re.compile(r"^[\x20-\x7e\t]*$")  # what the upstream client sends as is


def _check_upstream_url(model: str, url: str) -> None:
    """An upstream URL batchd can reach: http(s), a host, and no proxy in the way (the
    upstream client connects directly; ``HTTPS_PROXY``/``HTTP_PROXY`` are not supported, so
    a proxy that would apply to this host is refused here instead of being bypassed)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"deployment {model!r}: base_url {url!r} is not an http(s) URL")
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
    if proxy and not bypass(parts.hostname, proxies):
        raise ValueError(
            f"deployment {model!r}: {parts.scheme.upper()}_PROXY (or ALL_PROXY) is set and "
            f"applies to {parts.hostname}, but batchd connects to upstreams directly; add the "
            "host to NO_PROXY or unset the proxy variable"
        )


class Limits(_Strict):
    max_file_bytes: int = Field(default=200 * 1024 * 1024, ge=1)
    max_requests_per_file: int = Field(default=100_000, ge=1)
    max_files: int = Field(default=500, ge=1)
    completion_windows: list[str] = Field(default_factory=lambda: ["24h"])
    max_line_bytes: int = Field(default=32 * 1024 * 1024, ge=1)
    output_retention: int = Field(
        default=0,
        ge=0,
        le=30 * 86400,
        description="seconds a batch's result files are kept when the batch does not say "
        "(output_expires_after); 0 keeps them until deleted",
    )
    body_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="a request body that sends no byte for this long is refused (408)",
    )
    results_keepalive_seconds: float = Field(
        default=15.0,
        gt=0,
        le=300,
        description="a followed results stream that has sent nothing for this long sends a "
        "space (whitespace before the next line), so that proxies do not cut it as idle",
    )

    @model_validator(mode="after")
    def _windows(self) -> Limits:
        for w in self.completion_windows:
            parse_window(w)
        return self


class AnthropicSettings(_Strict):
    """Anthropic's Message Batches (``/v1/messages/batches``); defaults as Anthropic's."""

    max_requests: int = Field(default=100_000, ge=1, description="requests per message batch")
    max_batch_bytes: int = Field(
        default=256 * 1024 * 1024, ge=1, description="largest create body (256 MB)"
    )
    results_retention_seconds: int = Field(
        default=29 * 86400,
        ge=3600,
        le=30 * 86400,
        description="results readable this long after creation (29 days), then archived",
    )


class EngineSettings(_Strict):
    embedded: bool = True
    shard_lines: int = Field(default=1000, ge=1, description="lines per shard")
    lease_seconds: float = Field(default=15.0, gt=0)
    checkpoint_seconds: float = Field(default=0.5, gt=0)
    poll_seconds: float = Field(default=0.25, gt=0, description="idle wait between claims")
    cancel_grace_seconds: float = Field(default=5.0, ge=0)
    max_shards: int = Field(default=8, ge=1, description="shards one process runs at once")


class ProjectSettings(_Strict):
    enqueued_token_limit: int = Field(
        default=0,
        ge=0,
        description="tokens the project's unfinished batches may hold, every deployment "
        "together (0: no limit)",
    )
    weight: float = Field(
        default=1.0,
        gt=0,
        le=1000,
        description="the project's share of every deployment's slots, relative to the others",
    )


Severity = Literal["low", "medium", "high"]


class ContentFilterThresholds(_Strict):
    """Per category, the lowest severity that counts as filtered."""

    hate: Severity = "medium"
    self_harm: Severity = "medium"
    sexual: Severity = "medium"
    violence: Severity = "medium"


class ContentFilterSettings(_Strict):
    enabled: bool = False
    action: Literal["annotate", "block"] = "annotate"
    classifier: str = Field(
        default="embedded",
        description="'embedded' (MiniLM heads, offline) or the model name of a deployment",
    )
    classifier_api: Literal["moderations", "guard"] = Field(
        default="moderations",
        description="for a deployment: it answers /v1/moderations, or is a guard model "
        "answering chat completions ('safe' / 'unsafe\\nS1,S10')",
    )
    thresholds: ContentFilterThresholds = Field(default_factory=ContentFilterThresholds)
    timeout: float = Field(default=60.0, gt=0, description="seconds for one classification")
    threads: int = Field(
        default=1,
        ge=0,
        le=1024,
        description="classifier = embedded: CPU threads for MiniLM's products; 0 = a core each",
    )


class Webhook(_Strict):
    url: str
    secret: str | None = None
    events: list[str] = Field(
        default_factory=lambda: [
            "batch.completed",
            "batch.failed",
            "batch.expired",
            "batch.cancelled",
        ]
    )


def _octal_mode(value: Any) -> Any:
    """A permission mode as TOML writes it (``0o700``) or as a string (``"0700"``, ``"700"``)."""
    if isinstance(value, str):
        if not re.fullmatch(r"(0o?)?[0-7]{3}", value.strip()):
            raise ValueError('a mode is three octal digits, like "0700"')
        return int(value.strip().removeprefix("0o"), 8)
    return value


def _dir_mode(value: int) -> int:
    if value & 0o700 != 0o700 or value > 0o777:
        raise ValueError(f"{oct(value)}: the owner needs rwx on the data directory (0700 to 0777)")
    return value


def _file_mode(value: int) -> int:
    if value & 0o600 != 0o600 or value & 0o111 or value > 0o666:
        raise ValueError(f"{oct(value)}: the owner needs rw- and nobody x (0600 to 0666)")
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="BATCHD_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    data_dir: Path = Path("./batchd-data")
    database_url: str | None = None
    files_url: str | None = None
    s3: S3Settings = Field(default_factory=S3Settings)
    auth: AuthSettings | None = None
    deployments: list[Deployment] = Field(default_factory=list)
    limits: Limits = Field(default_factory=Limits)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    webhooks: list[Webhook] = Field(default_factory=list)
    projects: dict[str, ProjectSettings] = Field(default_factory=dict)
    content_filter: ContentFilterSettings = Field(default_factory=ContentFilterSettings)
    anthropic: AnthropicSettings = Field(default_factory=AnthropicSettings)
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="without [auth]: Host names answered besides IP addresses and localhost",
    )
    migrate_on_start: bool = True
    log_level: str = "info"
    data_dir_mode: Annotated[int, BeforeValidator(_octal_mode), AfterValidator(_dir_mode)] = Field(
        default=0o700, description="permissions of data_dir and the folders batchd makes in it"
    )
    data_file_mode: Annotated[int, BeforeValidator(_octal_mode), AfterValidator(_file_mode)] = (
        Field(default=0o600, description="permissions of the database and every file batchd stores")
    )
    log_format: Literal["text", "json"] = "text"
    access_log: bool = False

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Env first, then the file's values (passed as init kwargs), then defaults.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _unique_models(self) -> Settings:
        seen: set[str] = set()
        for d in self.deployments:
            if d.model in seen:
                raise ValueError(f"deployments: model {d.model!r} is configured twice")
            seen.add(d.model)
        cf = self.content_filter
        classifier = self.deployment_for(cf.classifier) if cf.classifier != "embedded" else None
        if cf.classifier != "embedded" and classifier is None:
            raise ValueError(
                f"content_filter.classifier: {cf.classifier!r} is neither 'embedded' nor the "
                "model of a deployment"
            )
        if classifier is not None and classifier.speaks_messages:
            raise ValueError(
                f"content_filter.classifier: {cf.classifier!r} has api_style 'anthropic'; a "
                "classifier answers /v1/moderations or chat completions"
            )
        return self

    # -- derived -----------------------------------------------------------------
    def effective_deployments(self) -> list[Deployment]:
        """The configured deployments, or the embedded models when none is configured: chat,
        embeddings, and the embedded content filter as ``omni-moderation-latest``."""
        if self.deployments:
            return list(self.deployments)
        return [
            Deployment(model=DEFAULT_CHAT_MODEL, backend="local", max_concurrency=32),
            Deployment(model=DEFAULT_EMBEDDING_MODEL, backend="local", max_concurrency=64),
            Deployment(
                model=DEFAULT_MODERATION_MODEL,
                backend="local",
                local_model=MODERATION_LOCAL_MODEL,
                max_concurrency=64,
            ),
        ]

    def project_weight(self, project: str) -> float:
        """``[projects.NAME] weight``, 1 for a project not configured."""
        settings = self.projects.get(project)
        return settings.weight if settings is not None else 1.0

    def project_token_limit(self, project: str) -> int:
        """``[projects.NAME] enqueued_token_limit``, 0 (none) for a project not configured."""
        settings = self.projects.get(project)
        return settings.enqueued_token_limit if settings is not None else 0

    def deployment_for(self, model: str) -> Deployment | None:
        for d in self.effective_deployments():
            if d.model == model:
                return d
        return None

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'batchd.db').resolve()}"


def parse_window(window: str) -> int:
    """``"24h"`` -> 86400. Units: s, m, h, d."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if len(window) < 2 or window[-1] not in units or not window[:-1].isdigit():
        raise ValueError(f"completion window {window!r} is not like '24h', '30m' or '30s'")
    seconds = int(window[:-1]) * units[window[-1]]
    if seconds <= 0:
        raise ValueError(f"completion window {window!r} must be positive")
    return seconds


_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^\s/@:]*:)[^\s/@]*@")
_SECRET_FIELDS = ("api_key", "secret", "secret_access_key", "access_key_id")


def mask_secret(secret: str) -> str:
    """How a secret appears in a message: its first characters only when it is long enough
    for those to say little (``"sk-t…"``), else nothing of it."""
    return secret[:4] + "…" if len(secret) >= 12 else "…"


def _secrets(data: Any) -> set[str]:
    """Every secret in a raw configuration: API keys (the keys of ``auth.keys``), upstream
    ``api_key``s and header values, S3 credentials, webhook secrets."""
    found: set[str] = set()
    if isinstance(data, dict):
        for key, value in data.items():
            if key == "keys" and isinstance(value, dict):
                found.update(k for k in value if isinstance(k, str))
            elif key == "headers" and isinstance(value, dict):
                found.update(v for v in value.values() if isinstance(v, str))
            elif key in _SECRET_FIELDS and isinstance(value, str):
                found.add(value)
            else:
                found |= _secrets(value)
    elif isinstance(data, list):
        for item in data:
            found |= _secrets(item)
    return found


def redact(message: str, secrets: Collection[str] = ()) -> str:
    """``message`` with every known secret masked and URL passwords replaced by ``***``."""
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 4:
            message = message.replace(secret, mask_secret(secret))
    return _URL_PASSWORD.sub(r"\g<head>***@", message)


def _format_error(exc: ValidationError, secrets: Collection[str]) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        if loc[:2] == ["auth", "keys"] and len(loc) > 2:
            loc[2] = mask_secret(loc[2])  # the key of a table entry is an API key
        key = ".".join(loc) or "(settings)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{key}: {msg}")
    return redact("invalid configuration: " + "; ".join(parts), secrets)


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Read the TOML file (if any), apply env vars, validate; raise :class:`ConfigError`."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {p} does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from exc
    data.update(overrides)
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, _secrets(data))) from None
    except SettingsError as exc:  # a BATCHD_* variable that is not valid JSON, for one
        raise ConfigError(redact(f"invalid configuration: {exc}", _secrets(data))) from None
