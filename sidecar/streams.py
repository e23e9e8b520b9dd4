"""The ingest protocol: a producer stream opens with a manifest naming its SAE slots, then sends request starts,
code batches, gaps and finishes. Everything a producer could get wrong is checked here, before any of it
touches the core's state, and answered with INVALID_ARGUMENT naming the field and the reason.
"""

from __future__ import annotations

import math

import grpc
import numpy as np

from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto.codec import BatchArrays, WireFormatError, unpack_batch

from .config import LimitsConfig
from .errors import MonitorError
from .keys import concat_ranges
from .registry import SaeIdentity, SaeRegistry

OPEN_ENDED = 0xFFFFFFFF  # Gap.end of a gap that runs to the end of the request

MAX_HEADS = 1 << 12  # attention heads per layer: far above any model's
MANIFEST_STRING_CHARS = 256  # every string a manifest carries (names, hashes, model, producer)


class Stream:
    """One producer's Ingest stream: its manifest and how its slot numbers map to sidecar-wide gslots."""

    def __init__(self, manifest: pb.Manifest, slots: dict[int, int], d_sae: dict[int, int]) -> None:
        self.manifest = manifest
        self.slots = slots  # producer slot -> gslot
        self.d_sae = d_sae
        self.active = False  # sent more than its manifest
        self.last_step = -1
        self.batches = 0
        self.postings = 0
        self.finished = 0
        # producer slot -> its calibration baseline (absent: uncalibrated), and its latest wiring check
        self.baselines: dict[int, pb.FidelityBaseline] = {
            s.slot: s.baseline for s in manifest.slots if s.HasField("baseline")
        }
        self.wiring: dict[int, pb.WiringCheck] = {}

    @property
    def producer(self) -> str:
        return self.manifest.instance_id or "unknown"


def open_stream(manifest: pb.Manifest, registry: SaeRegistry, limits: LimitsConfig) -> Stream:
    """Validate a manifest and register its SAEs; a manifest without slots opens a control stream."""
    if manifest.contract_version < 1:
        raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, "manifest: contract_version must be >= 1")
    for name in ("producer", "model", "instance_id"):
        _bounded(getattr(manifest, name), f"manifest.{name}")
    if len(manifest.slots) > limits.max_slots_per_manifest:
        raise MonitorError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"manifest: {len(manifest.slots)} slots, more than limits.max_slots_per_manifest "
            f"({limits.max_slots_per_manifest})",
        )
    slots: dict[int, int] = {}
    d_sae: dict[int, int] = {}
    for i, slot in enumerate(manifest.slots):
        where = f"manifest.slots[{i}] (slot {slot.slot})"
        if slot.slot in d_sae:
            raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: slot number used twice")
        for name in ("name", "architecture", "weights_hash", "hook_point"):
            if not getattr(slot, name):
                raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: {name} is required")
        for name in ("name", "architecture", "weights_hash", "hook_point", "selection", "source_format"):
            _bounded(getattr(slot, name), f"{where}.{name}")
        if slot.d_in == 0 or slot.d_sae == 0:
            raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: d_in and d_sae must be > 0")
        if slot.HasField("head") and (slot.hook_point != "attn_z" or slot.head >= MAX_HEADS):
            raise MonitorError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{where}: head {slot.head} needs hook_point attn_z and a head number below {MAX_HEADS}",
            )
        if slot.d_sae > limits.max_d_sae:
            raise MonitorError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{where}: d_sae {slot.d_sae} is more than limits.max_d_sae ({limits.max_d_sae})",
            )
        if slot.HasField("baseline"):
            check_baseline(slot.baseline, slot.d_sae, f"{where}.baseline")
        _bounded(slot.decoder_hash, f"{where}.decoder_hash")
        d_sae[slot.slot] = slot.d_sae
    for i, slot in enumerate(manifest.slots):  # register only a manifest that is valid as a whole
        try:
            slots[slot.slot] = registry.register(SaeIdentity.from_proto(slot), slot.slot)
        except ValueError as exc:
            registry.release(list(slots.values()))
            where = f"manifest.slots[{i}] (slot {slot.slot})"
            raise MonitorError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{where}: {exc}") from None
    return Stream(manifest, slots, d_sae)


def check_baseline(baseline: pb.FidelityBaseline, d_sae: int, where: str) -> None:
    """A baseline's numbers are finite and non-negative, its threshold positive, and its firing frequencies (if
    any) one float32 per feature: it sets thresholds and the drift reference, so garbage must not get in."""
    numbers = {
        name: getattr(baseline, name)
        for name in ("error_threshold", "error_mean", "error_p50", "error_p99", "norm_mean", "norm_p50", "l0_mean")
    }
    for name, value in numbers.items():
        if not math.isfinite(value) or value < 0:
            raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, f"{where}.{name}: {value} is not a finite value >= 0")
    if baseline.error_threshold <= 0:
        raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, f"{where}.error_threshold: must be > 0")
    _bounded(baseline.source, f"{where}.source", limit=1024)
    frequencies = baseline.firing_frequencies
    if frequencies:
        if len(frequencies) != 4 * d_sae:
            raise MonitorError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{where}.firing_frequencies: {len(frequencies)} bytes, expected {4 * d_sae} (d_sae float32 values)",
            )
        values = np.frombuffer(frequencies, "<f4")
        if not (np.isfinite(values).all() and (values >= 0).all() and (values <= 1).all()):
            raise MonitorError(
                grpc.StatusCode.INVALID_ARGUMENT, f"{where}.firing_frequencies: values must be shares in 0..1"
            )


def check_wiring(stream: Stream, stats: pb.ProducerStats) -> list[pb.WiringCheck]:
    """The producer's wiring checks this batch reports for the first time (valid ones only)."""
    new = []
    for i, check in enumerate(stats.wiring[: len(stream.slots) or 0]):
        if check.slot not in stream.slots:
            raise MonitorError(
                grpc.StatusCode.INVALID_ARGUMENT, f"stats.wiring[{i}]: slot {check.slot} is not in the manifest"
            )
        _bounded(check.detail, f"stats.wiring[{i}].detail", limit=2048)
        if stream.wiring.get(check.slot) != check:
            stream.wiring[check.slot] = check
            new.append(check)
    return new


def _bounded(value: str, field: str, limit: int = MANIFEST_STRING_CHARS) -> None:
    if len(value) > limit:
        raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {len(value)} characters, more than {limit}")


def request_id_ok(request_id: str, field: str, limits: LimitsConfig) -> str:
    """A request id named by a caller: non-empty and at most limits.max_request_id_bytes (UTF-8)."""
    if not request_id:
        raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: a request id is required")
    if len(request_id) * 4 > limits.max_request_id_bytes and len(request_id.encode()) > limits.max_request_id_bytes:
        raise MonitorError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{field}: request id {shown(request_id)} is longer than limits.max_request_id_bytes "
            f"({limits.max_request_id_bytes})",
        )
    return request_id


def shown(request_id: str) -> str:
    """A request id as error messages and logs quote it: escaped, and cut short when long."""
    return repr(request_id if len(request_id) <= 80 else request_id[:80] + "...")


def decode_batch(stream: Stream, batch: pb.CodeBatch, limits: LimitsConfig) -> BatchArrays:
    """Every slice of a code batch, decoded and validated as a whole before any of it is applied."""
    if batch.step <= stream.last_step:
        raise MonitorError(
            grpc.StatusCode.INVALID_ARGUMENT, f"code batch step {batch.step} after step {stream.last_step}"
        )
    try:
        arrays = unpack_batch(batch.slices, stream.d_sae, limits.max_positions)
    except WireFormatError as exc:
        raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
    for i, request_id in enumerate(arrays.request_ids):
        request_id_ok(request_id, f"slices[{i}].request_id", limits)
    return arrays


def check_finish(finish: pb.RequestFinish, limits: LimitsConfig, field: str = "finish") -> None:
    """`field`: where the finish is in the message (a finish message, or `codes.finishes[i]` in a code batch)."""
    request_id_ok(finish.request_id, f"{field}.request_id", limits)
    if finish.num_positions > limits.max_positions:
        raise MonitorError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{field} of {shown(finish.request_id)}: num_positions {finish.num_positions} is more than "
            f"limits.max_positions ({limits.max_positions})",
        )
    check_gaps(finish.request_id, finish.gaps, f"{field}.gaps", limits)
    if len(finish.slots) > limits.max_slots_per_manifest or len(set(finish.slots)) != len(finish.slots):
        raise MonitorError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{field} of {shown(finish.request_id)}: slots must be distinct and at most "
            f"limits.max_slots_per_manifest ({limits.max_slots_per_manifest})",
        )
    _bounded(finish.model, f"{field}.model")
    _bounded(finish.finish_reason, f"{field}.finish_reason")


def check_gaps(request_id: str, gaps, field: str, limits: LimitsConfig) -> None:
    """Gaps end after they start, inside the position bound (or open-ended), at most max_gaps_per_request."""
    if len(gaps) > limits.max_gaps_per_request:
        raise MonitorError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{field} of {shown(request_id)}: {len(gaps)} gaps, more than limits.max_gaps_per_request "
            f"({limits.max_gaps_per_request})",
        )
    for i, gap in enumerate(gaps):
        if gap.end < gap.start or (gap.end > limits.max_positions and gap.end != OPEN_ENDED):
            raise MonitorError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{field}[{i}] of {shown(request_id)}: [{gap.start}, {gap.end}) is not a range inside "
                f"limits.max_positions ({limits.max_positions})",
            )


def keep_slices(arrays: BatchArrays, keep: np.ndarray) -> BatchArrays:
    """The batch with only some of its slices (sorted indices), e.g. without requests already final."""
    rows = arrays.rows_per_slice[keep]
    posts = arrays.posts_per_slice[keep]
    row_index = concat_ranges(arrays.row_start[keep], rows)
    post_index = concat_ranges(arrays.post_start[keep], posts)
    row_start = np.concatenate(([0], np.cumsum(rows)))
    post_start = np.concatenate(([0], np.cumsum(posts)))
    counts = arrays.codes_per_row[row_index]
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
        arrays.errors[row_index] if arrays.errors is not None else None,
        arrays.norms[row_index] if arrays.norms is not None else None,
    )


def check_start(start: pb.RequestStart, limits: LimitsConfig) -> None:
    request_id_ok(start.request_id, "start.request_id", limits)
    _bounded(start.model, "start.model")
    check_gaps(start.request_id, start.gaps, "start.gaps", limits)
    for field, values in (("labels", start.labels), ("notes", start.notes)):
        if len(values) > 64 or any(len(v) > 1024 for v in values):
            raise MonitorError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"start.{field} of {shown(start.request_id)}: at most 64, of at most 1024 characters each",
            )
    for field, value in (("response_id", start.response_id), ("traceparent", start.trace.traceparent)):
        if len(value) > limits.max_request_id_bytes:
            raise MonitorError(
                grpc.StatusCode.INVALID_ARGUMENT, f"start.{field} of {shown(start.request_id)}: too long"
            )
    if len(start.trace.tracestate) > 1024:
        raise MonitorError(
            grpc.StatusCode.INVALID_ARGUMENT, f"start.trace.tracestate of {shown(start.request_id)}: too long"
        )
