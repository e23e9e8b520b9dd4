"""Encoder backends behind one interface: `encode(rows [n, d_in]) -> Codes`, exactly the reference codes.

- torch: the reference encoder (CPU or CUDA).
- onnx: ONNX Runtime (CPU here; CUDA with IO binding where onnxruntime-gpu is installed).
- triton: the fused Triton kernel on CUDA (on CPU only under TRITON_INTERPRET=1, which tests use).
- auto: a short measured calibration at start-up picks the fastest available backend for this device and
  shape, and logs the timings.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from .reference import ReferenceEncoder
from .selection import CodeSelection
from .spec import Sae

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx", "triton", "auto")
CALIBRATION_ROWS = 256
CALIBRATION_RUNS = 5


class TorchEncoder(ReferenceEncoder):
    name = "torch"


def _build(name: str, sae: Sae, selection: CodeSelection | None, device: torch.device | str):
    if name == "torch":
        return TorchEncoder(sae, selection, device)
    if name == "onnx":
        from .onnx_encoder import OnnxEncoder

        return OnnxEncoder(sae, selection, device)
    if name == "triton":
        if torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("the triton encoder backend needs a CUDA device (on CPU only under TRITON_INTERPRET=1)")
        from .triton_encoder import TritonEncoder

        return TritonEncoder(sae, selection, device)
    raise ValueError(f"unknown encoder backend {name!r} (supported: {', '.join(BACKENDS)})")


def make_encoder(
    sae: Sae,
    selection: CodeSelection | None = None,
    backend: str = "torch",
    device: torch.device | str = "cpu",
    rows_dtype: torch.dtype = torch.float32,
):
    """`rows_dtype`: what the model's rows will be (`auto` calibrates on such rows: the Triton kernel takes its
    bf16 tensor-core path only for bf16 rows)."""
    if backend != "auto":
        return _build(backend, sae, selection, device)
    candidates = {}
    names = ("torch", "onnx", "triton") if torch.device(device).type == "cuda" else ("torch", "onnx")
    for name in names:
        try:
            candidates[name] = _build(name, sae, selection, device)
        except ImportError as exc:
            log.info("encoder backend %s not available: %s", name, exc)
    x = torch.randn(CALIBRATION_ROWS, sae.spec.d_in, device=device).to(rows_dtype)
    timings = {}
    for name, encoder in candidates.items():
        encoder.encode(x)  # warm-up
        started = time.perf_counter()
        for _ in range(CALIBRATION_RUNS):
            encoder.encode(x)
        timings[name] = (time.perf_counter() - started) / CALIBRATION_RUNS
    chosen = min(timings, key=timings.get)
    log.info(
        "encoder calibration for %s (%d rows): %s -> %s",
        sae.name,
        CALIBRATION_ROWS,
        ", ".join(f"{n} {t * 1e3:.2f} ms" for n, t in timings.items()),
        chosen,
    )
    return candidates[chosen]
