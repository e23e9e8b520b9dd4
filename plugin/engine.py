"""The plugin inside vLLM's engine core: finish markers, sent the moment the scheduler frees a request.

Workers learn of a finish only at the next step, and an idle engine takes no next step, so the finish comes
from here, over a control stream (a manifest without slots). It carries the exact number of positions the
model computed; the sidecar finalises once codes (from the workers) or declared gaps cover them. Where the
worker that encodes every slot runs in this process (the uni-process executor), the finish goes on that
worker's stream instead, inside the code batch of the step that finished the request (emitter.py), and the
sidecar finalises it before the rest of that step.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from circuitwatch import __version__
from circuitwatch.proto import CONTRACT_VERSION
from circuitwatch.proto import circuitwatch_pb2 as pb

from .admission import Admission
from .config import PluginConfig
from .emitter import Emitter
from .process import PROCESS
from .request_ids import request_key

log = logging.getLogger(__name__)


class FinishNotifier:
    """Sends a finish marker for every monitored request the scheduler frees, on the engine core's own control
    stream to the sidecar."""

    def __init__(self, config: PluginConfig, model: str) -> None:
        self.config = config
        self.model = model
        self._manifest = pb.Manifest(
            contract_version=CONTRACT_VERSION,
            producer=f"circuitwatch-engine-core/{__version__}",
            model=model,
            instance_id=f"{socket.gethostname()}:{os.getpid()}:engine-core",
        )
        self._own: Emitter | None = None

    @property
    def emitter(self) -> Emitter:
        """The engine core's own control stream, opened at the first finish that needs it: never while a worker
        in this process carries the finishes (it would hold one of the sidecar's ingest streams for nothing)."""
        if self._own is None:
            self._own = Emitter(self.config.sidecar, self._manifest, self.config.queue_max_batches)
        return self._own

    @property
    def has_own_stream(self) -> bool:
        return self._own is not None

    def close(self, timeout_s: float) -> None:
        if self._own is not None:
            self._own.close(timeout_s=timeout_s)

    def request_freed(self, request) -> None:
        params = request.sampling_params
        if params is None or not Admission.from_extra_args(params.extra_args, self.config).monitored:
            return
        reason = request.get_finished_reason()
        self._emitter().submit(
            pb.IngestMessage(
                finish=pb.RequestFinish(
                    request_id=request_key(request.request_id),
                    num_prompt_tokens=request.num_prompt_tokens,
                    num_generated_tokens=request.num_output_tokens,
                    # positions the model computed: the last sampled token never went through it
                    num_positions=request.num_computed_tokens,
                    finish_reason=str(getattr(reason, "name", reason) or "").lower(),
                    finish_unix_nanos=time.time_ns(),
                    model=self.model,
                    arrival_unix_nanos=int(getattr(request, "arrival_time", 0) * 1e9),
                    # every configured slot, whichever worker encodes it (plugin/slots.py)
                    slots=range(len(self.config.slots)),
                )
            )
        )

    def _emitter(self) -> Emitter:
        """The stream of the worker in this process that encodes every slot for the same sidecar, else our own."""
        shared = PROCESS.code_emitter
        return shared if shared is not None and shared.target == self.config.sidecar else self.emitter


def notifier(config: PluginConfig, model: str) -> FinishNotifier:
    """One per process; replaced if the configuration changes (a new engine in the same process)."""
    with PROCESS.lock:
        current = PROCESS.finish_notifier
        if current is None or current.config != config or current.model != model:
            if current is not None:
                current.close(timeout_s=1.0)
            current = PROCESS.finish_notifier = FinishNotifier(config, model)
        return current
