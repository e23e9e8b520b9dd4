"""Code slices on the wire: numpy arrays <-> packed little-endian bytes in `RequestSlice`.

Unpacking validates everything a producer could get wrong, so the sidecar can answer INVALID_ARGUMENT with
the request and field instead of indexing garbage.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .circuitwatch_pb2 import Phase, RequestSlice

U32 = np.dtype("<u4")
F16 = np.dtype("<f2")
F32 = np.dtype("<f4")


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
    errors: np.ndarray | None = None  # float32 [rows]: reconstruction error per row, when measured
    norms: np.ndarray | None = None  # float32 [rows]: input norm per row, when measured

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
    errors: np.ndarray | None = None,
    norms: np.ndarray | None = None,
) -> RequestSlice:
    token_ids = np.ascontiguousarray(token_ids, dtype=U32)
    row_offsets = np.ascontiguousarray(row_offsets, dtype=U32)
    if len(row_offsets) != len(token_ids) + 1:
        raise ValueError(f"{request_id}: {len(row_offsets)} row offsets for {len(token_ids)} rows")
    if len(feature_ids) != len(activations) or int(row_offsets[-1]) != len(feature_ids):
        raise ValueError(f"{request_id}: offsets end at {row_offsets[-1]} but {len(feature_ids)} ids")
    fidelity = {}
    for name, values in (("reconstruction_errors", errors), ("input_norms", norms)):
        if values is not None:
            if len(values) != len(token_ids):
                raise ValueError(f"{request_id}: {len(values)} {name} for {len(token_ids)} rows")
            fidelity[name] = np.ascontiguousarray(values, dtype=F32).tobytes()
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
        **fidelity,
    )


def join_slices(slices: list[RequestSlice]) -> list[RequestSlice]:
    """The same codes in as few slices as the wire allows: each request's pieces of one slot that continue one
    another (same phase, next position, fidelity measured in both or in neither) become one slice, in the order
    of their first piece. A producer that sends several engine steps in one batch sends a request's rows of a slot
    as one slice instead of one per step: the sidecar's cost goes by slices more than by rows."""
    runs: list[list[RequestSlice]] = []
    last_run: dict[tuple[str, int], list[RequestSlice]] = {}
    for piece in slices:
        key = (piece.request_id, piece.slot)
        run = last_run.get(key)
        if run is not None and _continues(run[-1], piece):
            run.append(piece)
        else:
            last_run[key] = [piece]
            runs.append(last_run[key])
    return [run[0] if len(run) == 1 else _joined(run) for run in runs]


def _continues(before: RequestSlice, after: RequestSlice) -> bool:
    return (
        after.phase == before.phase
        and after.first_position == before.first_position + before.num_rows
        and bool(after.reconstruction_errors) == bool(before.reconstruction_errors)
        and bool(after.input_norms) == bool(before.input_norms)
    )


def _joined(run: list[RequestSlice]) -> RequestSlice:
    """One slice of a run of continuing pieces: bytes concatenated, each piece's row offsets moved past the codes
    of the pieces before it."""
    offsets = [np.frombuffer(piece.row_offsets, dtype=U32) for piece in run]
    ends = np.cumsum([int(o[-1]) for o in offsets], dtype=np.int64)
    moved = [offsets[0]] + [o[1:] + np.uint32(base) for o, base in zip(offsets[1:], ends[:-1].tolist(), strict=True)]
    first = run[0]
    return RequestSlice(
        request_id=first.request_id,
        slot=first.slot,
        first_position=first.first_position,
        phase=first.phase,
        num_rows=sum(piece.num_rows for piece in run),
        token_ids=b"".join(piece.token_ids for piece in run),
        row_offsets=np.concatenate(moved).astype(U32, copy=False).tobytes(),
        feature_ids=b"".join(piece.feature_ids for piece in run),
        activations=b"".join(piece.activations for piece in run),
        reconstruction_errors=b"".join(piece.reconstruction_errors for piece in run),
        input_norms=b"".join(piece.input_norms for piece in run),
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
    errors = _array(message, "reconstruction_errors", F32, rows) if message.reconstruction_errors else None
    norms = _array(message, "input_norms", F32, rows) if message.input_norms else None
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
        errors=errors,
        norms=norms,
    )


MAX_POSITION = 1 << 31  # positions and counts must fit the sidecar's uint32 token keys with room to add


@dataclass(frozen=True)
class BatchArrays:
    """Every slice of a code batch decoded into shared arrays (one frombuffer per field for the whole batch).

    Slice i holds rows row_start[i]:row_start[i + 1] and postings post_start[i]:post_start[i + 1];
    row_offsets are global indices into feature_ids / activations.
    """

    request_ids: list[str]
    slots: np.ndarray  # int64 [slices]
    first_positions: np.ndarray  # int64 [slices]
    phases: np.ndarray  # int64 [slices]
    row_start: np.ndarray  # int64 [slices + 1]
    post_start: np.ndarray  # int64 [slices + 1]
    token_ids: np.ndarray  # uint32 [rows]
    row_offsets: np.ndarray  # int64 [rows + 1]
    feature_ids: np.ndarray  # uint32 [nnz]
    activations: np.ndarray  # float16 [nnz]
    # per row, float32, NaN where the slice carried none; None when no slice of the batch carried any
    errors: np.ndarray | None = None
    norms: np.ndarray | None = None

    @property
    def num_slices(self) -> int:
        return len(self.request_ids)

    @property
    def num_rows(self) -> int:
        return len(self.token_ids)

    # Counts several ingest steps need; cached, and by subtraction: np.diff's overhead is most of its cost on a
    # decode step's few rows (seen ~7 calls a one-row message, 10 us each).
    @cached_property
    def rows_per_slice(self) -> np.ndarray:
        return self.row_start[1:] - self.row_start[:-1]

    @cached_property
    def posts_per_slice(self) -> np.ndarray:
        return self.post_start[1:] - self.post_start[:-1]

    @cached_property
    def codes_per_row(self) -> np.ndarray:
        return self.row_offsets[1:] - self.row_offsets[:-1]

    def row_slices(self) -> np.ndarray:
        """Slice index of every row."""
        return np.repeat(np.arange(self.num_slices), self.rows_per_slice)

    def positions(self) -> np.ndarray:
        """Absolute position of every row (int64)."""
        owner = self.row_slices()
        return self.first_positions[owner] + (np.arange(self.num_rows) - self.row_start[owner])


_PHASES = frozenset((Phase.PHASE_PROMPT, Phase.PHASE_GENERATED))


def _slice_error(i: int, message: RequestSlice, d_sae_of_slot: dict[int, int], max_position: int) -> None:
    """Raise the WireFormatError that says what is wrong with slice i (only called when something is)."""
    where = f"slices[{i}] request {message.request_id!r}"
    if not message.request_id:
        raise WireFormatError(f"slices[{i}]: slice without request_id")
    if message.phase not in _PHASES:
        raise WireFormatError(f"{where}: phase must be PROMPT or GENERATED")
    if message.slot not in d_sae_of_slot:
        raise WireFormatError(f"{where}: slot {message.slot} is not in the manifest")
    n = message.num_rows
    if message.first_position + n > max_position:
        raise WireFormatError(
            f"{where}: positions {message.first_position}..{message.first_position + n} exceed {max_position}"
        )
    nnz = len(message.feature_ids) // 4
    for field, size, expected in (
        ("token_ids", len(message.token_ids), 4 * n),
        ("row_offsets", len(message.row_offsets), 4 * (n + 1)),
        ("feature_ids", len(message.feature_ids), 4 * nnz),
        ("activations", len(message.activations), 2 * nnz),
        ("reconstruction_errors", len(message.reconstruction_errors), 4 * n if message.reconstruction_errors else 0),
        ("input_norms", len(message.input_norms), 4 * n if message.input_norms else 0),
    ):
        if size != expected:
            raise WireFormatError(f"{where}: {field} has {size} bytes, expected {expected} ({n} rows, {nnz} codes)")
    raise WireFormatError(f"{where}: malformed")


def unpack_batch(slices, d_sae_of_slot: dict[int, int], max_position: int = MAX_POSITION) -> BatchArrays:
    """Decode and validate every slice of a batch at once. A problem raises WireFormatError naming the slice
    (`slices[i]`), its request and the field; nothing of a bad batch is returned."""
    count = len(slices)
    request_ids, slots, firsts, phases = (
        [],
        np.empty(count, np.int64),
        np.empty(count, np.int64),
        np.empty(count, np.int64),
    )
    rows, posts = np.empty(count, np.int64), np.empty(count, np.int64)
    tokens, offsets, features, acts = [], [], [], []
    errors, norms, measured = [], [], False
    phases_allowed = _PHASES
    for i, message in enumerate(slices):
        request_id = message.request_id
        n = message.num_rows
        first = message.first_position
        slot = message.slot
        phase = message.phase
        token_bytes, offset_bytes = message.token_ids, message.row_offsets
        feature_bytes, act_bytes = message.feature_ids, message.activations
        error_bytes, norm_bytes = message.reconstruction_errors, message.input_norms
        nnz = len(feature_bytes) >> 2
        if (
            not request_id
            or phase not in phases_allowed
            or slot not in d_sae_of_slot
            or first + n > max_position
            or len(token_bytes) != 4 * n
            or len(offset_bytes) != 4 * (n + 1)
            or len(feature_bytes) != 4 * nnz
            or len(act_bytes) != 2 * nnz
            or (error_bytes and len(error_bytes) != 4 * n)
            or (norm_bytes and len(norm_bytes) != 4 * n)
        ):
            _slice_error(i, message, d_sae_of_slot, max_position)
        request_ids.append(request_id)
        slots[i], firsts[i], phases[i], rows[i], posts[i] = slot, first, phase, n, nnz
        tokens.append(token_bytes)
        offsets.append(offset_bytes)
        features.append(feature_bytes)
        acts.append(act_bytes)
        if error_bytes or norm_bytes:
            measured = True
        errors.append(error_bytes)
        norms.append(norm_bytes)
    row_start = np.zeros(count + 1, np.int64)
    np.cumsum(rows, out=row_start[1:])
    post_start = np.zeros(count + 1, np.int64)
    np.cumsum(posts, out=post_start[1:])
    local = np.frombuffer(b"".join(offsets), dtype=U32).astype(np.int64)  # [rows + slices]
    first_of_slice = row_start[:-1] + np.arange(count)  # where each slice's offsets begin in `local`
    last_of_slice = first_of_slice + rows
    bad = np.flatnonzero((local[first_of_slice] != 0) | (local[last_of_slice] != posts))
    if len(bad):
        i = int(bad[0])
        raise WireFormatError(
            f"slices[{i}] request {request_ids[i]!r}: row_offsets must start at 0 and end at {posts[i]}"
        )
    steps = local[1:] - local[:-1]
    steps[last_of_slice[:-1]] = 0  # across slice boundaries
    if len(steps) and steps.min() < 0:
        at = int(np.flatnonzero(steps < 0)[0])
        i = int(np.searchsorted(first_of_slice, at, side="right") - 1)
        raise WireFormatError(f"slices[{i}] request {request_ids[i]!r}: row_offsets must start at 0 and never decrease")
    keep = np.ones(len(local), bool)
    keep[last_of_slice] = False  # each slice's end offset; the next slice starts at 0 again
    row_offsets = np.zeros(int(row_start[-1]) + 1, np.int64)
    row_offsets[:-1] = local[keep] + np.repeat(post_start[:-1], rows)
    row_offsets[-1] = post_start[-1]
    feature_ids = np.frombuffer(b"".join(features), dtype=U32)
    activations = np.frombuffer(b"".join(acts), dtype=F16)
    if len(feature_ids):
        d_sae = np.array([d_sae_of_slot[int(s)] for s in slots], np.int64)
        too_large = feature_ids >= np.repeat(d_sae, posts)
        if too_large.any():
            at = int(np.flatnonzero(too_large)[0])
            i = int(np.searchsorted(post_start, at, side="right") - 1)
            raise WireFormatError(
                f"slices[{i}] request {request_ids[i]!r}: feature id {int(feature_ids[at])} >= d_sae {d_sae[i]} "
                f"of slot {int(slots[i])}"
            )
        finite = np.isfinite(activations)
        if not finite.all():
            at = int(np.flatnonzero(~finite)[0])
            i = int(np.searchsorted(post_start, at, side="right") - 1)
            raise WireFormatError(
                f"slices[{i}] request {request_ids[i]!r}: activations hold {int((~finite).sum())} NaN or infinite "
                "values"
            )
    row_errors = row_norms = None
    if measured:  # a slice that measured nothing reads as NaN ("not measured") beside those that did
        row_errors, row_norms = (
            np.frombuffer(b"".join(part or _nan_bytes(int(n)) for part, n in zip(parts, rows, strict=True)), F32)
            for parts in (errors, norms)
        )
        for field, values in (("reconstruction_errors", row_errors), ("input_norms", row_norms)):
            bad = values < 0  # NaN compares False: NaN means "not measured"; infinities are refused
            bad |= np.isinf(values)
            if bad.any():
                at = int(np.flatnonzero(bad)[0])
                i = int(np.searchsorted(row_start, at, side="right") - 1)
                raise WireFormatError(
                    f"slices[{i}] request {request_ids[i]!r}: {field} holds negative or infinite values"
                )
    return BatchArrays(
        request_ids,
        slots,
        firsts,
        phases,
        row_start,
        post_start,
        np.frombuffer(b"".join(tokens), dtype=U32),
        row_offsets,
        feature_ids,
        activations,
        row_errors,
        row_norms,
    )


def _nan_bytes(rows: int) -> bytes:
    return np.full(rows, np.nan, F32).tobytes()
