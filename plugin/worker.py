"""The plugin inside one vLLM worker: SAEs and encoders, taps, per-step row mapping, encoding, emission.

Runs only on tensor-parallel rank 0 (other ranks hold the same residual stream). Every failure is logged
and counted; nothing raises into vLLM's step.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from circuitwatch import __version__
from circuitwatch.kernels import Codes, ReferenceEncoder, Sae, SaeFormatError, load_sae
from circuitwatch.kernels.baseline import FidelityBaseline, default_path, load_baseline, model_fingerprint
from circuitwatch.kernels.encoders import make_encoder
from circuitwatch.kernels.selection import selection_for
from circuitwatch.kernels.spec import trained_tap
from circuitwatch.proto import CONTRACT_VERSION
from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto.codec import pack_slice

from .admission import Admission
from .config import PluginConfig, PluginConfigError, SlotConfig
from .emitter import BuiltBatch, Emitter
from .request_ids import client_request_id, request_key
from .rowmap import StepRows, rows_from_v1_runner, rows_from_v2_batch
from .taps import TAPS, install_taps
from .wiring import SlotWiringCheck

log = logging.getLogger(__name__)


@dataclass
class Slot:
    number: int
    config: SlotConfig
    sae: Sae
    encoder: ReferenceEncoder  # or any backend with the same encode() and selection
    baseline: FidelityBaseline | None = None
    wiring: SlotWiringCheck | None = None

    def describe(self) -> str:
        return f"slot {self.number} ({self.sae.name} on layer {self.config.layer}, {self.config.hook_point})"


@dataclass
class TrackedRequest:
    internal_id: str
    external_id: str  # the sidecar's key (request_ids.request_key)
    monitored: bool
    num_prompt_tokens: int = 0


def check_tap(number: int, slot: SlotConfig, sae: Sae) -> None:
    """An SAE whose files say it was trained elsewhere than this slot taps is refused (unless the slot says
    check_sae_metadata: false): its codes would be read from the wrong residual stream."""
    layer, hook_point = trained_tap(sae.spec)
    wrong = []
    if layer is not None and layer != slot.layer:
        wrong.append(f"layer {layer}")
    if hook_point is not None and hook_point != slot.hook_point:
        wrong.append(f"hook point {hook_point}")
    if wrong and slot.check_sae_metadata:
        where = f" ({sae.spec.hook_name})" if sae.spec.hook_name else ""
        raise PluginConfigError(
            f"slots[{number}]: SAE {sae.spec.path} was trained on {' and '.join(wrong)}{where}, but this slot taps "
            f"layer {slot.layer} ({slot.hook_point}); fix the slot, or set check_sae_metadata: false if this is meant"
        )


def slot_baseline(number: int, slot: SlotConfig, sae: Sae, fingerprint: str) -> FidelityBaseline | None:
    """The slot's calibration baseline: the configured file, else the one next to the SAE if present."""
    path = slot.baseline or default_path(sae)
    if slot.baseline is None and not path.is_file():
        log.warning(
            "circuitwatch: slots[%d] (%s) has no fidelity baseline: reports use the uncalibrated error threshold and "
            "drift is not judged; run `circuitwatch calibrate`",
            number,
            sae.name,
        )
        return None
    try:
        return load_baseline(path, sae, slot.layer, slot.hook_point, fingerprint)
    except SaeFormatError as exc:
        raise PluginConfigError(f"slots[{number}].baseline: {exc}") from None


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


class WorkerPlugin:
    """The plugin in one worker: the slots' SAEs and encoders, the taps, and per step the row map, encoding and
    hand-off to the emitter. Every failure is logged and counted; nothing raises into vLLM's step."""

    def __init__(self, config: PluginConfig, vllm_config, model: torch.nn.Module, device: torch.device) -> None:
        self.config = config
        hidden_size = vllm_config.model_config.get_hidden_size()
        fingerprint = model_fingerprint(vllm_config.model_config.hf_config.to_dict())
        self.slots: list[Slot] = []
        for number, slot in enumerate(config.slots):
            sae = load_sae(slot.sae, slot.format, expected_d_in=hidden_size, name=slot.name)
            check_tap(number, slot, sae)
            selection = selection_for(slot.selection, slot.k, sae, config.max_codes_per_token)
            encoder = make_encoder(sae, selection, config.encoder_backend, device)
            baseline = slot_baseline(number, slot, sae, fingerprint)
            if baseline is not None and baseline.selection != selection.describe():
                raise PluginConfigError(
                    f"slots[{number}].baseline: {baseline.path}: calibrated with selection {baseline.selection!r}, "
                    f"this slot selects {selection.describe()!r}: calibrate again with the slot's selection"
                )
            self.slots.append(Slot(number, slot, sae, encoder, baseline))
        for s in self.slots:
            if config.wiring_check.enabled and s.sae.decoder is not None:
                s.wiring = SlotWiringCheck(s.number, s.describe(), s.baseline, config.wiring_check)
        present = set(install_taps(model, [s.config.layer for s in self.slots]))
        self.slots = [s for s in self.slots if s.config.layer in present]
        self.model_name = vllm_config.model_config.served_model_name or vllm_config.model_config.model
        self.manifest = pb.Manifest(
            contract_version=CONTRACT_VERSION,
            producer=f"circuitwatch-plugin/{__version__} vllm/{_vllm_version()}",
            model=str(self.model_name),
            instance_id=f"{socket.gethostname()}:{os.getpid()}",
            slots=[
                pb.SaeSlot(
                    slot=s.number,
                    name=s.sae.name,
                    architecture=s.sae.spec.architecture.value,
                    layer=s.config.layer,
                    hook_point=s.config.hook_point,
                    d_in=s.sae.spec.d_in,
                    d_sae=s.sae.spec.d_sae,
                    weights_hash=s.sae.weights_hash,
                    selection=s.encoder.selection.describe(),
                    source_format=s.sae.spec.source_format,
                    baseline=baseline_proto(s.baseline, s.config),
                    decoder_hash=s.sae.decoder_hash,
                )
                for s in self.slots
            ],
        )
        self.emitter = Emitter(config.sidecar, self.manifest, config.queue_max_batches)
        self.requests: dict[str, TrackedRequest] = {}
        self.counters: Counter[str] = Counter()
        self.v2_batch = None  # set by the V2 runner patch
        log.info(
            "circuitwatch: monitoring layers %s with %s, codes to %s",
            [s.config.layer for s in self.slots],
            ", ".join(f"{s.sae.name} ({s.encoder.selection.describe()})" for s in self.slots),
            config.sidecar.address,
        )

    # --- around each step -----------------------------------------------------------------------------

    def before_step(self, runner, scheduler_output) -> None:
        try:
            for internal_id in getattr(scheduler_output, "finished_req_ids", ()) or ():
                self._forget(internal_id)
        except Exception:
            self.counters["errors"] += 1
            log.exception("circuitwatch: finishing requests failed")
        TAPS.begin_step()

    def after_step(self, runner, scheduler_output) -> None:
        captured = TAPS.end_step()
        try:
            if captured and scheduler_output.total_num_scheduled_tokens:
                self._encode_step(runner, captured)
        except Exception:
            self.counters["errors"] += 1
            log.exception("circuitwatch: encoding a step failed; its rows are reported as gaps")

    def close(self) -> None:
        self.emitter.close()

    # --- requests -------------------------------------------------------------------------------------

    def _request_state(self, runner, internal_id: str):
        return getattr(runner, "requests", {}).get(internal_id)

    def _track(self, runner, internal_id: str, first_computed: int) -> TrackedRequest:
        tracked = self.requests.get(internal_id)
        if tracked is not None:
            return tracked
        state = self._request_state(runner, internal_id)
        params = getattr(state, "sampling_params", None)
        admission = Admission.from_extra_args(getattr(params, "extra_args", None), self.config)
        tracked = TrackedRequest(
            internal_id,
            request_key(internal_id),
            monitored=admission.monitored,
            num_prompt_tokens=int(getattr(state, "num_prompt_tokens", 0) or _v2_prompt_len(runner, internal_id)),
        )
        self.requests[internal_id] = tracked
        if not tracked.monitored:
            return tracked
        gaps = []
        if first_computed > 0:  # prefix-cache hit: these positions were never computed here
            gaps = [
                pb.Gap(slot=s.number, start=0, end=first_computed, reason=pb.GAP_REASON_PREFIX_CACHE)
                for s in self.slots
            ]
        self.emitter.submit(
            pb.IngestMessage(
                start=pb.RequestStart(
                    request_id=tracked.external_id,
                    response_id=client_request_id(internal_id),
                    model=str(self.model_name),
                    arrival_unix_nanos=time.time_ns(),
                    num_prompt_tokens=tracked.num_prompt_tokens,
                    labels=admission.labels,
                    trace=pb.TraceContext(traceparent=admission.traceparent, tracestate=admission.tracestate),
                    gaps=gaps,
                    notes=admission.notes,
                )
            )
        )
        self.counters["requests_monitored"] += 1
        return tracked

    def _forget(self, internal_id: str) -> None:
        """The engine core sends the finish marker (it knows at once; workers learn a step later); the
        emitter keeps the request's start a while longer, to resend it if the sidecar turns out to have lost
        it."""
        tracked = self.requests.pop(internal_id, None)
        if tracked is not None and tracked.monitored:
            self.emitter.forget(tracked.external_id)

    # --- encoding -------------------------------------------------------------------------------------

    def _rows(self, runner) -> StepRows:
        if hasattr(runner, "input_batch") and hasattr(runner.input_batch, "num_computed_tokens_cpu"):
            return rows_from_v1_runner(runner)
        if self.v2_batch is None:
            raise RuntimeError("V2 runner step without a captured input batch")
        return rows_from_v2_batch(self.v2_batch)

    def _encode_step(self, runner, captured: dict[int, torch.Tensor]) -> None:
        rows = self._rows(runner)
        tracked = [
            self._track(runner, rid, int(first)) for rid, first in zip(rows.req_ids, rows.first_computed, strict=True)
        ]
        monitored = np.array([t.monitored for t in tracked], dtype=bool)
        if not len(monitored) or not monitored.any():
            return
        selected = np.flatnonzero(monitored[rows.row_request])
        if not len(selected):
            return
        owner = rows.row_request[selected]
        positions = rows.positions[selected]
        tokens = rows.token_ids[selected]
        prompt_len = np.array([t.num_prompt_tokens for t in tracked], dtype=np.int64)[owner]
        generated = positions >= prompt_len
        # runs of consecutive positions of one request in one phase become one slice per slot
        breaks = (
            np.flatnonzero(
                (owner[1:] != owner[:-1]) | (generated[1:] != generated[:-1]) | (positions[1:] != positions[:-1] + 1)
            )
            + 1
        )
        bounds = np.concatenate(([0], breaks, [len(selected)]))
        encoded: list[tuple[Slot, Codes]] = []
        started = time.perf_counter_ns()
        for slot in self.slots:
            hidden = captured.get(slot.config.layer)
            if hidden is None:
                continue
            index = torch.from_numpy(selected).to(hidden.device)
            encoded.append((slot, _to_host(slot.encoder.encode(hidden.index_select(0, index)))))
        # On CUDA the copies above are non-blocking into pinned memory; the sending thread waits for this
        # event, then packs. The step path only launches kernels and enqueues.
        ready = _record_event(encoded)
        self.emitter.counters["encode_ns"] += time.perf_counter_ns() - started
        self.emitter.counters["steps_encoded"] += 1
        external_ids = [t.external_id for t in tracked]
        runs = [(int(a), int(b)) for a, b in itertools.pairwise(bounds)]
        ranges = [
            (external_ids[owner[a]], slot.number, int(positions[a]), int(positions[a]) + b - a)
            for slot, _ in encoded
            for a, b in runs
        ]

        def build() -> BuiltBatch:
            """On the sending thread: pack each run of each slot; rows no SAE can read become INVALID_INPUT gaps
            instead of codes, and the slot's valid rows feed its wiring check."""
            if ready is not None:
                ready.synchronize()
            batch = BuiltBatch([])
            for slot, codes in encoded:
                offsets, feature_ids, activations = codes.to_csr()
                errors = codes.errors.numpy() if codes.errors is not None else None
                norms = codes.norms.numpy() if codes.norms is not None else None
                valid = codes.valid.numpy()
                if slot.wiring is not None and errors is not None:
                    verdict = slot.wiring.add(errors[valid], norms[valid])
                    if verdict is not None:
                        self.emitter.wiring[slot.number] = verdict
                for run_start, run_end in runs:
                    request_id = external_ids[owner[run_start]]
                    for a, b, readable in _valid_runs(valid, run_start, run_end):
                        if not readable:
                            gap = pb.Gap(
                                slot=slot.number,
                                start=int(positions[a]),
                                end=int(positions[a]) + b - a,
                                reason=pb.GAP_REASON_INVALID_INPUT,
                            )
                            batch.gaps.setdefault(request_id, []).append(gap)
                            self.emitter.counters["rows_invalid_input"] += b - a
                            continue
                        start, end = int(offsets[a]), int(offsets[b])
                        batch.slices.append(
                            pack_slice(
                                request_id,
                                slot.number,
                                int(positions[a]),
                                pb.PHASE_GENERATED if generated[a] else pb.PHASE_PROMPT,
                                tokens[a:b],
                                offsets[a : b + 1] - offsets[a],
                                feature_ids[start:end],
                                activations[start:end],
                                errors[a:b] if errors is not None else None,
                                norms[a:b] if norms is not None else None,
                            )
                        )
            return batch

        self.counters["rows_encoded"] += len(selected)
        self.emitter.submit_deferred(build, ranges)


def _to_host(codes: Codes) -> Codes:
    """CPU codes as they are; CUDA tensors copied without blocking into pinned host buffers."""
    if codes.ids.device.type != "cuda":
        return codes

    def copy(tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None:
            return None
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        return host

    return Codes(copy(codes.ids), copy(codes.values), copy(codes.errors), copy(codes.norms))


def _valid_runs(valid: np.ndarray, start: int, end: int) -> list[tuple[int, int, bool]]:
    """[start, end) cut where row validity changes: (a, b, readable) pieces, usually just one."""
    piece = valid[start:end]
    if piece.all():
        return [(start, end, True)]
    cuts = np.flatnonzero(piece[1:] != piece[:-1]) + 1 + start
    bounds = [start, *cuts.tolist(), end]
    return [(a, b, bool(valid[a])) for a, b in itertools.pairwise(bounds)]


def _record_event(encoded: list) -> torch.cuda.Event | None:
    if not encoded or not torch.cuda.is_available() or not encoded[0][1].ids.is_pinned():
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def _v2_prompt_len(runner, internal_id: str) -> int:
    states = getattr(runner, "req_states", None)
    if states is None:
        return 0
    index = states.req_id_to_index.get(internal_id)
    return int(states.prompt_len[index]) if index is not None else 0


def _vllm_version() -> str:
    try:
        from vllm import __version__ as version

        return version
    except Exception:
        return "unknown"
