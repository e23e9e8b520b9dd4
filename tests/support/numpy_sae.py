"""Independent numpy implementations of each SAE format's documented encoding, read straight from the files.

Deliberately shares no code with circuitwatch.kernels: the tests compare the two. Computation is float64.
Each function returns (activations, margins): margins[r, f] is how far feature f of row r is from the decision
that makes it fire or not (pre-activation minus threshold, or minus the k-th value), so a comparison can allow
float-level flips at the boundary and nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


Result = tuple[np.ndarray, np.ndarray]


def _topk_dense(pre: np.ndarray, k: int) -> Result:
    """Keep the k largest per row (ties: lower index), zero elsewhere; margin to the k-th value or to zero."""
    out = np.zeros_like(pre)
    kth = np.zeros((pre.shape[0], 1))
    for row in range(pre.shape[0]):
        order = np.lexsort((np.arange(pre.shape[1]), -pre[row]))[:k]
        out[row, order] = pre[row, order]
        kth[row] = pre[row, order[-1]]
    margins = np.minimum(np.abs(pre - kth), np.abs(pre))
    return _relu(out), margins


def _normalized(x: np.ndarray, normalization: str) -> np.ndarray:
    """SAELens's input normalisations: constant_norm_rescale, layer_norm (unbiased std), or none."""
    if normalization == "constant_norm_rescale":
        return x * np.sqrt(x.shape[1]) / np.linalg.norm(x, axis=1, keepdims=True)
    if normalization == "layer_norm":
        x = x - x.mean(axis=1, keepdims=True)
        return x / (x.std(axis=1, ddof=1, keepdims=True) + 1e-5)
    return x


def saelens_activations(directory: Path, x: np.ndarray) -> Result:
    cfg = json.loads((directory / "cfg.json").read_text())
    w = {k: v.astype(np.float64) for k, v in load_file(str(directory / "sae_weights.safetensors")).items()}
    x = x.astype(np.float64)
    x = _normalized(x, cfg.get("normalize_activations", "none"))
    if cfg.get("apply_b_dec_to_input", True):
        x = x - w["b_dec"]
    arch = cfg.get("architecture", "standard")
    if cfg.get("activation_fn_str", cfg.get("activation_fn")) == "topk":
        arch = "topk"
    if arch == "gated":
        gate_pre = x @ w["W_enc"] + w["b_gate"]
        magnitude = x @ (w["W_enc"] * np.exp(w["r_mag"])) + w["b_mag"]
        return (gate_pre > 0) * _relu(magnitude), np.minimum(np.abs(gate_pre), np.abs(magnitude))
    pre = x @ w["W_enc"] + w["b_enc"]
    if arch == "standard":
        return _relu(pre), np.abs(pre)
    if arch == "jumprelu":
        threshold = w["threshold"] if "threshold" in w else np.exp(w["log_threshold"])
        return _relu(pre) * (pre > threshold), np.minimum(np.abs(pre - threshold), np.abs(pre))
    if arch == "topk":
        if cfg.get("rescale_acts_by_decoder_norm"):
            pre = pre * np.linalg.norm(w["W_dec"], axis=1)
        k = cfg.get("k") or cfg["activation_fn_kwargs"]["k"]
        return _topk_dense(pre, k)
    raise ValueError(arch)


def gemmascope_activations(directory: Path, x: np.ndarray) -> Result:
    if (directory / "params.npz").is_file():
        with np.load(directory / "params.npz") as archive:
            w = {k: archive[k].astype(np.float64) for k in archive.files}
    else:
        w = {
            k.replace("w_", "W_"): v.astype(np.float64)
            for k, v in load_file(str(directory / "params.safetensors")).items()
        }
    pre = x.astype(np.float64) @ w["W_enc"] + w["b_enc"]
    return (pre > w["threshold"]) * _relu(pre), np.minimum(np.abs(pre - w["threshold"]), np.abs(pre))


def sparsify_activations(directory: Path, x: np.ndarray) -> Result:
    cfg = json.loads((directory / "cfg.json").read_text())
    w = {k: v.astype(np.float64) for k, v in load_file(str(directory / "sae.safetensors")).items()}
    x = x.astype(np.float64)
    if not cfg.get("transcode", False):
        x = x - w["b_dec"]
    pre = x @ w["encoder.weight"].T + w["encoder.bias"]
    return _topk_dense(_relu(pre), cfg["k"])


def codes(activations: np.ndarray, width: int) -> list[dict[int, float]]:
    """Per row, the `width` strongest positive features (ties: lower id)."""
    rows = []
    for row in activations:
        order = np.lexsort((np.arange(len(row)), -row))[:width]
        rows.append({int(i): float(row[i]) for i in order if row[i] > 0})
    return rows


def code_mismatches(
    actual: list[dict[int, float]],
    activations: np.ndarray,
    margins: np.ndarray,
    width: int,
    tol: float = 1e-4,
) -> list[str]:
    """Differences between `actual` codes and the numpy ground truth beyond float-level near-ties.

    A feature may be present on one side only if it sits within `tol` of its firing decision (margin) or of
    the last selected value (a near-tie for the k-th slot); shared features must agree in value.
    """
    expected = codes(activations, width)
    problems = []
    for row, (got, want) in enumerate(zip(actual, expected, strict=True)):
        last = min(want.values()) if len(want) == width else None
        for feature in got.keys() | want.keys():
            if feature in got and feature in want:
                if not np.isclose(got[feature], want[feature], rtol=1e-3, atol=tol):
                    problems.append(f"row {row} feature {feature}: {got[feature]} != {want[feature]}")
                continue
            near_rule = margins[row, feature] <= tol
            near_last = last is not None and abs(activations[row, feature] - last) <= tol
            if not (near_rule or near_last):
                side = "only in actual" if feature in got else "missing from actual"
                problems.append(f"row {row} feature {feature} {side} (ground truth {activations[row, feature]:.6f})")
    return problems


def reconstruction_errors(directory: Path, x: np.ndarray, activations: np.ndarray) -> np.ndarray:
    """The relative squared error ||x - x_hat||^2 / ||x||^2 of the full decoder applied to `activations` (dense,
    float64), in the SAE's normalised input space, read straight from the files of any of the three formats."""
    x = x.astype(np.float64)
    cfg_file = directory / "cfg.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    if (directory / "sae_weights.safetensors").is_file():
        w = load_file(str(directory / "sae_weights.safetensors"))
    elif (directory / "sae.safetensors").is_file():
        w = load_file(str(directory / "sae.safetensors"))
    elif (directory / "params.npz").is_file():
        with np.load(directory / "params.npz") as archive:
            w = {k: archive[k] for k in archive.files}
    else:
        w = {k.replace("w_", "W_"): v for k, v in load_file(str(directory / "params.safetensors")).items()}
    W_dec, b_dec = w["W_dec"].astype(np.float64), w["b_dec"].astype(np.float64)
    if cfg.get("rescale_acts_by_decoder_norm"):
        W_dec = W_dec / np.linalg.norm(W_dec, axis=1, keepdims=True)
    x = _normalized(x, cfg.get("normalize_activations", "none"))
    x_hat = activations @ W_dec + b_dec
    return ((x - x_hat) ** 2).sum(axis=1) / (x**2).sum(axis=1)
