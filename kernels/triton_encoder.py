"""The fused Triton SAE encoder: tiled `x @ W_enc` with b_dec/b_enc, the architecture's activation rule and
top-k selection in one kernel, so the [rows, d_sae] pre-activation matrix is never written to memory.

Two launches. The split kernel gives each program BLOCK_M rows and one contiguous share of d_sae (a *split*),
walked in BLOCK_N tiles; a running top-K per row (values and ids, unordered) stays in registers. A tile is
merged into it by threshold-pruned extraction: only as many passes as the row with the most tile values above
its current K-th best needs, so after the first tiles most tiles cost one comparison per value. Splits let
small batches fill the GPU; each writes its K candidates per row, and the merge kernel orders the
splits * K candidates of each row (activation descending, lower id first: the reference's tie rule).

Operands. With fp32 operands the dots run in IEEE fp32 (no TF32), so codes match the reference. When W_enc is
exactly representable in bf16 (an SAE stored in bf16) and the rows arrive in bf16 (a bf16 model's residual
stream), the dots run on bf16 tensor cores with fp32 accumulation: every product is exact in fp32, so the
result is the reference's float32 computation on the same numbers up to summation order. In that mode b_dec is
folded into the bias (b_enc - b_dec @ W_enc, computed once) and constant_norm_rescale's row scale is applied
after the dot, so the kernel reads the model's rows as they are. Layer-norm SAEs and fp32 rows take the fp32
path. Row-wise normalisation on the fp32 path is done in torch before the kernel.

On CPU the kernels run under TRITON_INTERPRET=1 (how CI tests them); on CUDA they compile normally.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from .codes import EMPTY_ID, Codes
from .fidelity import input_norms, normalize
from .reference import check_input, default_selection, with_fidelity
from .selection import CodeSelection
from .spec import Architecture, Normalization, Sae

ARCH_CODES = {Architecture.STANDARD: 0, Architecture.JUMPRELU: 1, Architecture.TOPK: 2, Architecture.GATED: 3}
NO_ID = 2**31 - 1
MERGE_BLOCK = 4096  # candidates per merge program (rows * padded candidates per row)
# Splits * k candidates per row at most: the merge holds a row's candidates in one program's registers and makes
# k passes over them (k = 128 with 264 splits would be 33,792 per row; a bound, not measured on a GPU).
MAX_MERGE_CANDIDATES = 8192


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and the number of d_sae splits of one launch; `for_shape` picks them, benches override."""

    block_m: int
    block_n: int
    block_k: int
    splits: int
    num_warps: int = 4
    num_stages: int = 3
    select: bool = True  # False only in the encoder bench: the GEMM and activation alone, to price the selection

    @staticmethod
    def for_shape(rows: int, d_sae: int, k: int, bf16: bool, device: torch.device) -> LaunchConfig:
        if device.type != "cuda":  # the interpreter: small tiles, two tiles a split so both merges are exercised
            tiles = -(-d_sae // 32)
            return LaunchConfig(16, 32, 16, max(1, -(-tiles // 2)), 4, 1)
        # From the H200 sweeps (README, encoder bench): small batches want many short splits to fill the GPU;
        # from 65 rows, at most one program per multiprocessor with wide tiles, so each walks far and prunes
        # more, and no second wave (4096 rows: 160 programs on 132 multiprocessors took 7.8 ms, 128 took 5.0).
        block_m = 16 if rows <= 16 else 64 if rows <= 64 else 128
        block_n, block_k = (256 if block_m == 128 else 128, 64) if bf16 else (64, 32)
        row_blocks = -(-rows // block_m)
        if block_m < 128:
            splits = -(-2 * _multiprocessors(device) // row_blocks)
        else:
            splits = _multiprocessors(device) // row_blocks
        splits = max(1, min(-(-d_sae // block_n), splits, MAX_MERGE_CANDIDATES // k))
        return LaunchConfig(block_m, block_n, block_k, splits, 8 if block_m == 128 else 4, 3)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def split_kernel(
        x_ptr, stride_x, w_ptr, w2_ptr, b_ptr, b2_ptr, thr_ptr, bdec_ptr, scale_ptr, part_v_ptr, part_i_ptr,
        M, D_IN, D_SAE, SPLIT_COLS, SPLITS,
        K: tl.constexpr, KP: tl.constexpr, ARCH: tl.constexpr, APPLY_BDEC: tl.constexpr,
        ROW_SCALE: tl.constexpr, IEEE: tl.constexpr, WIDEN: tl.constexpr, NO_ID: tl.constexpr, SELECT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        split = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        slot = tl.arange(0, KP)
        used = slot[None, :] < K
        run_v = tl.full([BLOCK_M, KP], float("-inf"), tl.float32)
        run_i = NO_ID - slot[None, :] + tl.zeros([BLOCK_M, KP], tl.int32)  # distinct, so one slot is evicted
        if ROW_SCALE:
            scale = tl.load(scale_ptr + rows, mask=row_ok, other=1.0)
        first = split * SPLIT_COLS
        last = tl.minimum(first + SPLIT_COLS, D_SAE)
        for n0 in range(first, last, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < last
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            acc2 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for k0 in range(0, D_IN, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < D_IN
                w_at = ks[:, None].to(tl.int64) * D_SAE + cols[None, :]  # 64-bit: d_in * d_sae may pass 2**31
                w_ok = k_ok[:, None] & col_ok[None, :]
                x = tl.load(
                    x_ptr + rows[:, None] * stride_x + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
                )
                if APPLY_BDEC:
                    x = x - tl.load(bdec_ptr + ks, mask=k_ok, other=0.0)[None, :]
                    x = tl.where(k_ok[None, :], x, 0.0)
                w = tl.load(w_ptr + w_at, mask=w_ok, other=0.0)
                if WIDEN:
                    x = x.to(tl.float32)
                    w = w.to(tl.float32)
                if IEEE:
                    acc += tl.dot(x, w, input_precision="ieee")
                else:
                    acc += tl.dot(x, w)
                if ARCH == 3:
                    w2 = tl.load(w2_ptr + w_at, mask=w_ok, other=0.0)
                    if WIDEN:
                        w2 = w2.to(tl.float32)
                    if IEEE:
                        acc2 += tl.dot(x, w2, input_precision="ieee")
                    else:
                        acc2 += tl.dot(x, w2)
            if ROW_SCALE:
                acc = acc * scale[:, None]
                acc2 = acc2 * scale[:, None]
            pre = acc + tl.load(b_ptr + cols, mask=col_ok, other=0.0)[None, :]
            if ARCH == 0:
                act = tl.maximum(pre, 0.0)
            elif ARCH == 1:
                threshold = tl.load(thr_ptr + cols, mask=col_ok, other=0.0)[None, :]
                act = tl.where(pre > threshold, tl.maximum(pre, 0.0), 0.0)
            elif ARCH == 2:
                act = pre  # the k largest pre-activations; only positive ones become codes
            else:
                magnitude = tl.maximum(acc2 + tl.load(b2_ptr + cols, mask=col_ok, other=0.0)[None, :], 0.0)
                act = tl.where(pre > 0.0, magnitude, 0.0)
            tile_v = tl.where(row_ok[:, None] & col_ok[None, :], act, float("-inf"))  # padding rows: no passes
            # Threshold pruning: a tile value can enter only if it beats its row's current K-th best (and 0); as
            # many extraction passes as the row with most such values needs. Columns rise within a split, so a
            # tile value equal to the K-th best has the higher id and stays out (the lower id wins ties).
            if SELECT:
                # Only positive values become codes, so the bar starts at 0.
                bar = tl.maximum(tl.min(tl.where(used, run_v, float("inf")), 1), 0.0)
                passes = tl.minimum(tl.max(tl.sum((tile_v > bar[:, None]).to(tl.int32), 1), 0), K)
                for _ in range(passes):
                    top = tl.max(tile_v, 1)
                    pick = tl.min(tl.where(tile_v == top[:, None], cols[None, :], NO_ID), 1)
                    low = tl.min(tl.where(used, run_v, float("inf")), 1)
                    # the worst of the running set: lowest value, and among equal values the highest id
                    worst = tl.max(tl.where(used & (run_v == low[:, None]), run_i, -1), 1)
                    swap = (run_i == worst[:, None]) & (top > tl.maximum(low, 0.0))[:, None]
                    run_v = tl.where(swap, top[:, None], run_v)
                    run_i = tl.where(swap, pick[:, None], run_i)
                    tile_v = tl.where(cols[None, :] == pick[:, None], float("-inf"), tile_v)
            else:  # the bench's measure of the rest: one reduction a tile keeps the GEMM from being optimised away
                run_v = tl.maximum(run_v, tl.max(tile_v, 1)[:, None])
        out = rows[:, None] * (SPLITS * K) + split * K + slot[None, :]
        store_ok = row_ok[:, None] & used
        tl.store(part_v_ptr + out, run_v, mask=store_ok)
        tl.store(part_i_ptr + out, run_i, mask=store_ok)

    @triton.jit
    def merge_kernel(
        part_v_ptr, part_i_ptr, ids_ptr, vals_ptr, M, CANDIDATES,
        K: tl.constexpr, KP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, NO_ID: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < M
        c = tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (c[None, :] < CANDIDATES)
        at = rows[:, None] * CANDIDATES + c[None, :]
        cand_v = tl.load(part_v_ptr + at, mask=ok, other=float("-inf"))
        cand_i = tl.load(part_i_ptr + at, mask=ok, other=NO_ID)
        slot = tl.arange(0, KP)
        best_v = tl.full([BLOCK_R, KP], float("-inf"), tl.float32)
        best_i = tl.full([BLOCK_R, KP], NO_ID, tl.int32)
        for j in range(K):  # the strongest left, lower id first among equals; candidates' ids are distinct
            top = tl.max(cand_v, 1)
            pick = tl.min(tl.where(cand_v == top[:, None], cand_i, NO_ID), 1)
            best_v = tl.where(slot[None, :] == j, top[:, None], best_v)
            best_i = tl.where(slot[None, :] == j, pick[:, None], best_i)
            cand_v = tl.where(cand_i == pick[:, None], float("-inf"), cand_v)
        active = (best_v > 0.0) & (slot[None, :] < K)
        out = rows[:, None] * K + slot[None, :]
        store_ok = row_ok[:, None] & (slot[None, :] < K)
        tl.store(ids_ptr + out, tl.where(active, best_i, -1), mask=store_ok)
        tl.store(vals_ptr + out, tl.where(active, best_v, 0.0), mask=store_ok)

    return split_kernel, merge_kernel


def _bf16_exact(t: torch.Tensor) -> bool:
    return bool(torch.equal(t.to(torch.bfloat16).to(t.dtype), t))


class TritonEncoder:
    """Same interface as ReferenceEncoder.encode."""

    name = "triton"

    def __init__(self, sae: Sae, selection: CodeSelection | None = None, device: torch.device | str = "cpu") -> None:
        import triton  # noqa: F401 - fail early and clearly where Triton is missing

        self.sae = sae
        self.selection = selection or default_selection(sae)
        self.device = torch.device(device)
        w = sae.weights
        self.weights = {name: t.to(self.device).contiguous() for name, t in w.named().items()}
        self.decoder = sae.decoder.to(self.device).contiguous() if sae.decoder is not None else None
        gated = sae.spec.architecture is Architecture.GATED
        if gated:
            self.weights["W_mag"] = (w.W_enc * torch.exp(w.r_mag)).to(self.device).contiguous()
        width = self.selection.width
        if sae.spec.architecture is Architecture.TOPK and sae.spec.k:
            width = min(width, sae.spec.k)
        self.k = min(width, sae.spec.d_sae)
        self.split_kernel, self.merge_kernel = _kernels()
        self.bf16 = self._bf16_operands(gated)

    def _bf16_operands(self, gated: bool) -> dict[str, torch.Tensor] | None:
        """bf16 copies of the encoder matrices and the folded biases, when the SAE allows the bf16 path."""
        spec, w = self.sae.spec, self.weights
        matrices = ("W_enc", "W_mag") if gated else ("W_enc",)
        if spec.normalization is Normalization.LAYER_NORM or not all(_bf16_exact(w[m]) for m in matrices):
            return None
        operands = {m: w[m].to(torch.bfloat16) for m in matrices}
        biases = ("b_gate", "b_mag") if gated else ("b_enc",)
        for bias, matrix in zip(biases, matrices, strict=True):
            folded = w[bias].double()
            if spec.apply_b_dec_to_input:
                folded = folded - w["b_dec"].double() @ w[matrix].double()
            operands[bias] = folded.float().contiguous()
        return operands

    def encode(self, x: torch.Tensor, config: LaunchConfig | None = None) -> Codes:
        """The kernels select the codes; fidelity (and emptying unreadable rows) is a torch gather after them."""
        check_input(self.sae, x)
        x = x.to(device=self.device)
        norms, valid = input_norms(x)
        x = torch.where(valid[:, None], x, 1.0)  # a finite stand-in for unreadable rows, emptied below
        codes = self.select(x, config, norms)
        if self.decoder is not None and x.dtype != torch.float32:
            x = x.float()  # the reconstruction error is computed in float32
        return with_fidelity(self.sae, x, codes, norms, valid, self.decoder, self.weights["b_dec"])

    def select(self, x: torch.Tensor, config: LaunchConfig | None = None, norms: torch.Tensor | None = None) -> Codes:
        """Codes without fidelity: the two launches (public for the encoder bench's kernel-only timings).
        `norms`: the rows' L2 norms where the caller has them (`encode` does), so they are not computed twice."""
        spec = self.sae.spec
        rows, width = x.shape[0], self.selection.width
        use_bf16 = self.bf16 is not None and x.dtype == torch.bfloat16
        gated = spec.architecture is Architecture.GATED
        scale = None
        if use_bf16:
            w = {**self.weights, **self.bf16}
            if spec.normalization is Normalization.CONSTANT_NORM_RESCALE:
                norms = x.float().norm(dim=-1) if norms is None else norms
                # finite for unreadable rows too (zero, infinite or NaN norms): their codes are emptied after
                scale = torch.nan_to_num(spec.d_in**0.5 / norms, nan=1.0, posinf=1.0, neginf=1.0).contiguous()
            x = x if x.stride(1) == 1 else x.contiguous()
        else:
            w = self.weights
            x = normalize(x.to(torch.float32), spec).contiguous()
        ids = torch.empty((rows, self.k), dtype=torch.int32, device=self.device)  # the merge writes every slot
        values = torch.empty((rows, self.k), dtype=torch.float32, device=self.device)
        if rows:
            config = config or LaunchConfig.for_shape(rows, spec.d_sae, self.k, use_bf16, self.device)
            self._launch(x, w, scale, ids, values, config, use_bf16, gated)
        if self.k < width:
            ids = torch.nn.functional.pad(ids, (0, width - self.k), value=EMPTY_ID)
            values = torch.nn.functional.pad(values, (0, width - self.k), value=0.0)
        return Codes(ids, values)

    def _launch(self, x, w, scale, ids, values, config: LaunchConfig, use_bf16: bool, gated: bool) -> None:
        spec, k, rows = self.sae.spec, self.k, x.shape[0]
        # Triton 3.9's interpreter gets bf16 dots wrong (errors of 1e10 seen on CPU); there the bf16 operands
        # are widened to fp32 first, which is exact, so CI still checks everything else of the bf16 path.
        interpreted = self.device.type != "cuda"
        kp = max(16, 1 << (k - 1).bit_length())
        split_cols = -(-spec.d_sae // config.splits)
        split_cols = -(-split_cols // config.block_n) * config.block_n  # whole tiles, so tiles never straddle
        splits = -(-spec.d_sae // split_cols)
        part_v = torch.empty((rows, splits * k), dtype=torch.float32, device=self.device)
        part_i = torch.empty((rows, splits * k), dtype=torch.int32, device=self.device)
        self.split_kernel[(-(-rows // config.block_m), splits)](
            x,
            x.stride(0),
            w["W_enc"],
            w["W_mag"] if gated else w["W_enc"],
            w["b_gate"] if gated else w["b_enc"],
            w["b_mag"] if gated else w["b_enc"],
            w.get("threshold", w["b_enc"]),
            w["b_dec"],
            scale if scale is not None else w["b_enc"],
            part_v,
            part_i,
            rows,
            spec.d_in,
            spec.d_sae,
            split_cols,
            splits,
            K=k,
            KP=kp,
            ARCH=ARCH_CODES[spec.architecture],
            APPLY_BDEC=spec.apply_b_dec_to_input and not use_bf16,
            ROW_SCALE=scale is not None,
            IEEE=not use_bf16 or interpreted,
            WIDEN=use_bf16 and interpreted,
            NO_ID=NO_ID,  # globals reach a compiled kernel only as constexpr arguments
            SELECT=config.select,
            BLOCK_M=config.block_m,
            BLOCK_N=config.block_n,
            BLOCK_K=config.block_k,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
        candidates = splits * k
        block_c = 1 << (candidates - 1).bit_length()
        block_r = max(1, MERGE_BLOCK // block_c)
        self.merge_kernel[(-(-rows // block_r),)](
            part_v, part_i, ids, values, rows, candidates, K=k, KP=kp, BLOCK_R=block_r, BLOCK_C=block_c, NO_ID=NO_ID
        )
