"""An SAE's fidelity baseline: how well it reads calibration text on the model it was made for.

`circuitwatch calibrate` writes one next to the SAE (`circuitwatch-baseline.json`). It is pinned to the SAE
(encoder and decoder hashes), the model (a fingerprint of its architecture config) and the tap (layer, hook
point and head): a baseline for anything else is refused at load, never silently applied. The plugin reads it for the
start-up wiring check and sends it to the sidecar in the manifest, where it sets the per-token error threshold
of reports and is the reference of the drift alarm.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SaeFormatError
from .hook_points import HookPoint, Tap
from .spec import Sae

BASELINE_FILE = "circuitwatch-baseline.json"
FORMAT = "circuitwatch-baseline/1"
THRESHOLD_QUANTILE = 0.9  # a token above the calibration text's 90th percentile error counts as poorly read
UNCALIBRATED_ERROR_THRESHOLD = 0.5  # without a baseline: half the token's squared norm left unexplained
# the model config keys that fix the residual stream's shape and meaning (the fingerprint of a model)
FINGERPRINT_KEYS = (
    "model_type",
    "architectures",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "rope_theta",
    "max_position_embeddings",
    "tie_word_embeddings",
)


def model_fingerprint(config: dict[str, Any]) -> str:
    """blake2b over the architecture fields of a Hugging Face model config (`config.to_dict()`).

    It names the architecture, not the weights: two fine-tunes of one base share it. The wiring check on first
    traffic is what notices other weights."""
    chosen = {key: config.get(key) for key in FINGERPRINT_KEYS}
    digest = hashlib.blake2b(json.dumps(chosen, sort_keys=True, default=str).encode(), digest_size=16)
    return f"blake2b:{digest.hexdigest()}"


@dataclass(frozen=True)
class Quantiles:
    mean: float
    p01: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: np.ndarray) -> Quantiles:
        values = np.asarray(values, np.float64)
        p01, p50, p90, p99 = np.quantile(values, [0.01, 0.5, 0.9, 0.99]).tolist()
        return cls(float(values.mean()), p01, p50, p90, p99)


@dataclass(frozen=True)
class FidelityBaseline:
    """Per-token error, input norm, L0 and feature firing frequencies of one SAE on calibration text."""

    sae_name: str
    weights_hash: str
    decoder_hash: str
    model: str
    model_fingerprint: str
    layer: int
    hook_point: str
    selection: str
    text: str  # where the calibration text came from
    documents: int
    tokens: int
    error: Quantiles
    norm: Quantiles
    l0_mean: float
    error_threshold: float
    firing_frequencies: list[float] = field(repr=False)  # per feature: share of calibration tokens it fired on
    head: int | None = None  # attn_z taps of one head
    path: Path | None = None

    @property
    def frequencies(self) -> np.ndarray:
        return np.asarray(self.firing_frequencies, np.float32)

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("path")
        data["format"] = FORMAT
        data["firing_frequencies"] = [float(f"{f:.4g}") for f in self.firing_frequencies]
        return json.dumps(data, indent=1)


def measure(
    errors: np.ndarray, norms: np.ndarray, l0: np.ndarray, feature_ids: np.ndarray, d_sae: int, **identity: Any
) -> FidelityBaseline:
    """A baseline from per-token measurements (errors, norms, L0) and every code's feature id."""
    tokens = len(errors)
    if tokens == 0:
        raise ValueError("no calibration tokens: the calibration text is empty")
    frequencies = np.bincount(np.asarray(feature_ids, np.int64), minlength=d_sae)[:d_sae] / tokens
    error = Quantiles.of(errors)
    return FidelityBaseline(
        **identity,
        tokens=tokens,
        error=error,
        norm=Quantiles.of(norms),
        l0_mean=float(np.mean(l0)),
        error_threshold=float(np.quantile(np.asarray(errors, np.float64), THRESHOLD_QUANTILE)),
        firing_frequencies=frequencies.astype(np.float32).tolist(),
    )


def default_path(sae: Sae) -> Path:
    return sae.spec.path / BASELINE_FILE


def load_baseline(path: Path, sae: Sae, tap: Tap, fingerprint: str | None = None) -> FidelityBaseline:
    """Read a baseline and check it belongs to this SAE, tap and model; a mismatch names the file and field."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise SaeFormatError(path, None, f"cannot read ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SaeFormatError(path, None, f"not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SaeFormatError(path, "format", f"not a circuitwatch baseline (expected format {FORMAT!r})")
    data.pop("format")
    try:
        data["error"], data["norm"] = Quantiles(**data["error"]), Quantiles(**data["norm"])
        baseline = FidelityBaseline(**data, path=Path(path))
    except (TypeError, KeyError) as exc:
        raise SaeFormatError(path, None, f"malformed baseline ({exc})") from None
    recalibrate = "was calibrated for another {what}: run `circuitwatch calibrate` again"
    checks = (
        ("weights_hash", baseline.weights_hash, sae.weights_hash, "SAE encoder"),
        ("decoder_hash", baseline.decoder_hash, sae.decoder_hash, "SAE decoder"),
    )
    try:
        calibrated = Tap(baseline.layer, HookPoint(baseline.hook_point), baseline.head)
    except ValueError as exc:
        raise SaeFormatError(path, "hook_point", f"{baseline.hook_point!r}: {exc}") from None
    if calibrated.canonical() != tap.canonical():  # resid_pre of layer L is resid_post of layer L - 1
        raise SaeFormatError(
            path,
            "layer/hook_point/head",
            f"calibrated at {calibrated.label()} but this slot reads {tap.label()}: " + recalibrate.format(what="tap"),
        )
    for name, found, expected, what in checks:
        if found != expected:
            raise SaeFormatError(
                path, name, f"{found!r} but this slot has {expected!r}: " + recalibrate.format(what=what)
            )
    if fingerprint is not None and baseline.model_fingerprint != fingerprint:
        raise SaeFormatError(
            path,
            "model_fingerprint",
            f"calibrated on {baseline.model!r}, whose architecture differs from the served model's: "
            + recalibrate.format(what="model"),
        )
    if len(baseline.firing_frequencies) != sae.spec.d_sae:
        raise SaeFormatError(
            path, "firing_frequencies", f"{len(baseline.firing_frequencies)} values, d_sae is {sae.spec.d_sae}"
        )
    numbers = [
        baseline.error_threshold,
        baseline.l0_mean,
        *asdict(baseline.error).values(),
        *asdict(baseline.norm).values(),
    ]
    if not all(isinstance(v, int | float) and math.isfinite(v) and v >= 0 for v in numbers):
        raise SaeFormatError(path, None, "negative or non-finite statistics")
    return baseline
