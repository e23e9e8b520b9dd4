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

# Per-request controls, passed by clients as `vllm_xargs` (vLLM copies them into SamplingParams.extra_args).
XARG_MONITOR = "circuitwatch_monitor"  # true / false (or "1" / "0"): opt in or out
XARG_LABELS = "circuitwatch_labels"  # a list of strings, or one comma-separated string
XARG_TRACEPARENT = "circuitwatch_traceparent"
XARG_TRACESTATE = "circuitwatch_tracestate"
XARG_REQUEST_ID = "circuitwatch_request_id"  # stamped by the API-server side: the external id


class PluginConfigError(ValueError):
    """The plugin is configured wrongly; the message names the source, the field and the reason."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SlotConfig(_Strict):
    layer: int = Field(ge=0, description="decoder layer whose output (residual stream after it) is tapped")
    sae: Path
    hook_point: Literal["resid_post"] = "resid_post"
    format: Literal["auto", "saelens", "gemmascope", "sparsify"] = "auto"
    name: str | None = None
    # Code selection; defaults: the SAE's own k for TopK SAEs, else every active feature capped at max_codes.
    selection: Literal["default", "topk", "threshold", "argmax"] = "default"
    k: int | None = Field(None, gt=0)


class SidecarTarget(_Strict):
    address: str = "127.0.0.1:50061"
    tls_ca_file: Path | None = None
    auth_token_file: Path | None = None
    # Back-off bounds for reconnecting to a down sidecar.
    reconnect_min_s: float = Field(0.2, gt=0)
    reconnect_max_s: float = Field(5.0, gt=0)


class PluginConfig(_Strict):
    slots: list[SlotConfig] = Field(min_length=1)
    # torch (reference) | onnx (ONNX Runtime) | auto (measured at start-up, logged)
    encoder_backend: Literal["torch", "onnx", "auto"] = "torch"
    max_codes_per_token: int = Field(64, gt=0)
    sidecar: SidecarTarget = SidecarTarget()
    monitor: Literal["all", "opt-in"] = "all"
    # bypass: monitored requests never read the prefix cache, so every position is computed and encoded;
    # accept_gaps: they may, and the uncomputed positions are reported as gaps.
    prefix_cache: Literal["bypass", "accept_gaps"] = "bypass"
    # Code batches waiting for the sidecar; beyond this the oldest are dropped and counted as gaps.
    queue_max_batches: int = Field(1024, gt=0)
    # The `circuitwatch` object in OpenAI responses, and how long the API server waits for the final report.
    responses: bool = True
    response_deadline_ms: float = Field(50.0, ge=0)

    @model_validator(mode="after")
    def _distinct_slots(self) -> PluginConfig:
        seen = set()
        for i, slot in enumerate(self.slots):
            key = (slot.layer, slot.hook_point, str(slot.sae))
            if key in seen:
                raise ValueError(f"slots[{i}] repeats layer {slot.layer} with the same SAE")
            seen.add(key)
        return self

    def digest(self) -> str:
        """Goes into vLLM's config hash, so compiled artifacts built without these taps are never reused."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]


def _read_file(path: Path) -> dict[str, Any]:
    data = read_mapping(path, PluginConfigError)
    base = path.resolve().parent
    for slot in data.get("slots") or []:
        if isinstance(slot, dict) and isinstance(slot.get("sae"), str) and not Path(slot["sae"]).is_absolute():
            slot["sae"] = str(base / slot["sae"])
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


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def wants_monitoring(extra_args: dict[str, Any] | None, config: PluginConfig) -> bool:
    """Per-request opt in/out (`vllm_xargs`), else the configured policy."""
    value = (extra_args or {}).get(XARG_MONITOR)
    if value is None:
        return config.monitor == "all"
    return _truthy(value)


def request_labels(extra_args: dict[str, Any] | None) -> list[str]:
    value = (extra_args or {}).get(XARG_LABELS)
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    return [str(value)]
