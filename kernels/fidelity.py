"""How well an SAE reads a token: the reconstruction error of the codes the monitor emits, and the size of the
residual row it read.

    error = ||x - x_hat||^2 / ||x||^2,   x_hat = b_dec + sum over the token's codes of activation * W_dec[feature]

in the SAE's input space (after its normalisation, before b_dec centring). This is the relative squared error,
not the fraction of variance unexplained: no dataset mean is subtracted, so it is defined for one token and
needs no statistics. It is computed from the codes the monitor emits (top-k, or capped at max_codes), so it
says how much of the token those codes explain: a gather of k decoder rows, tiny next to the encoder.

A residual row that is NaN, infinite or all zero is invalid: no SAE can read it. Encoders empty its codes, and
the producer reports its positions as an INVALID_INPUT gap, never as clean tokens.
"""

from __future__ import annotations

import numpy as np
import torch

from .spec import Normalization, SaeSpec

LAYER_NORM_EPS = 1e-5  # SAELens: x / (std + eps), std unbiased
# Host batches whose decoder gather holds at most this many elements ([rows, width, d_in]) are reconstructed
# in numpy; larger ones by torch's embedding_bag, which never materialises the gather. Measured crossover on
# these cores: 16 rows x 32 codes x d_in 256, or one row x 64 codes x d_in 2048.
HOST_GATHER_MAX_ELEMENTS = 1 << 17


def normalize(x: torch.Tensor, spec: SaeSpec) -> torch.Tensor:
    """The SAE's inference-time normalisation (SAELens `normalize_activations`), float32."""
    x = x.to(torch.float32)
    if spec.normalization is Normalization.CONSTANT_NORM_RESCALE:
        return x * (spec.d_in**0.5) / x.norm(dim=-1, keepdim=True)
    if spec.normalization is Normalization.LAYER_NORM:
        x = x - x.mean(dim=-1, keepdim=True)
        return x / (x.std(dim=-1, keepdim=True) + LAYER_NORM_EPS)
    return x


def input_norms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L2 norm of each row in float32, bool mask of the rows an SAE can read: finite and not all zero).

    A finite row so large that its norm overflows float32 is unreadable too: every encoder would overflow."""
    norms = x.to(torch.float32).norm(dim=-1)
    return norms, torch.isfinite(norms) & (norms > 0)


def reconstruction_errors(
    sae_in: torch.Tensor, ids: torch.Tensor, values: torch.Tensor, decoder: torch.Tensor, b_dec: torch.Tensor
) -> torch.Tensor:
    """Relative squared error per row of the reconstruction from fixed-width codes (id -1 = empty slot).

    `sae_in` is the normalised input [rows, d_in]; `decoder` is W_dec [d_sae, d_in] in the activations'
    scale. One embedding_bag: no [rows, width, d_in] intermediate."""
    if ids.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float32, device=sae_in.device)
    active = ids >= 0
    x_hat = torch.nn.functional.embedding_bag(
        torch.where(active, ids, 0).to(torch.int64),
        decoder,
        per_sample_weights=torch.where(active, values, 0.0).to(decoder.dtype),
        mode="sum",
    )
    diff = x_hat.add_(b_dec).sub_(sae_in)  # in place: no second [rows, d_in] temporary
    residual = torch.linalg.vecdot(diff, diff, dim=-1)
    total = torch.linalg.vecdot(sae_in, sae_in, dim=-1)
    return torch.where(total > 0, residual / total.clamp_min(torch.finfo(torch.float32).tiny), 0.0)


def reconstruction_errors_host(
    sae_in: np.ndarray, ids: np.ndarray, values: np.ndarray, decoder: np.ndarray, b_dec: np.ndarray
) -> np.ndarray:
    """`reconstruction_errors` on host arrays, float32 [rows]; empty slots must carry value 0 (Codes do).

    A decode step's few rows take eight numpy calls, where the torch path's dozen ops cost 10-20 us each on
    the step (their caches cold from the model's); large batches go to the torch path above."""
    if ids.size * decoder.shape[1] > HOST_GATHER_MAX_ELEMENTS:
        as_tensor = torch.from_numpy
        errors = reconstruction_errors(
            as_tensor(sae_in), as_tensor(ids), as_tensor(values), as_tensor(decoder), as_tensor(b_dec)
        )
        return errors.numpy()
    with np.errstate(all="ignore"):  # rows no SAE can read give NaN here; callers zero them
        diff = np.matmul(values[:, None, :], decoder[np.maximum(ids, 0)])[:, 0]
        diff += b_dec
        diff -= sae_in
        residual = np.einsum("rd,rd->r", diff, diff)
        total = np.einsum("rd,rd->r", sae_in, sae_in)
        return np.divide(residual, total, out=np.zeros_like(residual), where=total > 0)
