"""Encoder benchmark: tokens/s per backend, as ratios to a bare GEMM of the same shape and to matmul + topk,
all measured in the same run.

    .venv/bin/python bench/encoder_bench.py            # CPU shapes (d_in 512-2048, d_sae 8k-32k)
    .venv/bin/python bench/encoder_bench.py --gpu      # on a CUDA machine: d_in 4096, d_sae 65536

A ratio above 1.0 means slower than the baseline (time / baseline time). The DESIGN target on CPU: the chosen
backend within 1.3x of bare GEMM.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from circuitwatch.fixtures.sae_writers import write_saelens
from circuitwatch.kernels import CodeSelection, SelectionMode, load_sae
from circuitwatch.kernels.encoders import make_encoder

CPU_SHAPES = [(512, 8192), (1024, 16384), (2048, 32768)]
GPU_SHAPES = [(4096, 65536)]
K = 32


def timed(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--batches", default="1,16,256,4096")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if args.gpu else "cpu")
    shapes = GPU_SHAPES if args.gpu else CPU_SHAPES
    batches = [int(b) for b in args.batches.split(",")]
    torch.manual_seed(0)
    device_name = torch.cuda.get_device_name() if args.gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device_name}; TopK SAE, k={K}")
    print(
        f"{'d_in':>5} {'d_sae':>6} {'batch':>6} {'GEMM tok/s':>11} {'backend':>8} {'tok/s':>11} "
        f"{'/GEMM':>6} {'/mm+topk':>9}"
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
            W = tensors["W_enc"].to(device)
            for batch in batches:
                if batch * d_sae > 64 * 2**20 and not args.gpu:
                    continue  # keeps a CPU run to a few minutes
                x = torch.randn(batch, d_in, device=device)
                gemm = timed(lambda x=x, W=W: x @ W, device, args.repeats)
                topk = timed(lambda x=x, W=W: torch.topk(x @ W, K, dim=1), device, args.repeats)
                for name, encoder in encoders.items():
                    t = timed(lambda e=encoder, x=x: e.encode(x), device, args.repeats)
                    line = (
                        f"{d_in:>5} {d_sae:>6} {batch:>6} {batch / gemm:>11,.0f} {name:>8} {batch / t:>11,.0f} "
                        f"{t / gemm:>6.2f} {t / topk:>9.2f}"
                    )
                    if args.gpu:  # achieved rates; bare GEMM's are the practical roofline of this device
                        flops = 2 * batch * d_in * d_sae
                        moved = 4 * (batch * d_in + d_in * d_sae + 2 * batch * K)
                        line += f"  {flops / t / 1e12:6.1f} TFLOP/s {moved / t / 1e9:7.1f} GB/s"
                        line += f"  (GEMM {flops / gemm / 1e12:6.1f} TFLOP/s)"
                    print(line)


if __name__ == "__main__":
    main()
