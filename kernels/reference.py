"""The reference SAE encoder in torch: each architecture's activation rule exactly as its library defines it.

Every faster backend must return exactly these codes. Computation is float32 whatever the input dtype, so the
reference is the same on CPU and CUDA up to float rounding.
"""

from __future__ import annotations

import torch

from .codes import EMPTY_ID, Codes
from .fidelity import LAYER_NORM_EPS, input_norms, normalize, reconstruction_errors
from .selection import CodeSelection, select_codes, selection_for, top_k_lowest_id
from .spec import Architecture, Sae

__all__ = ["LAYER_NORM_EPS", "ReferenceEncoder", "check_input", "default_selection", "with_fidelity"]


def default_selection(sae: Sae, max_codes: int = 64) -> CodeSelection:
    """TopK SAEs keep their own k; others report every active feature, capped at `max_codes` per token."""
    return selection_for("default", None, sae, max_codes)


class ReferenceEncoder:
    """Encodes residual-stream rows [rows, d_in] into codes for one SAE."""

    def __init__(self, sae: Sae, selection: CodeSelection | None = None, device: torch.device | str = "cpu") -> None:
        self.sae = sae
        self.selection = selection or default_selection(sae)
        self.device = torch.device(device)
        self.weights = {name: t.to(self.device) for name, t in sae.weights.named().items()}
        self.decoder = sae.decoder.to(self.device) if sae.decoder is not None else None
        if sae.spec.architecture is Architecture.GATED:
            self.weights["W_mag"] = self.weights["W_enc"] * torch.exp(self.weights["r_mag"])

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalisation and b_dec centring, in SAELens's order."""
        x = normalize(x.to(device=self.device, dtype=torch.float32), self.sae.spec)
        if self.sae.spec.apply_b_dec_to_input:
            x = x - self.weights["b_dec"]
        return x

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return self.preprocess(x) @ self.weights["W_enc"] + self.weights["b_enc"]

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """Dense post-activation features [rows, d_sae]."""
        architecture = self.sae.spec.architecture
        w = self.weights
        if architecture is Architecture.GATED:
            sae_in = self.preprocess(x)
            gate = (sae_in @ w["W_enc"] + w["b_gate"]) > 0
            magnitude = torch.relu(sae_in @ w["W_mag"] + w["b_mag"])
            return magnitude * gate
        pre = self.pre_activations(x)
        if architecture is Architecture.STANDARD:
            return torch.relu(pre)
        if architecture is Architecture.JUMPRELU:
            return torch.relu(pre) * (pre > w["threshold"])
        # TOPK: the k largest pre-activations, then relu (SAELens's order; sparsify's relu-then-topk keeps the
        # same positive features).
        indices, values = top_k_lowest_id(pre, self.sae.spec.k or pre.shape[1])
        return torch.zeros_like(pre).scatter_(1, indices, torch.relu(values))

    def encode(self, x: torch.Tensor) -> Codes:
        """Codes with their fidelity. Rows no SAE can read (NaN, infinite, all zero) get no codes."""
        check_input(self.sae, x)
        with torch.no_grad():
            x = x.to(device=self.device, dtype=torch.float32)
            norms, valid = input_norms(x)
            safe = torch.where(valid[:, None], x, 1.0)  # invalid rows: any finite stand-in, emptied below
            codes = select_codes(self.activations(safe), self.selection)
            return with_fidelity(self.sae, safe, codes, norms, valid, self.decoder, self.weights["b_dec"])


def check_input(sae: Sae, x: torch.Tensor) -> None:
    if x.ndim != 2 or x.shape[1] != sae.spec.d_in:
        raise ValueError(f"encoder {sae.name}: expected input [rows, {sae.spec.d_in}], got {list(x.shape)}")


def with_fidelity(
    sae: Sae,
    x: torch.Tensor,
    codes: Codes,
    norms: torch.Tensor,
    valid: torch.Tensor,
    decoder: torch.Tensor | None,
    b_dec: torch.Tensor,
) -> Codes:
    """The codes with invalid rows emptied, their reconstruction errors (when there is a decoder) and norms.
    Shared by the backends that select codes outside torch's reach of the input (Triton) and the reference."""
    ids = codes.ids.masked_fill(~valid[:, None], EMPTY_ID)
    values = codes.values.masked_fill(~valid[:, None], 0.0)
    errors = None
    if decoder is not None:
        errors = reconstruction_errors(normalize(x, sae.spec), ids, values, decoder, b_dec)
        errors = errors.masked_fill(~valid, 0.0)
    return Codes(ids, values, errors, norms)
