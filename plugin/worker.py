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
from circuitwatch.kernels import Codes, CodeSelection, ReferenceEncoder, Sae, SelectionMode, default_selection, load_sae
from circuitwatch.kernels.encoders import make_encoder
from circuitwatch.proto import CONTRACT_VERSION
from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto.codec import pack_slice

from .admission import Admission
from .config import PluginConfig, SlotConfig
from .emitter import Emitter
from .request_ids import client_request_id, request_key
from .rowmap import StepRows, rows_from_v1_runner, rows_from_v2_batch
from .taps import TAPS, install_taps

log = logging.getLogger(__name__)


@dataclass
class Slot:
    number: int
    config: SlotConfig
    sae: Sae
    encoder: ReferenceEncoder  # or any backend with the same encode() and selection


@dataclass
class TrackedRequest:
    internal_id: str
    external_id: str  # the sidecar's key (request_ids.request_key)
    monitored: bool
    num_prompt_tokens: int = 0


def _selection(slot: SlotConfig, sae: Sae, max_codes: int) -> CodeSelection:
    if slot.selection == "default":
        return default_selection(sae, max_codes)
    if slot.selection == "argmax":
        return CodeSelection(SelectionMode.ARGMAX)
    if slot.selection == "topk":
        return CodeSelection(SelectionMode.TOPK, slot.k or sae.spec.k or max_codes)
    return CodeSelection(SelectionMode.THRESHOLD, slot.k or max_codes)


class WorkerPlugin:
    """The plugin in one worker: the slots' SAEs and encoders, the taps, and per step the row map, encoding and
    hand-off to the emitter. Every failure is logged and counted; nothing raises into vLLM's step."""

    def __init__(self, config: PluginConfig, vllm_config, model: torch.nn.Module, device: torch.device) -> None:
        self.config = config
        hidden_size = vllm_config.model_config.get_hidden_size()
        self.slots: list[Slot] = []
        for number, slot in enumerate(config.slots):
            sae = load_sae(slot.sae, slot.format, expected_d_in=hidden_size, name=slot.name)
            selection = _selection(slot, sae, config.max_codes_per_token)
            encoder = make_encoder(sae, selection, config.encoder_backend, device)
            self.slots.append(Slot(number, slot, sae, encoder))
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
        encoded: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        started = time.perf_counter_ns()
        for slot in self.slots:
            hidden = captured.get(slot.config.layer)
            if hidden is None:
                continue
            index = torch.from_numpy(selected).to(hidden.device)
            codes = slot.encoder.encode(hidden.index_select(0, index))
            encoded.append((slot.number, *_to_host(codes.ids, codes.values)))
        # On CUDA the copies above are non-blocking into pinned memory; the sending thread waits for this
        # event, then packs. The step path only launches kernels and enqueues.
        ready = _record_event(encoded)
        self.emitter.counters["encode_ns"] += time.perf_counter_ns() - started
        self.emitter.counters["steps_encoded"] += 1
        external_ids = [t.external_id for t in tracked]
        runs = [(int(a), int(b)) for a, b in itertools.pairwise(bounds)]
        ranges = [
            (external_ids[owner[a]], number, int(positions[a]), int(positions[a]) + b - a)
            for number, _, _ in encoded
            for a, b in runs
        ]

        def build() -> list[pb.RequestSlice]:
            if ready is not None:
                ready.synchronize()
            slices = []
            for number, ids, values in encoded:
                offsets, feature_ids, activations = Codes(ids, values).to_csr()
                for a, b in runs:
                    start, end = int(offsets[a]), int(offsets[b])
                    slices.append(
                        pack_slice(
                            external_ids[owner[a]],
                            number,
                            int(positions[a]),
                            pb.PHASE_GENERATED if generated[a] else pb.PHASE_PROMPT,
                            tokens[a:b],
                            offsets[a : b + 1] - offsets[a],
                            feature_ids[start:end],
                            activations[start:end],
                        )
                    )
            return slices

        self.counters["rows_encoded"] += len(selected)
        self.emitter.submit_deferred(build, ranges)


def _to_host(ids: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU tensors as they are; CUDA tensors copied without blocking into pinned host buffers."""
    if ids.device.type != "cuda":
        return ids, values
    host_ids = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
    host_values = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host_ids.copy_(ids, non_blocking=True)
    host_values.copy_(values, non_blocking=True)
    return host_ids, host_values


def _record_event(encoded: list) -> torch.cuda.Event | None:
    if not encoded or not torch.cuda.is_available() or not encoded[0][1].is_pinned():
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
