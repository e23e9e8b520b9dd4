"""Getting a step's codes off the GPU without making the step wait: non-blocking copies into pinned host
buffers, and a CUDA event the emitter thread waits on before it packs them.

Kept free of vLLM and protobuf imports so that scripts/gpu_emitter_check.py can check it on a GPU machine
with torch alone.
"""

from __future__ import annotations

import torch

from circuitwatch.kernels import Codes


def codes_to_host(codes: Codes) -> Codes:
    """CPU codes as they are; CUDA tensors copied without blocking into pinned host buffers (read them only
    after the event from `record_ready` has completed)."""
    if codes.ids.device.type != "cuda":
        return codes

    def copy(tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None:
            return None
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        return host

    return Codes(copy(codes.ids), copy(codes.values), copy(codes.errors), copy(codes.norms))


def record_ready() -> torch.cuda.Event:
    """An event on the current stream, after the copies: complete once the host buffers hold the codes."""
    event = torch.cuda.Event()
    event.record()
    return event
