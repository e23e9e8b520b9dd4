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
        ids = self.ids.cpu().numpy()
        values = self.values.cpu().numpy()
        valid = ids != EMPTY_ID
        offsets = np.zeros(ids.shape[0] + 1, dtype=np.uint32)
        np.cumsum(valid.sum(axis=1), out=offsets[1:])
        return offsets, ids[valid].astype(np.uint32), values[valid].astype(np.float32)

    def rows(self) -> list[dict[int, float]]:
        """Per row, {feature id: activation}: convenient for comparisons in tests and tools."""
        offsets, ids, values = self.to_csr()
        return [dict(zip(ids[a:b].tolist(), values[a:b].tolist(), strict=True)) for a, b in itertools.pairwise(offsets)]
