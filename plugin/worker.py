"""The plugin inside one vLLM worker: SAEs and encoders, taps, per-step row mapping, encoding, emission.

With tensor parallelism, rank 0 encodes every slot but per-head attn_z ones, which the rank holding the head
encodes (plugin/slots.py); each encoding rank is a producer of its own. Every failure is logged and counted;
nothing raises into vLLM's step.
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
from circuitwatch.kernels import Codes
from circuitwatch.kernels.baseline import model_fingerprint
from circuitwatch.kernels.hook_points import ModelShape
from circuitwatch.proto import CONTRACT_VERSION
from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto.codec import pack_slice

from .admission import Admission
from .config import PluginConfig
from .device_copy import codes_to_host, record_ready
from .emitter import BuiltBatch, Emitter
from .process import PROCESS
from .request_ids import client_request_id, request_key
from .rowmap import StepRows, rows_from_v1_runner, rows_from_v2_batch
from .slots import Parallelism, Slot, build_slots, slot_proto
from .taps import TAPS, Stream, decoder_layers, install_taps

log = logging.getLogger(__name__)


@dataclass
class TrackedRequest:
    internal_id: str
    external_id: str  # the sidecar's key (request_ids.request_key)
    monitored: bool
    num_prompt_tokens: int = 0


def worker_plugin(
    config: PluginConfig, vllm_config, model: torch.nn.Module, device: torch.device, parallel: Parallelism
) -> WorkerPlugin | None:
    """The plugin for this worker, or None on a tensor-parallel rank that encodes no slot (plugin/slots.py)."""
    model_config = vllm_config.model_config
    shape = ModelShape(
        hidden_size=model_config.get_hidden_size(),
        num_heads=int(model_config.hf_text_config.num_attention_heads),
        head_dim=model_config.get_head_size(),
    )
    fingerprint = model_fingerprint(model_config.hf_config.to_dict())
    slots = build_slots(
        config, shape, len(decoder_layers(model)), fingerprint, device, parallel, rows_dtype=model_config.dtype
    )
    if not slots and parallel.rank != 0:
        return None
    return WorkerPlugin(config, vllm_config, model, slots)


class WorkerPlugin:
    """The plugin in one worker: the slots' SAEs and encoders, the taps, and per step the row map, encoding and
    hand-off to the emitter. Every failure is logged and counted; nothing raises into vLLM's step."""

    def __init__(self, config: PluginConfig, vllm_config, model: torch.nn.Module, slots: list[Slot]) -> None:
        self.config = config
        model_config = vllm_config.model_config
        present = install_taps(model, [s.tap.stream() for s in slots])
        self.slots = [s for s in slots if s.tap.stream() in present]
        self.model_name = model_config.served_model_name or model_config.model
        self.manifest = pb.Manifest(
            contract_version=CONTRACT_VERSION,
            producer=f"circuitwatch-plugin/{__version__} vllm/{_vllm_version()}",
            model=str(self.model_name),
            instance_id=f"{socket.gethostname()}:{os.getpid()}",
            slots=[slot_proto(s) for s in self.slots],
        )
        self.emitter = Emitter(
            config.sidecar, self.manifest, config.queue_max_batches, linger_s=config.coalesce_linger_ms / 1e3
        )
        if len(self.slots) == len(config.slots):  # an engine core in this process sends its finishes with our codes
            PROCESS.code_emitter = self.emitter
        self.requests: dict[str, TrackedRequest] = {}
        self.counters: Counter[str] = Counter()
        self.v2_batch = None  # set by the V2 runner patch
        log.info(
            "circuitwatch: monitoring %s with %s, codes to %s",
            [s.tap.label() for s in self.slots],
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
        if PROCESS.code_emitter is self.emitter:
            PROCESS.code_emitter = None
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

    def _encode_step(self, runner, captured: dict[Stream, torch.Tensor]) -> None:
        rows = self._rows(runner)
        tracked = [
            self._track(runner, rid, int(first)) for rid, first in zip(rows.req_ids, rows.first_computed, strict=True)
        ]
        monitored = np.array([t.monitored for t in tracked], dtype=bool)
        if not len(monitored) or not monitored.any():
            return
        if monitored.all():  # `monitor: all`, or every running request opted in: the rows as they are
            index: torch.Tensor | slice = slice(0, rows.num_rows)
            owner, positions, tokens = rows.row_request, rows.positions, rows.token_ids
        else:
            selected = np.flatnonzero(monitored[rows.row_request])
            if not len(selected):
                return
            index = torch.from_numpy(selected)
            owner = rows.row_request[selected]
            positions = rows.positions[selected]
            tokens = rows.token_ids[selected]
        num_rows = len(positions)
        prompt_len = np.array([t.num_prompt_tokens for t in tracked], dtype=np.int64)[owner]
        generated = positions >= prompt_len
        # runs of consecutive positions of one request in one phase become one slice per slot
        breaks = (
            np.flatnonzero(
                (owner[1:] != owner[:-1]) | (generated[1:] != generated[:-1]) | (positions[1:] != positions[:-1] + 1)
            )
            + 1
        )
        bounds = np.concatenate(([0], breaks, [num_rows]))
        encoded: list[tuple[Slot, Codes]] = []
        started = time.perf_counter_ns()
        on_device = False
        for slot in self.slots:
            rows_in = slot.read(captured, index)
            if rows_in is not None:
                codes = slot.encoder.encode(rows_in)
                on_device = on_device or codes.ids.device.type == "cuda"
                encoded.append((slot, codes_to_host(codes)))
        # On CUDA the copies above are non-blocking into pinned memory; the sending thread waits for this
        # event, then packs. The step path only launches kernels and enqueues. (Asking CUDA on a CPU step,
        # torch.cuda.is_available() and is_pinned(), cost 20-35 us a step: the codes' device says it.)
        ready = record_ready() if on_device else None
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
                host = codes.on_host()  # numpy only: no torch call lets the model's thread in mid-build
                offsets, feature_ids, activations = host.row_offsets, host.feature_ids, host.activations
                errors, norms, valid = host.errors, host.norms, host.valid
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

        self.counters["rows_encoded"] += num_rows
        self.emitter.submit_deferred(build, ranges)


def _valid_runs(valid: np.ndarray, start: int, end: int) -> list[tuple[int, int, bool]]:
    """[start, end) cut where row validity changes: (a, b, readable) pieces, usually just one."""
    piece = valid[start:end]
    if piece.all():
        return [(start, end, True)]
    cuts = np.flatnonzero(piece[1:] != piece[:-1]) + 1 + start
    bounds = [start, *cuts.tolist(), end]
    return [(a, b, bool(valid[a])) for a, b in itertools.pairwise(bounds)]


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
