"""Codes: per token, the ids and activations of the selected SAE features."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

EMPTY_ID = -1


@dataclass(frozen=True)
class Codes:
    """Fixed-width codes: row i holds up to `width` features, strongest first, padded with id -1 / value 0.

    The fixed width keeps GPU encoders free of data-dependent shapes; `to_csr` drops the padding for the wire.
    Within a row, features are ordered by activation descending, ties by lower feature id.
    """

    ids: torch.Tensor  # int32 [rows, width]
    values: torch.Tensor  # float32 [rows, width]
    # fidelity (kernels/fidelity.py), on the encoder's device: relative reconstruction error per row (None
    # when the SAE has no decoder) and the input row's L2 norm (inf/NaN/0 for rows no SAE can read)
    errors: torch.Tensor | None = None  # float32 [rows]
    norms: torch.Tensor | None = None  # float32 [rows]

    @property
    def valid(self) -> torch.Tensor:
        """bool [rows]: the input row was finite and not all zero (its codes mean something)."""
        if self.norms is None:
            return torch.ones(self.ids.shape[0], dtype=torch.bool, device=self.ids.device)
        return torch.isfinite(self.norms) & (self.norms > 0)

    @property
    def num_rows(self) -> int:
        return int(self.ids.shape[0])

    def to_csr(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row_offsets uint32 [rows+1], feature_ids uint32 [nnz], activations float32 [nnz])."""
        return csr_of(self.ids.cpu().numpy(), self.values.cpu().numpy())

    def on_host(self) -> HostCodes:
        """The codes of host tensors as numpy arrays, derived in numpy alone. For the plugin's sending thread:
        every torch call lets go of the interpreter and must take it back, and on a decode step the model's
        thread held it in between, so a handful of them cost more than the packing itself."""
        ids, values = self.ids.numpy(), self.values.numpy()
        offsets, feature_ids, activations = csr_of(ids, values)
        norms = self.norms.numpy() if self.norms is not None else None
        valid = np.ones(ids.shape[0], dtype=bool) if norms is None else readable_rows(norms)
        errors = self.errors.numpy() if self.errors is not None else None
        return HostCodes(offsets, feature_ids, activations, errors, norms, valid)

    def rows(self) -> list[dict[int, float]]:
        """Per row, {feature id: activation}: convenient for comparisons in tests and tools."""
        offsets, ids, values = self.to_csr()
        return [dict(zip(ids[a:b].tolist(), values[a:b].tolist(), strict=True)) for a, b in itertools.pairwise(offsets)]


@dataclass(frozen=True)
class HostCodes:
    """Codes as the wire carries them (CSR, padding dropped), with the rows' fidelity and validity, in numpy."""

    row_offsets: np.ndarray  # uint32 [rows+1]
    feature_ids: np.ndarray  # uint32 [nnz]
    activations: np.ndarray  # float32 [nnz]
    errors: np.ndarray | None  # float32 [rows]
    norms: np.ndarray | None  # float32 [rows]
    valid: np.ndarray  # bool [rows]: as Codes.valid


def csr_of(ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Padded fixed-width codes as (row_offsets uint32 [rows+1], feature_ids uint32 [nnz], activations float32)."""
    present = ids != EMPTY_ID
    offsets = np.zeros(ids.shape[0] + 1, dtype=np.uint32)
    np.cumsum(present.sum(axis=1), out=offsets[1:])
    return offsets, ids[present].astype(np.uint32), values[present].astype(np.float32)


def readable_rows(norms: np.ndarray) -> np.ndarray:
    """bool per row, in numpy: an SAE can read the row (its input norm finite and not 0, as Codes.valid)."""
    return np.isfinite(norms) & (norms > 0)
