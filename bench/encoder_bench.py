"""Encoder benchmark: tokens/s per backend, as ratios to a bare GEMM of the same shape and to matmul + topk,
all measured in the same run.

    .venv/bin/python bench/encoder_bench.py            # CPU shapes (d_in 512-2048, d_sae 8k-32k)
    .venv/bin/python bench/encoder_bench.py --gpu      # on a CUDA machine: d_in 4096, d_sae 65536, bf16 and
                                                       # fp32 tables (gpu_tables); --sweep: Triton launch shapes

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


def device_time(fn, device: torch.device, repeats: int) -> float:
    """Seconds of GPU time per call, the host's launch work hidden: the calls are queued behind ~30 ms of other
    GPU work, so they run back to back between the two events. Wall time minus this is what the host adds."""
    fn()
    busy = torch.full((8192, 8192), 1 / 8192, device=device, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    for _ in range(20):
        busy = busy @ busy  # only its GPU time matters
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def paired_overhead(with_it, without_it, device: torch.device, rounds: int) -> float:
    """median(time with) / median(time without) - 1, the two alternating call by call so that drift in the
    machine's speed (shared cores, frequency) falls on both alike."""
    with_it(), without_it()  # warm-up
    a, b = [], []
    for _ in range(rounds):
        a.append(call_time(with_it, device))
        b.append(call_time(without_it, device))
    return statistics.median(a) / statistics.median(b) - 1


GPU_SWEEP = [  # LaunchConfig fields replaced in the picked configuration
    {"select_warps": 8, "candidate_block": 32},
    {"select_warps": 4, "candidate_block": 32},  # the picked settings at k = 32 again: a measure of the noise
    {"select_warps": 4, "candidate_block": 8},
    {"select_warps": 2, "candidate_block": 32},
    {"select_warps": 2, "candidate_block": 8},
    {"select_warps": 1, "candidate_block": 8},
    {"select_warps": 4, "candidate_block": 32, "group": 32},
    {"select_warps": 4, "candidate_block": 16, "group": 128, "block_n": 128},
    {"gemm": "torch", "block_m": 128, "block_n": 256, "num_warps": 8},
    {"gemm": "triton", "block_m": 128, "block_n": 256, "block_k": 64, "num_warps": 8, "num_stages": 4},
]


def make_sae(directory: Path, d_in: int, d_sae: int, bf16: bool):
    """A TopK SAE with random weights; `bf16`: stored as bf16 values (what a bf16 deployment loads)."""
    tensors = {
        "W_enc": torch.randn(d_in, d_sae) / d_in**0.5,
        "b_enc": torch.randn(d_sae) * 0.1,
        "W_dec": torch.randn(d_sae, d_in),
        "b_dec": torch.zeros(d_in),
    }
    if bf16:
        tensors = {name: t.to(torch.bfloat16).float() for name, t in tensors.items()}
    return load_sae(write_saelens(directory, "topk", tensors, k=K)), tensors


def build(names, sae, selection, device):
    encoders = {}
    for name in names:
        try:
            encoders[name] = make_encoder(sae, selection, name, device)
        except (ImportError, ValueError, RuntimeError) as exc:
            print(f"{name}: not available here ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
    return encoders


def sweep(encoder, x: torch.Tensor, device: torch.device, repeats: int) -> None:
    """The Triton encoder's time per launch configuration at this batch (wall and GPU time), each also without
    its selection launch (pre-activations and group maxima alone), beside the GEMMs it is measured against."""
    from circuitwatch.kernels.triton_encoder import LaunchConfig

    d_sae, rows = encoder.sae.spec.d_sae, x.shape[0]
    W = encoder.bf16["W_enc"]
    for label, fn in (
        ("bf16 GEMM", lambda: x @ W),
        ("GEMM, fp32 out", lambda: torch.mm(x, W, out_dtype=torch.float32)),
        ("matmul + topk", lambda: torch.topk(x @ W, encoder.k, dim=1)),
    ):
        print(f"    {label:>16} {rows:>5}: {timed(fn, device, repeats) * 1e6:9.1f} us wall "
              f"{device_time(fn, device, repeats) * 1e6:9.1f} us GPU")  # fmt: skip
    picked = LaunchConfig.for_shape(rows, d_sae, encoder.k, True, device)
    configs = [("picked", picked)]
    for fields in GPU_SWEEP:
        if fields.get("block_m", 0) > 16 and rows <= 16:
            continue
        configs.append(("", dataclasses.replace(picked, **fields)))
    for label, config in configs:
        try:
            wall = timed(lambda c=config: encoder.select(x, c), device, repeats)
            gpu = device_time(lambda c=config: encoder.select(x, c), device, repeats)
            bare = dataclasses.replace(config, select=False)
            gpu_bare = device_time(lambda c=bare: encoder.select(x, c), device, repeats)
        except Exception as exc:  # a configuration that does not compile (resources) is reported, not fatal
            print(f"    sweep {config}: failed ({type(exc).__name__}: {str(exc)[:200]})")
            continue
        print(f"    {label:>6} {rows:>5}: {wall * 1e6:9.1f} us wall {gpu * 1e6:9.1f} us GPU "
              f"(without selection {gpu_bare * 1e6:9.1f})  {config.gemm} {config.block_m}x{config.block_n}"
              f"x{config.block_k} w{config.num_warps} s{config.num_stages} g{config.group} "
              f"cb{config.candidate_block} sw{config.select_warps}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--batches", default=None, help="default: 1,16,256,4096 (CPU); 1,16,64,256,1024,4096 (GPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--paired", type=int, default=0, help="alternating with/without-decoder pairs (0: off)")
    parser.add_argument("--sweep", action="store_true", help="GPU: time the Triton kernel's launch configurations")
    parser.add_argument("--precisions", default="bf16,fp32", help="GPU: which tables (bf16, fp32)")
    args = parser.parse_args()
    device = torch.device("cuda" if args.gpu else "cpu")
    batches = [int(b) for b in (args.batches or ("1,16,64,256,1024,4096" if args.gpu else "1,16,256,4096")).split(",")]
    torch.manual_seed(0)
    if args.gpu:
        gpu_tables(device, batches, args)
        return
    print(f"device: CPU, {torch.get_num_threads()} threads; TopK SAE, k={K}")
    print(
        f"{'d_in':>5} {'d_sae':>6} {'batch':>6} {'GEMM tok/s':>11} {'backend':>8} {'tok/s':>11} "
        f"{'/GEMM':>6} {'/mm+topk':>9} {'+fidelity':>9}" + (f" {'paired':>8}" if args.paired else "")
    )
    for d_in, d_sae in CPU_SHAPES:
        with tempfile.TemporaryDirectory() as tmp:
            sae, tensors = make_sae(Path(tmp) / "sae", d_in, d_sae, bf16=False)
            selection = CodeSelection(SelectionMode.TOPK, K)
            names = ("torch", "onnx")
            encoders = {name: make_encoder(sae, selection, name, device) for name in names}
            blind = dataclasses.replace(sae, decoder=None, decoder_hash="")
            without_fidelity = {name: make_encoder(blind, selection, name, device) for name in names}
            W = tensors["W_enc"].to(device)
            decoder = sae.decoder.to(device)
            for batch in batches:
                if batch * d_sae > 64 * 2**20:
                    continue  # keeps a CPU run to a few minutes
                x = torch.randn(batch, d_in, device=device)
                gemm = timed(lambda x=x, W=W: x @ W, device, args.repeats)
                topk = timed(lambda x=x, W=W: torch.topk(x @ W, K, dim=1), device, args.repeats)
                for name, encoder in encoders.items():
                    t = timed(lambda e=encoder, x=x: e.encode(x), device, args.repeats)
                    fidelity = fidelity_time(encoder, sae, x, decoder, device, args.repeats)
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
                    print(line)


def fidelity_time(encoder, sae, x: torch.Tensor, decoder: torch.Tensor, device: torch.device, repeats: int) -> float:
    """The reconstruction-error gather alone, on the codes the encoder gives these rows (in float32, as the
    backends compute it)."""
    codes, rows = encoder.encode(x), x.float()
    return timed(
        lambda: with_fidelity(sae, rows, codes, codes.norms, codes.valid, decoder, sae.weights.b_dec.to(device)),
        device,
        max(repeats, 15),
    )


def gpu_tables(device: torch.device, batches: list[int], args) -> None:
    """Two tables on d_in 4096, d_sae 65536. bf16: the SAE stored in bf16 reading a bf16 model's rows (the
    Triton kernel's tensor-core path) against a bare bf16 GEMM; fp32: everything in float32 (IEEE dots)
    against a float32 GEMM. Encoder times are codes only (no decoder); +fidelity is the gather on top. The
    ratios are of wall time per synchronised call; dev/GEMM is of GPU time alone (`device_time`)."""
    print(f"device: {torch.cuda.get_device_name()}; TopK SAE, k={K}; codes-only encode time; median of {args.repeats}")
    selection = CodeSelection(SelectionMode.TOPK, K)
    for d_in, d_sae in GPU_SHAPES:
        for precision in args.precisions.split(","):
            bf16 = precision == "bf16"
            dtype = torch.bfloat16 if bf16 else torch.float32
            with tempfile.TemporaryDirectory() as tmp:
                sae, tensors = make_sae(Path(tmp) / "sae", d_in, d_sae, bf16=bf16)
                blind = dataclasses.replace(sae, decoder=None, decoder_hash="")
                encoders = build(("triton", "torch", "onnx") if bf16 else ("triton", "torch"), blind, selection, device)
                W = tensors["W_enc"].to(device=device, dtype=dtype)
                decoder = sae.decoder.to(device)
                print(
                    f"\n{precision}: {'d_in':>5} {'d_sae':>6} {'batch':>6} {'GEMM tok/s':>11} {'backend':>8} "
                    f"{'tok/s':>11} {'/GEMM':>6} {'/mm+topk':>9} {'+fidelity':>9} {'dev/GEMM':>9}   GPU rate (GEMM)"
                )
                for batch in batches:
                    x = torch.randn(batch, d_in, device=device).to(dtype)
                    gemm = timed(lambda x=x, W=W: x @ W, device, args.repeats)
                    topk = timed(lambda x=x, W=W: torch.topk(x @ W, K, dim=1), device, args.repeats)
                    gemm_device = device_time(lambda x=x, W=W: x @ W, device, args.repeats)
                    for name, encoder in encoders.items():
                        try:
                            t = timed(lambda e=encoder, x=x: e.encode(x), device, args.repeats)
                            t_device = device_time(lambda e=encoder, x=x: e.encode(x), device, args.repeats)
                            fidelity = fidelity_time(encoder, sae, x, decoder, device, args.repeats)
                        except Exception as exc:  # one backend failing must not end the table
                            print(f"{precision}: {batch:>6} {name}: failed ({type(exc).__name__}: {exc})"[:300])
                            continue
                        flops = 2 * batch * d_in * d_sae
                        print(
                            f"{precision}: {d_in:>5} {d_sae:>6} {batch:>6} {batch / gemm:>11,.0f} {name:>8} "
                            f"{batch / t:>11,.0f} {t / gemm:>6.2f} {t / topk:>9.2f} {fidelity / t:>+9.1%}"
                            f" {t_device / gemm_device:>9.2f}   {flops / t_device / 1e12:6.1f} TFLOP/s"
                            f" ({flops / gemm_device / 1e12:6.1f})"
                        )
                        if args.sweep and name == "triton" and bf16:
                            try:
                                sweep(encoder, x, device, args.repeats)
                            except Exception as exc:
                                print(f"    sweep failed ({type(exc).__name__}: {exc})"[:300])


if __name__ == "__main__":
    main()
