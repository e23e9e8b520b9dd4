"""The reference SAE encoder in torch: each architecture's activation rule exactly as its library defines it.

Every faster backend must return exactly these codes. Computation is float32 whatever the input dtype, so the
reference is the same on CPU and CUDA up to float rounding.
"""

from __future__ import annotations

import torch

from .codes import Codes
from .selection import CodeSelection, SelectionMode, select_codes, top_k_lowest_id
from .spec import Architecture, Normalization, Sae

LAYER_NORM_EPS = 1e-5  # SAELens: x / (std + eps), std unbiased


def default_selection(sae: Sae, max_codes: int = 64) -> CodeSelection:
    """TopK SAEs keep their own k; others report every active feature, capped at `max_codes` per token."""
    if sae.spec.architecture is Architecture.TOPK and sae.spec.k:
        return CodeSelection(SelectionMode.TOPK, sae.spec.k)
    return CodeSelection(SelectionMode.THRESHOLD, max_codes)


class ReferenceEncoder:
    """Encodes residual-stream rows [rows, d_in] into codes for one SAE."""

    def __init__(self, sae: Sae, selection: CodeSelection | None = None, device: torch.device | str = "cpu") -> None:
        self.sae = sae
        self.selection = selection or default_selection(sae)
        self.device = torch.device(device)
        self.weights = {name: t.to(self.device) for name, t in sae.weights.named().items()}
        if sae.spec.architecture is Architecture.GATED:
            self.weights["W_mag"] = self.weights["W_enc"] * torch.exp(self.weights["r_mag"])

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalisation and b_dec centring, in SAELens's order."""
        x = x.to(device=self.device, dtype=torch.float32)
        spec = self.sae.spec
        if spec.normalization is Normalization.CONSTANT_NORM_RESCALE:
            x = x * (spec.d_in**0.5) / x.norm(dim=-1, keepdim=True)
        elif spec.normalization is Normalization.LAYER_NORM:
            x = x - x.mean(dim=-1, keepdim=True)
            x = x / (x.std(dim=-1, keepdim=True) + LAYER_NORM_EPS)
        if spec.apply_b_dec_to_input:
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
        if x.ndim != 2 or x.shape[1] != self.sae.spec.d_in:
            raise ValueError(
                f"encoder {self.sae.name}: expected input [rows, {self.sae.spec.d_in}], got {list(x.shape)}"
            )
        with torch.no_grad():
            return select_codes(self.activations(x), self.selection)
