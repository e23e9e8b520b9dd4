"""The ingest protocol: a producer stream opens with a manifest naming its SAE slots, then sends request starts,
code batches, gaps and finishes. Everything a producer could get wrong is checked here, before any of it
touches the core's state, and answered with INVALID_ARGUMENT naming the field and the reason.
"""

from __future__ import annotations

import grpc
import numpy as np

from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto.codec import BatchArrays, WireFormatError, unpack_batch

from .errors import MonitorError
from .registry import SaeIdentity, SaeRegistry

MAX_D_SAE = 1 << 28  # the index packs feature ids into 28 bits


class Stream:
    """One producer's Ingest stream: its manifest and how its slot numbers map to sidecar-wide gslots."""

    def __init__(self, manifest: pb.Manifest, slots: dict[int, int], d_sae: dict[int, int]) -> None:
        self.manifest = manifest
        self.slots = slots  # producer slot -> gslot
        self.d_sae = d_sae
        self.last_step = -1
        self.batches = 0
        self.postings = 0
        self.finished = 0

    @property
    def producer(self) -> str:
        return self.manifest.instance_id or "unknown"


def open_stream(manifest: pb.Manifest, registry: SaeRegistry) -> Stream:
    """Validate a manifest and register its SAEs; a manifest without slots opens a control stream."""
    if manifest.contract_version < 1:
        raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, "manifest: contract_version must be >= 1")
    slots: dict[int, int] = {}
    d_sae: dict[int, int] = {}
    for i, slot in enumerate(manifest.slots):
        where = f"manifest.slots[{i}] (slot {slot.slot})"
        if slot.slot in slots:
            raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: slot number used twice")
        for name in ("name", "architecture", "weights_hash", "hook_point"):
            if not getattr(slot, name):
                raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: {name} is required")
        if slot.d_in == 0 or slot.d_sae == 0:
            raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: d_in and d_sae must be > 0")
        if slot.d_sae > MAX_D_SAE:
            raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: d_sae {slot.d_sae} exceeds 2^28")
        try:
            slots[slot.slot] = registry.register(SaeIdentity.from_proto(slot), slot.slot)
        except ValueError as exc:
            raise MonitorError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{where}: {exc}") from None
        d_sae[slot.slot] = slot.d_sae
    return Stream(manifest, slots, d_sae)


def decode_batch(stream: Stream, batch: pb.CodeBatch) -> BatchArrays:
    """Every slice of a code batch, decoded and validated as a whole before any of it is applied."""
    if batch.step <= stream.last_step:
        raise MonitorError(
            grpc.StatusCode.INVALID_ARGUMENT, f"code batch step {batch.step} after step {stream.last_step}"
        )
    try:
        return unpack_batch(batch.slices, stream.d_sae)
    except WireFormatError as exc:
        raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None


def keep_slices(arrays: BatchArrays, keep: np.ndarray) -> BatchArrays:
    """The batch with only some of its slices (sorted indices), e.g. without requests already final."""
    rows = np.diff(arrays.row_start)[keep]
    posts = np.diff(arrays.post_start)[keep]
    row_index = np.concatenate([np.arange(arrays.row_start[i], arrays.row_start[i + 1]) for i in keep])
    post_index = np.concatenate([np.arange(arrays.post_start[i], arrays.post_start[i + 1]) for i in keep])
    row_start = np.concatenate(([0], np.cumsum(rows)))
    post_start = np.concatenate(([0], np.cumsum(posts)))
    counts = np.diff(arrays.row_offsets)[row_index]
    return BatchArrays(
        [arrays.request_ids[i] for i in keep],
        arrays.slots[keep],
        arrays.first_positions[keep],
        arrays.phases[keep],
        row_start,
        post_start,
        arrays.token_ids[row_index],
        np.concatenate(([0], np.cumsum(counts))),
        arrays.feature_ids[post_index],
        arrays.activations[post_index],
    )


def require_request_id(kind: str, request_id: str) -> None:
    if not request_id:
        raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, f"request {kind} without request_id")
