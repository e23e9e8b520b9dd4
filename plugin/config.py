"""Plugin configuration: a YAML/JSON file named by $CIRCUITWATCH_CONFIG and/or vLLM's
`--additional-config '{"circuitwatch": {...}}'` (its keys override the file's). Invalid configuration
fails vLLM start-up with the file or source, the field and the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from circuitwatch.config_files import format_validation_error, read_mapping

ENV_VAR = "CIRCUITWATCH_CONFIG"
ADDITIONAL_CONFIG_KEY = "circuitwatch"


class PluginConfigError(ValueError):
    """The plugin is configured wrongly; the message names the source, the field and the reason."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


HookPointName = Literal["resid_pre", "resid_post", "attn_out", "attn_z", "mlp_in", "mlp_out"]


class SlotConfig(_Strict):
    layer: int = Field(ge=0, description="decoder layer tapped")
    sae: Path
    # Where in the layer (kernels/hook_points.py). Unset: as the SAE's files say, else resid_post.
    hook_point: HookPointName | None = None
    # attn_z only: one attention head's slice (the SAE's `hook_head_index` when unset and the SAE names one)
    head: int | None = Field(None, ge=0)
    format: Literal["auto", "saelens", "gemmascope", "sparsify"] = "auto"
    name: str | None = None
    # Code selection; defaults: the SAE's own k for TopK SAEs, else every active feature capped at max_codes.
    selection: Literal["default", "topk", "threshold", "argmax"] = "default"
    k: int | None = Field(None, gt=0)
    # The fidelity baseline written by `circuitwatch calibrate`: default, `circuitwatch-baseline.json` next to
    # the SAE when present. Pinned to the SAE, model and tap: a mismatch stops start-up.
    baseline: Path | None = None
    # Overrides the baseline's per-token error threshold (a token above it reads poorly).
    error_threshold: float | None = Field(None, gt=0)
    # Refuse an SAE whose files say it was trained on another layer, hook point or head than this slot taps.
    check_sae_metadata: bool = True

    @model_validator(mode="after")
    def _head_only_on_attn_z(self) -> SlotConfig:
        if self.head is not None and self.hook_point not in (None, "attn_z"):
            raise ValueError(f"head: only attn_z slots read one head, this slot's hook_point is {self.hook_point}")
        return self


class WiringCheckConfig(_Strict):
    """The start-up wiring check on each slot's first tokens (plugin/wiring.py)."""

    enabled: bool = True
    tokens: int = Field(256, gt=0)
    # median error at or above: mis-wired, calibrated or not
    max_error: float = Field(0.9, gt=0)
    # median input norm off by this factor from calibration: mis-wired
    norm_factor: float = Field(10.0, gt=1)
    # median error this many times the calibration's: suspect
    error_ratio: float = Field(1.3, gt=1)


class SidecarTarget(_Strict):
    address: str = "127.0.0.1:50061"
    tls_ca_file: Path | None = None
    # Bearer tokens for the sidecar's roles: workers and the engine core stream codes (ingest); the API server
    # fetches reports and follows circuit actions (read). auth_token_file serves both when the role's own
    # file is not set.
    auth_token_file: Path | None = None
    ingest_token_file: Path | None = None
    read_token_file: Path | None = None
    # Back-off bounds for reconnecting to a down sidecar.
    reconnect_min_s: float = Field(0.2, gt=0)
    reconnect_max_s: float = Field(5.0, gt=0)

    @property
    def ingest_token(self) -> Path | None:
        return self.ingest_token_file or self.auth_token_file

    @property
    def read_token(self) -> Path | None:
        return self.read_token_file or self.auth_token_file


class ClientControls(_Strict):
    """What API clients may ask for per request in `vllm_xargs`. The client is the monitored party: nothing it
    asks for switches monitoring off unless the operator allows it here."""

    # circuitwatch_monitor: false under monitor: all / true under monitor: opt-in
    opt_out: bool = False
    opt_in: bool = True
    # circuitwatch_labels: kept as "client:<label>", so they never pass for a reviewer's label
    labels: bool = False
    max_labels: int = Field(8, ge=0, le=64)
    max_label_chars: int = Field(64, gt=0, le=256)
    # Join the client's W3C trace (traceparent header or circuitwatch_traceparent): always, only for requests
    # carrying the gateway token, or never (every report starts a new trace).
    trace_context: Literal["always", "gateway", "never"] = "always"
    # When set, HTTP clients' controls (opt-in/out, labels, trace_context: gateway) count only on requests
    # whose `gateway_header` carries this token: the operator's gateway sets it, clients cannot.
    gateway_token_file: Path | None = None
    gateway_header: str = Field("x-circuitwatch-gateway", min_length=1)

    def gateway_token(self) -> str | None:
        if self.gateway_token_file is None:
            return None
        return _read_secret(self.gateway_token_file)


class PluginConfig(_Strict):
    slots: list[SlotConfig] = Field(min_length=1)
    # torch (reference) | onnx (ONNX Runtime) | triton (fused kernel, CUDA only) | auto (measured at start-up
    # on rows of the model's dtype, logged)
    encoder_backend: Literal["torch", "onnx", "triton", "auto"] = "torch"
    max_codes_per_token: int = Field(64, gt=0)
    sidecar: SidecarTarget = SidecarTarget()
    monitor: Literal["all", "opt-in"] = "all"
    client_controls: ClientControls = ClientControls()
    # bypass: monitored requests never read the prefix cache, so every position is computed and encoded;
    # accept_gaps: they may, and the uncomputed positions are reported as gaps.
    prefix_cache: Literal["bypass", "accept_gaps"] = "bypass"
    # Code batches waiting for the sidecar; beyond this the oldest are dropped and counted as gaps.
    queue_max_batches: int = Field(1024, gt=0)
    # The longest a step's code batch waits for the steps behind it, to go as one message (fewer, larger messages:
    # less of the sidecar's CPU per token). A step that finished requests ends the wait at once, so reports never
    # wait; codes of running requests (abort circuits, queries over them) reach the sidecar up to this much later.
    # Only where finish markers ride in code batches (vLLM's engine core in the worker's process); 0: off.
    coalesce_linger_ms: float = Field(0.0, ge=0, le=1000)
    # The `circuitwatch` object in OpenAI responses, and how long the API server waits for the final report.
    responses: bool = True
    response_deadline_ms: float = Field(50.0, ge=0)
    wiring_check: WiringCheckConfig = WiringCheckConfig()

    @model_validator(mode="after")
    def _distinct_slots(self) -> PluginConfig:
        seen = set()
        for i, slot in enumerate(self.slots):
            key = (slot.layer, slot.hook_point, slot.head, str(slot.sae))
            if key in seen:
                raise ValueError(
                    f"slots[{i}] repeats layer {slot.layer} ({slot.hook_point or 'its hook point'}) with the same SAE"
                )
            seen.add(key)
        return self

    def digest(self) -> str:
        """Goes into vLLM's config hash, so compiled artifacts built without these taps are never reused. Only what
        decides the taps goes in: each slot's layer, hook point, head and format, and its SAE's JSON configs (a
        slot without hook_point takes it from them). Changing the sidecar address, a deadline or the admission
        policy changes no tap and must not recompile the model (minutes on a GPU)."""
        digest = hashlib.sha256()
        for slot in self.slots:
            digest.update(json.dumps([slot.layer, slot.hook_point, slot.head, slot.format]).encode() + b"\0")
            for config_file in _sae_config_files(slot.sae):
                try:
                    digest.update(config_file.name.encode() + b"\0" + config_file.read_bytes())
                except OSError:  # loading the SAE fails later, naming the file
                    continue
        return digest.hexdigest()[:16]


def _sae_config_files(sae: Path) -> list[Path]:
    """The small JSON files that say where an SAE reads (cfg.json, config.json), not its weights or baseline."""
    directory = sae if sae.is_dir() else sae.parent
    try:
        return sorted(p for p in directory.glob("*.json") if p.name != "circuitwatch-baseline.json" and p.is_file())
    except OSError:
        return []


def _read_file(path: Path) -> dict[str, Any]:
    data = read_mapping(path, PluginConfigError)
    base = path.resolve().parent
    for slot in data.get("slots") or []:
        for key in ("sae", "baseline"):
            if isinstance(slot, dict) and isinstance(slot.get(key), str) and not Path(slot[key]).is_absolute():
                slot[key] = str(base / slot[key])
    return data


_cache: dict[tuple, PluginConfig | None] = {}


def load_plugin_config(
    additional_config: dict[str, Any] | None = None, env: dict[str, str] | None = None
) -> PluginConfig | None:
    """The configuration, or None when the plugin is installed but not configured (it then does nothing).

    Called on per-request paths (API handlers, the engine core's scheduler hooks), so a parsed configuration
    is reused while the file (path, modification time) and the additional config are unchanged.
    """
    env = os.environ if env is None else env
    path = env.get(ENV_VAR) or ""
    try:
        mtime = Path(path).stat().st_mtime_ns if path else 0
    except OSError:
        mtime = -1
    extra = json.dumps((additional_config or {}).get(ADDITIONAL_CONFIG_KEY), sort_keys=True, default=str)
    key = (path, mtime, extra)
    if key not in _cache:
        _cache[key] = _load(additional_config, env)
    return _cache[key]


def _load(additional_config: dict[str, Any] | None, env) -> PluginConfig | None:
    data: dict[str, Any] = {}
    sources = []
    if env.get(ENV_VAR):
        path = Path(env[ENV_VAR])
        data.update(_read_file(path))
        sources.append(str(path))
    extra = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
    if extra is not None:
        if not isinstance(extra, dict):
            raise PluginConfigError(f"--additional-config: {ADDITIONAL_CONFIG_KEY}: expected an object")
        data.update(extra)
        sources.append("--additional-config")
    if not sources:
        return None
    try:
        return PluginConfig.model_validate(data)
    except ValidationError as exc:
        problems = format_validation_error(exc)
        raise PluginConfigError(f"circuitwatch plugin config ({' + '.join(sources)}): {problems}") from None


_secrets: dict[tuple[Path, int], str] = {}


def _read_secret(path: Path) -> str:
    """A token file's content, re-read when the file changes (checked on every request: a stat, no read)."""
    try:
        key = (path, path.stat().st_mtime_ns)
    except OSError as exc:
        raise PluginConfigError(f"{path}: cannot read the token file ({exc.strerror})") from exc
    if key not in _secrets:
        token = path.read_text().strip()
        if not token:
            raise PluginConfigError(f"{path}: the token file is empty")
        _secrets.clear()
        _secrets[key] = token
    return _secrets[key]
