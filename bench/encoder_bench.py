"""Encoder benchmark: tokens/s per backend, as ratios to a bare GEMM of the same shape and to matmul + topk,
all measured in the same run.

    .venv/bin/python bench/encoder_bench.py            # CPU shapes (d_in 512-2048, d_sae 8k-32k)
    .venv/bin/python bench/encoder_bench.py --gpu      # on a CUDA machine: d_in 4096, d_sae 65536

A ratio above 1.0 means slower than the baseline (time / baseline time). The DESIGN target on CPU: the chosen
backend within 1.3x of bare GEMM.

`+fidelity` is what the per-token reconstruction error adds to each backend: the time of the gather that
computes it from the backend's codes (kernels/reference.py `with_fidelity`, the same step after every backend),
timed alone on the same rows, over the backend's encode time (target <= 3%). Input norms and the unreadable-row
check are part of the encode time, as they guard the codes themselves. `--paired` also times each backend built
with and without the decoder, alternating call by call (noisier: ONNX Runtime's run time varies by +-10% here).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from circuitwatch.fixtures.sae_writers import write_saelens
from circuitwatch.kernels import CodeSelection, SelectionMode, load_sae
from circuitwatch.kernels.encoders import make_encoder
from circuitwatch.kernels.reference import with_fidelity

CPU_SHAPES = [(512, 8192), (1024, 16384), (2048, 32768)]
GPU_SHAPES = [(4096, 65536)]
K = 32


def call_time(fn, device: torch.device) -> float:
    """Seconds for one call, the device synchronised around it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def timed(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    return statistics.median(call_time(fn, device) for _ in range(repeats))


def paired_overhead(with_it, without_it, device: torch.device, rounds: int) -> float:
    """median(time with) / median(time without) - 1, the two alternating call by call so that drift in the
    machine's speed (shared cores, frequency) falls on both alike."""
    with_it(), without_it()  # warm-up
    a, b = [], []
    for _ in range(rounds):
        a.append(call_time(with_it, device))
        b.append(call_time(without_it, device))
    return statistics.median(a) / statistics.median(b) - 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--batches", default="1,16,256,4096")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--paired", type=int, default=0, help="alternating with/without-decoder pairs (0: off)")
    args = parser.parse_args()
    device = torch.device("cuda" if args.gpu else "cpu")
    shapes = GPU_SHAPES if args.gpu else CPU_SHAPES
    batches = [int(b) for b in args.batches.split(",")]
    torch.manual_seed(0)
    device_name = torch.cuda.get_device_name() if args.gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device_name}; TopK SAE, k={K}")
    print(
        f"{'d_in':>5} {'d_sae':>6} {'batch':>6} {'GEMM tok/s':>11} {'backend':>8} {'tok/s':>11} "
        f"{'/GEMM':>6} {'/mm+topk':>9} {'+fidelity':>9}" + (f" {'paired':>8}" if args.paired else "")
    )
    for d_in, d_sae in shapes:
        with tempfile.TemporaryDirectory() as tmp:
            tensors = {
                "W_enc": torch.randn(d_in, d_sae) / d_in**0.5,
                "b_enc": torch.randn(d_sae) * 0.1,
                "W_dec": torch.randn(d_sae, d_in),
                "b_dec": torch.zeros(d_in),
            }
            sae = load_sae(write_saelens(Path(tmp) / "sae", "topk", tensors, k=K))
            selection = CodeSelection(SelectionMode.TOPK, K)
            names = ("torch", "onnx", "triton") if args.gpu else ("torch", "onnx")
            encoders = {name: make_encoder(sae, selection, name, device) for name in names}
            blind = dataclasses.replace(sae, decoder=None, decoder_hash="")
            without_fidelity = {name: make_encoder(blind, selection, name, device) for name in names}
            W = tensors["W_enc"].to(device)
            decoder = sae.decoder.to(device)
            for batch in batches:
                if batch * d_sae > 64 * 2**20 and not args.gpu:
                    continue  # keeps a CPU run to a few minutes
                x = torch.randn(batch, d_in, device=device)
                gemm = timed(lambda x=x, W=W: x @ W, device, args.repeats)
                topk = timed(lambda x=x, W=W: torch.topk(x @ W, K, dim=1), device, args.repeats)
                for name, encoder in encoders.items():
                    t = timed(lambda e=encoder, x=x: e.encode(x), device, args.repeats)
                    codes = encoder.encode(x)
                    valid = codes.valid
                    fidelity = timed(
                        lambda x=x, c=codes, v=valid, s=sae, d=decoder: with_fidelity(
                            s, x, c, c.norms, v, d, s.weights.b_dec.to(device)
                        ),
                        device,
                        max(args.repeats, 15),
                    )
                    line = (
                        f"{d_in:>5} {d_sae:>6} {batch:>6} {batch / gemm:>11,.0f} {name:>8} {batch / t:>11,.0f} "
                        f"{t / gemm:>6.2f} {t / topk:>9.2f} {fidelity / t:>+9.1%}"
                    )
                    if args.paired:
                        paired = paired_overhead(
                            lambda e=encoder, x=x: e.encode(x),
                            lambda e=without_fidelity[name], x=x: e.encode(x),
                            device,
                            args.paired,
                        )
                        line += f" {paired:>+8.1%}"
                    if args.gpu:  # achieved rates; bare GEMM's are the practical roofline of this device
                        flops = 2 * batch * d_in * d_sae
                        moved = 4 * (batch * d_in + d_in * d_sae + 2 * batch * K)
                        line += f"  {flops / t / 1e12:6.1f} TFLOP/s {moved / t / 1e9:7.1f} GB/s"
                        line += f"  (GEMM {flops / gemm / 1e12:6.1f} TFLOP/s)"
                    print(line)


if __name__ == "__main__":
    main()
