"""The fused Triton SAE encoder: tiled `x @ W_enc` with b_dec/b_enc, the architecture's activation rule and
top-k selection in one kernel, so the [rows, d_sae] pre-activation matrix is never written to memory.

Each program owns BLOCK_M rows and walks d_sae in BLOCK_N tiles, keeping a running top-K (values and ids) in
registers; each tile is merged into it by K max-extractions in which equal values go to the lower id, the
reference's tie rule. Dot products run in IEEE fp32 (no TF32), so codes match the reference. Row-wise
normalisation (SAELens constant_norm_rescale / layer_norm) is done in torch before the kernel.

On CPU the kernel runs under TRITON_INTERPRET=1 (how CI tests it); on CUDA it compiles normally.
"""

from __future__ import annotations

import torch

from .codes import EMPTY_ID, Codes
from .fidelity import input_norms, normalize
from .reference import check_input, default_selection, with_fidelity
from .selection import CodeSelection
from .spec import Architecture, Sae

ARCH_CODES = {Architecture.STANDARD: 0, Architecture.JUMPRELU: 1, Architecture.TOPK: 2, Architecture.GATED: 3}
NO_ID = 2**31 - 1


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def encode_kernel(
        x_ptr, w_ptr, w2_ptr, b_ptr, b2_ptr, thr_ptr, bdec_ptr, ids_ptr, vals_ptr,
        M, D_IN, D_SAE,
        K: tl.constexpr, KP: tl.constexpr, ARCH: tl.constexpr, APPLY_BDEC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        slot = tl.arange(0, KP)
        best_v = tl.full([BLOCK_M, KP], float("-inf"), tl.float32)
        best_i = tl.full([BLOCK_M, KP], NO_ID, tl.int32)
        for n0 in range(0, D_SAE, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < D_SAE
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            acc2 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for k0 in range(0, D_IN, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < D_IN
                x = tl.load(x_ptr + rows[:, None] * D_IN + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                if APPLY_BDEC:
                    x = x - tl.load(bdec_ptr + ks, mask=k_ok, other=0.0)[None, :]
                    x = tl.where(k_ok[None, :], x, 0.0)
                w = tl.load(
                    w_ptr + ks[:, None] * D_SAE + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0
                )
                acc += tl.dot(x, w, input_precision="ieee")
                if ARCH == 3:
                    w2 = tl.load(
                        w2_ptr + ks[:, None] * D_SAE + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0
                    )
                    acc2 += tl.dot(x, w2, input_precision="ieee")
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
            tile_v = tl.where(col_ok[None, :], act, float("-inf"))
            tile_i = tl.where(col_ok[None, :], cols[None, :] + tl.zeros([BLOCK_M, BLOCK_N], tl.int32), NO_ID)
            run_v, run_i = best_v, best_i
            new_v = tl.full([BLOCK_M, KP], float("-inf"), tl.float32)
            new_i = tl.full([BLOCK_M, KP], NO_ID, tl.int32)
            for j in tl.static_range(K):
                top = tl.maximum(tl.max(tile_v, 1), tl.max(run_v, 1))
                pick = tl.minimum(
                    tl.min(tl.where(tile_v == top[:, None], tile_i, NO_ID), 1),
                    tl.min(tl.where(run_v == top[:, None], run_i, NO_ID), 1),
                )
                new_v = tl.where(slot[None, :] == j, top[:, None], new_v)
                new_i = tl.where(slot[None, :] == j, pick[:, None], new_i)
                tile_v = tl.where(tile_i == pick[:, None], float("-inf"), tile_v)
                run_v = tl.where(run_i == pick[:, None], float("-inf"), run_v)
            best_v, best_i = new_v, new_i
        active = (best_v > 0.0) & (slot[None, :] < K)
        out = rows[:, None] * K + slot[None, :]
        store_ok = row_ok[:, None] & (slot[None, :] < K)
        tl.store(ids_ptr + out, tl.where(active, best_i, -1), mask=store_ok)
        tl.store(vals_ptr + out, tl.where(active, best_v, 0.0), mask=store_ok)

    return encode_kernel


class TritonEncoder:
    """Same interface as ReferenceEncoder.encode."""

    name = "triton"
    BLOCK_M, BLOCK_N, BLOCK_K = 16, 32, 16

    def __init__(self, sae: Sae, selection: CodeSelection | None = None, device: torch.device | str = "cpu") -> None:
        import triton  # noqa: F401 - fail early and clearly where Triton is missing

        self.sae = sae
        self.selection = selection or default_selection(sae)
        self.device = torch.device(device)
        w = sae.weights
        self.weights = {name: t.to(self.device).contiguous() for name, t in w.named().items()}
        self.decoder = sae.decoder.to(self.device).contiguous() if sae.decoder is not None else None
        if sae.spec.architecture is Architecture.GATED:
            self.weights["W_mag"] = (w.W_enc * torch.exp(w.r_mag)).to(self.device).contiguous()
        width = self.selection.width
        if sae.spec.architecture is Architecture.TOPK and sae.spec.k:
            width = min(width, sae.spec.k)
        self.k = min(width, sae.spec.d_sae)
        self.kernel = _kernel()

    def encode(self, x: torch.Tensor) -> Codes:
        """The kernel selects the codes; fidelity (and emptying unreadable rows) is a torch gather after it."""
        spec = self.sae.spec
        check_input(self.sae, x)
        x = x.to(device=self.device, dtype=torch.float32)
        norms, valid = input_norms(x)
        x = torch.where(valid[:, None], x, 1.0)  # a finite stand-in for unreadable rows, emptied below
        rows, width = x.shape[0], self.selection.width
        ids = torch.full((rows, self.k), EMPTY_ID, dtype=torch.int32, device=self.device)
        values = torch.zeros((rows, self.k), dtype=torch.float32, device=self.device)
        if rows:
            w = self.weights
            gated = spec.architecture is Architecture.GATED
            self.kernel[((rows + self.BLOCK_M - 1) // self.BLOCK_M,)](
                normalize(x, spec).contiguous(),
                w["W_enc"],
                w["W_mag"] if gated else w["W_enc"],
                w["b_gate"] if gated else w["b_enc"],
                w["b_mag"] if gated else w["b_enc"],
                w.get("threshold", w["b_enc"]),
                w["b_dec"],
                ids,
                values,
                rows,
                spec.d_in,
                spec.d_sae,
                K=self.k,
                KP=max(16, 1 << (self.k - 1).bit_length()),
                ARCH=ARCH_CODES[spec.architecture],
                APPLY_BDEC=spec.apply_b_dec_to_input,
                BLOCK_M=self.BLOCK_M,
                BLOCK_N=self.BLOCK_N,
                BLOCK_K=self.BLOCK_K,
            )
        if self.k < width:
            ids = torch.nn.functional.pad(ids, (0, width - self.k), value=EMPTY_ID)
            values = torch.nn.functional.pad(values, (0, width - self.k), value=0.0)
        return with_fidelity(self.sae, x, Codes(ids, values), norms, valid, self.decoder, self.weights["b_dec"])
