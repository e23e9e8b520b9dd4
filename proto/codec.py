"""Code slices on the wire: numpy arrays <-> packed little-endian bytes in `RequestSlice`.

Unpacking validates everything a producer could get wrong, so the sidecar can answer INVALID_ARGUMENT with
the request and field instead of indexing garbage.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .circuitwatch_pb2 import Phase, RequestSlice

U32 = np.dtype("<u4")
F16 = np.dtype("<f2")


class WireFormatError(ValueError):
    """A message breaks the wire contract; the text names the request and the field."""


@dataclass(frozen=True)
class SliceArrays:
    """One decoded slice: rows are positions first_position .. first_position + num_rows - 1."""

    request_id: str
    slot: int
    first_position: int
    phase: int  # Phase.PHASE_PROMPT or Phase.PHASE_GENERATED
    token_ids: np.ndarray  # uint32 [rows]
    row_offsets: np.ndarray  # uint32 [rows + 1]
    feature_ids: np.ndarray  # uint32 [nnz]
    activations: np.ndarray  # float16 [nnz]

    @property
    def num_rows(self) -> int:
        return len(self.token_ids)

    @property
    def positions(self) -> np.ndarray:
        return np.arange(self.first_position, self.first_position + self.num_rows, dtype=np.uint32)


def pack_slice(
    request_id: str,
    slot: int,
    first_position: int,
    phase: int,
    token_ids: np.ndarray,
    row_offsets: np.ndarray,
    feature_ids: np.ndarray,
    activations: np.ndarray,
) -> RequestSlice:
    token_ids = np.ascontiguousarray(token_ids, dtype=U32)
    row_offsets = np.ascontiguousarray(row_offsets, dtype=U32)
    if len(row_offsets) != len(token_ids) + 1:
        raise ValueError(f"{request_id}: {len(row_offsets)} row offsets for {len(token_ids)} rows")
    if len(feature_ids) != len(activations) or int(row_offsets[-1]) != len(feature_ids):
        raise ValueError(f"{request_id}: offsets end at {row_offsets[-1]} but {len(feature_ids)} ids")
    return RequestSlice(
        request_id=request_id,
        slot=slot,
        first_position=first_position,
        phase=phase,
        num_rows=len(token_ids),
        token_ids=token_ids.tobytes(),
        row_offsets=row_offsets.tobytes(),
        feature_ids=np.ascontiguousarray(feature_ids, dtype=U32).tobytes(),
        activations=np.ascontiguousarray(activations, dtype=F16).tobytes(),
    )


def _array(message: RequestSlice, field: str, dtype: np.dtype, expected: int | None) -> np.ndarray:
    raw: bytes = getattr(message, field)
    if len(raw) % dtype.itemsize:
        raise WireFormatError(
            f"request {message.request_id!r}: {field} has {len(raw)} bytes, not a multiple of {dtype.itemsize}"
        )
    array = np.frombuffer(raw, dtype=dtype)
    if expected is not None and len(array) != expected:
        raise WireFormatError(f"request {message.request_id!r}: {field} holds {len(array)} values, expected {expected}")
    return array


def unpack_slice(message: RequestSlice, d_sae: int | None = None) -> SliceArrays:
    """Decode and validate; `d_sae` (from the manifest) bounds the feature ids when given."""
    if not message.request_id:
        raise WireFormatError("slice without request_id")
    if message.phase not in (Phase.PHASE_PROMPT, Phase.PHASE_GENERATED):
        raise WireFormatError(f"request {message.request_id!r}: phase must be PROMPT or GENERATED")
    rows = message.num_rows
    token_ids = _array(message, "token_ids", U32, rows)
    offsets = _array(message, "row_offsets", U32, rows + 1)
    if offsets[0] != 0 or np.any(np.diff(offsets.astype(np.int64)) < 0):
        raise WireFormatError(f"request {message.request_id!r}: row_offsets must start at 0 and never decrease")
    nnz = int(offsets[-1])
    feature_ids = _array(message, "feature_ids", U32, nnz)
    activations = _array(message, "activations", F16, nnz)
    if d_sae is not None and nnz and int(feature_ids.max()) >= d_sae:
        largest = int(feature_ids.max())
        raise WireFormatError(
            f"request {message.request_id!r}: feature id {largest} >= d_sae {d_sae} of slot {message.slot}"
        )
    return SliceArrays(
        request_id=message.request_id,
        slot=message.slot,
        first_position=message.first_position,
        phase=message.phase,
        token_ids=token_ids,
        row_offsets=offsets,
        feature_ids=feature_ids,
        activations=activations,
    )
