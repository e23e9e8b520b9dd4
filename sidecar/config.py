"""Sidecar configuration: one YAML file, validated at start with the file, field and reason on error."""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import stat
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from circuitwatch.config_files import format_validation_error, read_mapping

log = logging.getLogger(__name__)


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
    # Serve Prometheus metrics on this port; 0: off. The endpoint has no authentication, so it binds to
    # loopback unless told otherwise (scrape through a local agent, or set the host knowingly).
    prometheus_port: int = Field(0, ge=0, le=65535)
    prometheus_host: str = "127.0.0.1"
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


class LimitsConfig(_Strict):
    """Bounds on what any caller can make the sidecar hold or do (see the README's sidecar limits)."""

    # Concurrent long-lived calls per kind; past the bound a call gets RESOURCE_EXHAUSTED at once. Unary reads
    # and health checks run on their own `read_workers` threads, so held streams never starve them.
    ingest_streams: int = Field(16, gt=0)
    watch_streams: int = Field(16, gt=0)  # WatchReports and WatchActions
    report_waits: int = Field(64, gt=0)  # GetReport calls waiting for a report at once
    read_workers: int = Field(8, gt=0)
    # Per request: positions (codes, finish markers and gaps past it are refused), declared gaps, id length.
    max_positions: int = Field(1 << 20, gt=0, le=1 << 31)
    max_gaps_per_request: int = Field(4096, gt=0)
    max_request_id_bytes: int = Field(512, gt=0)
    # SAEs: per manifest, features per SAE, and features over every SAE registered (contrast arrays scale
    # with it).
    max_slots_per_manifest: int = Field(64, gt=0)
    max_d_sae: int = Field(1 << 20, gt=0, le=1 << 28)
    max_total_features: int = Field(1 << 22, gt=0)
    # Open requests (their codes wait in memory until the report is final): beyond either bound the least
    # recently active are finalised early, incomplete, with a SIDECAR_LIMIT gap.
    open_requests_mb: float = Field(1024.0, gt=0)
    max_open_requests: int = Field(100_000, gt=0)
    # Label calls.
    max_label_ids: int = Field(10_000, gt=0)
    max_labels_per_call: int = Field(64, gt=0)
    max_label_chars: int = Field(256, gt=0)
    max_note_chars: int = Field(2048, gt=0)
    max_label_changes_per_request: int = Field(1000, gt=0)
    # Circuits: the longest co-occurrence window.
    max_circuit_window: int = Field(4096, gt=0)


class FidelityConfig(_Strict):
    """When a report is `low_fidelity` (sidecar/fidelity.py): in some slot, more than `low_fidelity_fraction`
    of the tokens have a reconstruction error above the slot's threshold. The threshold is the producer's
    calibration baseline (its 90th percentile), else `uncalibrated_error_threshold`; `error_thresholds`
    overrides it per SAE (by name or weights-hash prefix)."""

    low_fidelity_fraction: float = Field(0.5, ge=0, lt=1)
    uncalibrated_error_threshold: float = Field(0.5, gt=0)
    error_thresholds: dict[str, float] = Field(default_factory=dict)

    @field_validator("error_thresholds")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        for name, threshold in value.items():
            if not threshold > 0:
                raise ValueError(f"{name}: a threshold must be > 0, got {threshold}")
        return value


class MaintenanceConfig(_Strict):
    """Where the maintenance thread's heavy numpy work runs (maintenance_worker.py)."""

    # Sealing token segments, reducing finished requests and building request segments run in a child process at
    # a lower CPU priority, so they neither hold the interpreter ingest runs on nor take a core from it when the
    # cores are busy.
    worker_process: bool = True
    # Work with fewer postings than this stays in process (crossing the socket costs more than it saves).
    worker_min_postings: int = Field(200_000, ge=0)
    # The worker's niceness (added to the sidecar's): the kernel prefers ingest when they compete for a core.
    worker_nice: int = Field(10, ge=0, le=19)


class DriftConfig(_Strict):
    """The drift alarm (sidecar/drift.py) and its defaults."""

    half_life_tokens: float = Field(20_000, gt=0)
    min_tokens: float = Field(5_000, ge=0)
    js_threshold: float = Field(0.1, gt=0, le=1)
    error_ratio_threshold: float = Field(1.3, gt=1)
    norm_ratio_threshold: float = Field(2.0, gt=1)
    clear_fraction: float = Field(0.8, gt=0, le=1)


class FleetTlsConfig(_Strict):
    """TLS to a ClickHouse server (an https:// url). The server is checked against ca_file, else the system CAs."""

    ca_file: Path | None = None
    verify: bool = True
    # Client certificate, for servers that ask for one.
    cert_file: Path | None = None
    key_file: Path | None = None


class FleetConfig(_Strict):
    """Export to a ClickHouse store for fleet-wide evidence and queries (sidecar/fleet/). Off by default. With no
    url the store is embedded (chdb) under <evidence_dir>/fleet. Exporting never blocks ingest: batches go to a
    bounded spool directory first and are inserted from there, in order, idempotently."""

    enabled: bool = False
    # http(s)://host:port of a ClickHouse server; empty: the embedded store in embedded_dir.
    url: str = ""
    database: str = "circuitwatch"
    username: str = "default"
    password_file: Path | None = None
    tls: FleetTlsConfig = FleetTlsConfig()
    # This sidecar's name in the fleet (every row carries it; ContrastRequest.instances selects by it).
    instance: str = ""
    # Rows older than this leave the store (the tables' TTL; changing it alters the TTL at the next start).
    retention_days: int = Field(30, gt=0, le=36500)
    # Token-level codes too (every token's feature ids and activations: large), with their own TTL.
    token_codes: bool = False
    token_codes_retention_hours: int = Field(24, gt=0, le=876000)
    # An insert per table at most every flush_interval_s, or sooner at batch_rows (ClickHouse wants few large
    # inserts: thousands of rows, about one a second).
    flush_interval_s: float = Field(1.0, gt=0)
    batch_rows: int = Field(5000, gt=0)
    # Finished requests waiting in memory for the exporter thread; past it the oldest are dropped and counted.
    queue_max_requests: int = Field(100_000, gt=0)
    # Batches not yet in the store wait here (store down or slow); past spool_max_mb the oldest are dropped,
    # counted and logged.
    spool_dir: Path | None = None  # default <evidence_dir>/fleet-spool
    spool_max_mb: float = Field(1024.0, gt=0)
    embedded_dir: Path | None = None  # default <evidence_dir>/fleet
    insert_timeout_s: float = Field(30.0, gt=0)

    @field_validator("database")
    @classmethod
    def _identifier(cls, value: str) -> str:
        from .fleet.schema import check_database

        return check_database(value)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value and not re.fullmatch(r"https?://[^/\s]+/?", value):
            raise ValueError(f"{value!r}: expected http(s)://host:port of a ClickHouse server, or empty (embedded)")
        return value

    @property
    def instance_name(self) -> str:
        return self.instance or socket.gethostname()


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
    # Messages above this are refused by gRPC before they are read into memory (RESOURCE_EXHAUSTED).
    max_message_bytes: int = Field(16 * 1024 * 1024, gt=0, le=1 << 30)
    # Evidence positions kept per flag in a report.
    max_evidence_tokens: int = Field(32, gt=0)
    limits: LimitsConfig = LimitsConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    # Final reports older than this leave the evidence store (the maintenance thread deletes them); and at
    # most this many are kept, oldest deleted first.
    evidence_retention_s: float = Field(30 * 86400.0, gt=0)
    evidence_max_reports: int = Field(10_000_000, gt=0)
    # A reload (SIGHUP, ReloadCircuits) or start-up that leaves no circuit at all is refused unless allowed:
    # an empty or comment-only file would otherwise switch monitoring off silently.
    allow_empty_circuits: bool = False
    # Circuit terms naming a feature no registered SAE of that layer/slot has: "error" refuses the circuit
    # file, "warn" logs it (SAEs connect after start-up, so a term may refer to one not seen yet).
    unknown_circuit_terms: Literal["warn", "error"] = "warn"
    # Bearer tokens over plaintext on a non-loopback address cross the network in clear: refused unless set.
    allow_plaintext_tokens: bool = False
    fidelity: FidelityConfig = FidelityConfig()
    drift: DriftConfig = DriftConfig()
    fleet: FleetConfig = FleetConfig()
    maintenance: MaintenanceConfig = MaintenanceConfig()

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
        tokens = self.auth is not None or self.auth_token_file is not None
        if tokens and self.tls is None and not self.allow_plaintext_tokens and not is_loopback(self.listen):
            raise ValueError(
                f"listen {self.listen}: bearer tokens without tls would cross the network in clear; configure tls "
                "(or set allow_plaintext_tokens: true on a network you trust)"
            )
        return self

    @property
    def thread_count(self) -> int:
        """Server threads: every long-lived kind at its bound, plus the readers' own."""
        limits = self.limits
        return limits.ingest_streams + limits.watch_streams + limits.report_waits + limits.read_workers

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


def is_loopback(listen: str) -> bool:
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_token(path: Path, field: str) -> str:
    try:
        mode = path.stat().st_mode
        token = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{path}: {field}: cannot read ({exc.strerror})") from None
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"{path}: {field}: writable by group or others (chmod 600): anyone could replace the token")
    if mode & stat.S_IROTH:
        log.warning("%s: %s: readable by every user on this machine (chmod 600)", path, field)
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
    fleet = config.fleet
    updates["fleet"] = fleet.model_copy(
        update={
            "password_file": resolve(fleet.password_file) or fleet.password_file,
            "spool_dir": resolve(fleet.spool_dir) or fleet.spool_dir,
            "embedded_dir": resolve(fleet.embedded_dir) or fleet.embedded_dir,
            "tls": fleet.tls.model_copy(
                update={
                    name: resolve(getattr(fleet.tls, name)) or getattr(fleet.tls, name)
                    for name in ("ca_file", "cert_file", "key_file")
                }
            ),
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
