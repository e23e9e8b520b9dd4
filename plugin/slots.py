"""A worker's slots: each configured SAE loaded, placed at its tap, checked against the model and its files,
with its encoder and calibration baseline; and which tensor-parallel rank encodes which slot.

Under tensor parallelism every rank holds the whole residual stream and the whole attention and MLP outputs
(the output projections all-reduce), but attn_z is split by heads: rank r holds heads [r * n / tp, (r + 1) * n / tp).
Each rank encodes the slots it can read alone: rank 0 every slot but attn_z ones, and every rank the per-head slots
of its own heads. Nothing is gathered across ranks on the step path (a collective per tapped layer per step, and a
hang if ranks ever disagreed on a step). A slot reading all heads at once needs every rank's heads, so under
tensor parallelism it is refused at start-up; per-head slots are the way to read attn_z there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from circuitwatch.kernels import ReferenceEncoder, Sae, SaeFormatError, load_sae
from circuitwatch.kernels.baseline import FidelityBaseline, default_path, load_baseline
from circuitwatch.kernels.encoders import make_encoder
from circuitwatch.kernels.hook_points import HookPoint, ModelShape, Tap, TapMismatchError, resolve_tap
from circuitwatch.kernels.selection import selection_for
from circuitwatch.proto import circuitwatch_pb2 as pb

from .config import PluginConfig, PluginConfigError, SlotConfig
from .wiring import SlotWiringCheck

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Parallelism:
    """This worker's tensor-parallel rank and the attention heads it holds."""

    rank: int = 0
    size: int = 1
    num_heads: int = 1

    @property
    def heads_per_rank(self) -> int:
        return self.num_heads // self.size

    def owner(self, tap: Tap) -> int | None:
        """The rank that encodes a tap; None when no single rank holds what it reads."""
        if tap.hook_point is not HookPoint.ATTN_Z:
            return 0
        if tap.head is None:
            return 0 if self.size == 1 else None
        return tap.head // self.heads_per_rank

    def local_columns(self, tap: Tap, head_dim: int) -> slice | None:
        """The columns of this rank's attn_z tensor that a per-head tap reads (None: the whole tensor)."""
        if tap.head is None:
            return None
        local = tap.head - self.rank * self.heads_per_rank
        return slice(local * head_dim, (local + 1) * head_dim)


@dataclass
class Slot:
    number: int
    config: SlotConfig
    tap: Tap
    sae: Sae
    encoder: ReferenceEncoder  # or any backend with the same encode() and selection
    columns: slice | None = None  # attn_z of one head: its columns in this rank's captured tensor
    baseline: FidelityBaseline | None = None
    wiring: SlotWiringCheck | None = None

    def describe(self) -> str:
        return f"slot {self.number} ({self.sae.name} at {self.tap.label()})"

    def read(self, captured: dict, rows: torch.Tensor | slice) -> torch.Tensor | None:
        """This slot's input rows from a step's captured tensors (None if its stream was not captured): the
        rows indexed, or a slice of them (a view: every row of the step monitored)."""
        tensor = captured.get(self.tap.stream())
        if tensor is None:
            return None
        if self.columns is not None:
            tensor = tensor[:, self.columns]
        if isinstance(rows, slice):
            if tensor.shape[0] < rows.stop:  # as index_select would refuse it: never fewer codes than rows
                raise IndexError(f"{self.describe()}: {tensor.shape[0]} captured rows, the step has {rows.stop}")
            return tensor[rows]
        return tensor.index_select(0, rows.to(tensor.device))


def slot_tap(number: int, slot: SlotConfig, sae: Sae, shape: ModelShape, num_layers: int) -> Tap:
    """Where the slot reads: as configured, else as the SAE's files say. An SAE whose files name another tap is
    refused (unless check_sae_metadata: false), and so is one whose d_in does not fit what the tap reads."""
    if slot.layer >= num_layers:
        raise PluginConfigError(
            f"slots[{number}].layer: {slot.layer} does not exist (the model has {num_layers} layers)"
        )
    try:
        tap = resolve_tap(sae.spec, slot.layer, slot.hook_point, slot.head, slot.check_sae_metadata)
    except TapMismatchError as exc:
        raise PluginConfigError(
            f"slots[{number}]: {exc}; fix the slot, or set check_sae_metadata: false if this is meant"
        ) from None
    misfit = shape.misfit(tap, sae.spec.d_in)
    if misfit is not None:
        field, reason = misfit
        where = f"{sae.spec.path}: " if field == "sae" else ""
        raise PluginConfigError(f"slots[{number}].{field}: {where}{reason}")
    return tap


def slot_baseline(number: int, slot: SlotConfig, sae: Sae, tap: Tap, fingerprint: str) -> FidelityBaseline | None:
    """The slot's calibration baseline: the configured file, else the one next to the SAE if present."""
    path = slot.baseline or default_path(sae)
    if slot.baseline is None and not path.is_file():
        if sae.decoder is not None:
            log.warning(
                "circuitwatch: slots[%d] (%s) has no fidelity baseline: reports use the uncalibrated error threshold "
                "and drift is not judged; run `circuitwatch calibrate`",
                number,
                sae.name,
            )
        return None
    try:
        return load_baseline(path, sae, tap, fingerprint)
    except SaeFormatError as exc:
        raise PluginConfigError(f"slots[{number}].baseline: {exc}") from None


def build_slots(
    config: PluginConfig,
    shape: ModelShape,
    num_layers: int,
    fingerprint: str,
    device: torch.device,
    parallel: Parallelism = Parallelism(),
    rows_dtype: torch.dtype = torch.float32,
) -> list[Slot]:
    """Every configured slot checked (on every rank, so a bad one fails start-up everywhere); returns those this
    rank encodes."""
    slots = []
    for number, slot in enumerate(config.slots):
        sae = load_sae(slot.sae, slot.format, name=slot.name)
        tap = slot_tap(number, slot, sae, shape, num_layers)
        owner = parallel.owner(tap)
        if owner is None:
            raise PluginConfigError(
                f"slots[{number}]: {tap.label()} reads all {shape.num_heads} heads, but with tensor parallelism "
                f"{parallel.size} each rank holds {parallel.heads_per_rank}: use per-head slots (head: H), each "
                "encoded by the rank that holds its head"
            )
        selection = selection_for(slot.selection, slot.k, sae, config.max_codes_per_token)
        baseline = slot_baseline(number, slot, sae, tap, fingerprint)
        if baseline is not None and baseline.selection != selection.describe():
            raise PluginConfigError(
                f"slots[{number}].baseline: {baseline.path}: calibrated with selection {baseline.selection!r}, "
                f"this slot selects {selection.describe()!r}: calibrate again with the slot's selection"
            )
        if owner != parallel.rank:
            continue
        try:
            encoder = make_encoder(sae, selection, config.encoder_backend, device, rows_dtype)
        except (ImportError, ValueError) as error:  # e.g. triton without CUDA, onnx on CUDA without onnxruntime-gpu
            backend = config.encoder_backend
            raise PluginConfigError(f"encoder_backend {backend!r} for slots[{number}]: {error}") from error
        columns = parallel.local_columns(tap, shape.head_dim)
        built = Slot(number, slot, tap, sae, encoder, columns, baseline)
        if config.wiring_check.enabled and sae.decoder is not None:
            built.wiring = SlotWiringCheck(number, built.describe(), baseline, config.wiring_check)
        slots.append(built)
    return slots


def slot_proto(slot: Slot) -> pb.SaeSlot:
    """The slot as the manifest names it: the SAE's identity, where it reads, and its baseline."""
    proto = pb.SaeSlot(
        slot=slot.number,
        name=slot.sae.name,
        architecture=slot.sae.spec.architecture.value,
        layer=slot.tap.layer,
        hook_point=str(slot.tap.hook_point),
        d_in=slot.sae.spec.d_in,
        d_sae=slot.sae.spec.d_sae,
        weights_hash=slot.sae.weights_hash,
        selection=slot.encoder.selection.describe(),
        source_format=slot.sae.spec.source_format,
        baseline=baseline_proto(slot.baseline, slot.config),
        decoder_hash=slot.sae.decoder_hash,
    )
    if slot.tap.head is not None:
        proto.head = slot.tap.head
    return proto


def baseline_proto(baseline: FidelityBaseline | None, slot: SlotConfig) -> pb.FidelityBaseline | None:
    if baseline is None:
        if slot.error_threshold is None:
            return None
        return pb.FidelityBaseline(
            source="the slot's error_threshold (uncalibrated)", error_threshold=slot.error_threshold
        )
    frequencies = np.asarray(baseline.firing_frequencies, "<f4")
    return pb.FidelityBaseline(
        source=f"circuitwatch calibrate: {baseline.documents} documents, {baseline.tokens} tokens ({baseline.text})"[
            :1024
        ],
        error_threshold=slot.error_threshold or baseline.error_threshold,
        error_mean=baseline.error.mean,
        error_p50=baseline.error.p50,
        error_p99=baseline.error.p99,
        norm_mean=baseline.norm.mean,
        norm_p50=baseline.norm.p50,
        l0_mean=baseline.l0_mean,
        tokens=baseline.tokens,
        firing_frequencies=frequencies.tobytes(),
    )
