"""Sidecar configuration: one YAML file, validated at start with the file, field and reason on error."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from circuitwatch.config_files import format_validation_error, read_mapping


class ConfigError(ValueError):
    """A configuration or circuit file cannot be used; the message names the file, the field and the reason."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsConfig(_Strict):
    cert_file: Path
    key_file: Path
    # Optional CA bundle: when set, clients must present a certificate it signed (mutual TLS).
    client_ca_file: Path | None = None


class TelemetryConfig(_Strict):
    """Where spans and metrics go. OTLP endpoints, protocol (grpc or http/protobuf), headers and intervals come
    from the standard OTEL_* environment variables; exporting starts when an OTLP endpoint is set there."""

    traces: bool = True
    metrics: bool = True
    # Serve Prometheus metrics on this port (on the listen host); 0: off.
    prometheus_port: int = Field(0, ge=0, le=65535)
    service_name: str = "circuitwatch-sidecar"


class AuthConfig(_Strict):
    """One bearer token file per role (see auth.py): producers hold the ingest token, dashboards and the
    API-server side the read token, reviewers and operators the admin token."""

    ingest_token_file: Path
    read_token_file: Path
    admin_token_file: Path


class IndexConfig(_Strict):
    # Codes older than this are evicted (the "rolling" window queries run over).
    window_s: float = Field(600.0, gt=0)
    # The active segment is sealed (sorted, immutable) at this age or size, whichever comes first.
    segment_s: float = Field(10.0, gt=0)
    segment_max_postings: int = Field(2_000_000, gt=0)
    # Oldest segments are evicted early when the index would exceed this budget.
    memory_budget_mb: float = Field(4096.0, gt=0)
    # The request-level index behind contrast queries (identification) has its own budget: its oldest
    # segments (256 requests each) go early past it, and the eviction is logged and counted.
    request_index_budget_mb: float = Field(1024.0, gt=0)


class SidecarConfig(_Strict):
    # host:port to listen on; loopback by default, never all interfaces unless asked for.
    listen: str = "127.0.0.1:50061"
    tls: TlsConfig | None = None
    # Bearer tokens by role (auth.ingest/read/admin_token_file), required on every RPC except health checks,
    # read from files so they stay out of configs. auth_token_file is one token for every role (simpler, and
    # whoever holds it can forge reports): use one or the other.
    auth: AuthConfig | None = None
    auth_token_file: Path | None = None
    circuits: list[Path] = Field(default_factory=list)
    evidence_dir: Path = Path("circuitwatch-evidence")
    # WAL with synchronous=NORMAL survives a process crash; FULL also survives power loss (slower commits).
    evidence_synchronous: str = "NORMAL"
    index: IndexConfig = IndexConfig()
    # Open requests with no traffic for this long are finalised as incomplete (producer gone for good).
    request_timeout_s: float = Field(600.0, gt=0)
    # A finish marker may overtake the request's last codes (they travel on another stream): wait this long
    # for every announced position before finalising with the missing ones as gaps.
    finish_grace_ms: float = Field(2000.0, ge=0)
    # Longest GetReport wait a client may ask for.
    max_report_wait_ms: int = Field(30_000, ge=0)
    # Messages above this are rejected with INVALID_ARGUMENT (gRPC's own hard limit sits above it).
    max_message_bytes: int = Field(32 * 1024 * 1024, gt=0)
    # Evidence positions kept per flag in a report.
    max_evidence_tokens: int = Field(32, gt=0)
    workers: int = Field(16, gt=0)
    telemetry: TelemetryConfig = TelemetryConfig()

    @field_validator("evidence_synchronous")
    @classmethod
    def _synchronous(cls, value: str) -> str:
        if value.upper() not in ("NORMAL", "FULL"):
            raise ValueError("must be NORMAL or FULL")
        return value.upper()

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"expected host:port, got {value!r}")
        return value

    @model_validator(mode="after")
    def _one_auth_mode(self) -> SidecarConfig:
        if self.auth is not None and self.auth_token_file is not None:
            raise ValueError("auth and auth_token_file: give role tokens (auth) or one token for every role")
        return self

    def role_tokens(self) -> dict[str, str]:
        """role -> token, read from the token files (empty: no authentication)."""
        if self.auth_token_file is not None:
            token = _read_token(self.auth_token_file, "auth_token_file")
            return {"ingest": token, "read": token, "admin": token}
        if self.auth is None:
            return {}
        tokens = {
            role: _read_token(getattr(self.auth, f"{role}_token_file"), f"auth.{role}_token_file")
            for role in ("ingest", "read", "admin")
        }
        for a, b in (("ingest", "read"), ("ingest", "admin"), ("read", "admin")):
            if tokens[a] == tokens[b]:
                raise ConfigError(f"auth: the {a} and {b} tokens are the same; each role needs its own token")
        return tokens


def _read_token(path: Path, field: str) -> str:
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{path}: {field}: cannot read ({exc.strerror})") from None
    if not token:
        raise ConfigError(f"{path}: {field}: the token file is empty")
    return token


def load_config(path: Path | str) -> SidecarConfig:
    """Parse and validate; relative paths inside the file are taken relative to the file."""
    path = Path(path)
    raw = read_mapping(path, ConfigError)
    try:
        config = SidecarConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {format_validation_error(exc)}") from None
    base = path.resolve().parent

    def resolve(p: Path | None) -> Path | None:
        return None if p is None or p.is_absolute() else base / p

    updates: dict[str, object] = {
        "circuits": [resolve(p) or p for p in config.circuits],
        "evidence_dir": resolve(config.evidence_dir) or config.evidence_dir,
    }
    if config.auth_token_file is not None:
        updates["auth_token_file"] = resolve(config.auth_token_file) or config.auth_token_file
    if config.auth is not None:
        updates["auth"] = config.auth.model_copy(
            update={
                name: resolve(getattr(config.auth, name)) or getattr(config.auth, name)
                for name in ("ingest_token_file", "read_token_file", "admin_token_file")
            }
        )
    if config.tls is not None:
        tls = config.tls
        updates["tls"] = tls.model_copy(
            update={
                "cert_file": resolve(tls.cert_file) or tls.cert_file,
                "key_file": resolve(tls.key_file) or tls.key_file,
                "client_ca_file": resolve(tls.client_ca_file) or tls.client_ca_file,
            }
        )
    return config.model_copy(update=updates)
