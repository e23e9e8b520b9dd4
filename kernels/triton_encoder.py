"""The Triton SAE encoder: `x @ W_enc` with b_dec/b_enc and the architecture's activation rule, then exact
top-k selection through group maxima (kernels/triton_kernels.py explains the selection and its proof).

Per launch: the pre-activations [rows, d_sae] in float32 plus each row's group maxima, from a Triton GEMM with
the bias and activation in its epilogue (`gemm="triton"`) or from torch's matmul (`gemm="torch"`: cuBLAS on a
GPU, the raw products; a Triton pass then takes the group maxima); then one selection program per row reads
only the groups that can hold its k strongest features. Rows are taken in chunks so the float32 scratch stays
under SCRATCH_BYTES.

Operands. With fp32 operands the dots run in IEEE fp32 (no TF32), so codes match the reference. When W_enc is
exactly representable in bf16 (an SAE stored in bf16) and the rows arrive in bf16 (a bf16 model's residual
stream), the dots run on bf16 tensor cores with fp32 accumulation: every product is exact in fp32, so the
result is the reference's float32 computation on the same numbers up to summation order. In that mode b_dec is
folded into the bias (b_enc - b_dec @ W_enc, computed once) and constant_norm_rescale's row scale is applied
after the dot, so the kernel reads the model's rows as they are. Layer-norm SAEs and fp32 rows take the fp32
path (Triton GEMM only: torch's fp32 matmul may run in TF32 where a process allows it). Row-wise normalisation
on the fp32 path is done in torch before the kernels.

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
SCRATCH_BYTES = 512 * 2**20  # float32 pre-activations of one chunk of rows (4096 rows of d_sae 32768)
GROUPS_PER_ROW = 1024  # group maxima a row aims for (one selection program holds them all in registers)
MAX_GROUPS = 2**16  # the radix select's counts are 16-bit fields
GEMMS = ("triton", "torch")


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """How one encode runs; `for_shape` picks it, the bench and tests override it.

    gemm: where the pre-activations come from ("triton": the Triton GEMM, bias and group maxima in its
    epilogue; "torch": torch's matmul from bf16 operands, then a group-maxima pass). block_*, num_warps,
    num_stages, swizzle: the Triton GEMM's tiles (with gemm="torch", block_m x block_n tiles the group-maxima
    pass). group: features per group maximum (divides block_n). candidate_block: candidate groups the selection
    gathers at once. keep: slots a row has for the features that reach its k-th largest group maximum (a power
    of two; default 2k rounded up; a row with more takes the slow path). select_warps: warps per selection
    program (one row each)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    group: int = 64
    candidate_block: int = 32
    keep: int | None = None
    select_warps: int = 4
    gemm: str = "triton"
    swizzle: int = 8
    select: bool = True  # False only in the encoder bench: pre-activations and group maxima alone

    def __post_init__(self) -> None:
        if self.gemm not in GEMMS:
            raise ValueError(f"LaunchConfig.gemm must be one of {GEMMS}, got {self.gemm!r}")
        if self.keep is not None and (self.keep < 1 or self.keep & (self.keep - 1)):
            raise ValueError(f"LaunchConfig.keep must be a power of two, got {self.keep}")
        for name in ("group", "candidate_block", "select_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"LaunchConfig.{name} must be a power of two, got {value}")
        if self.block_n % self.group:
            raise ValueError(f"LaunchConfig.group ({self.group}) must divide block_n ({self.block_n})")

    @staticmethod
    def for_shape(rows: int, d_sae: int, k: int, bf16: bool, device: torch.device) -> LaunchConfig:
        group = _group_size(d_sae)
        candidate_block = max(1, min(_pow2(k), 4096 // group))
        if device.type != "cuda":  # the interpreter: small tiles, several candidate batches where groups tie
            return LaunchConfig(16, max(32, group), 16, 4, 1, group, min(candidate_block, 16))
        if bf16 and _matmul_has_float32_output():
            # H200 sweeps (README): cuBLAS's products and a group-maxima pass beat the Triton GEMM at every batch;
            # 4-warp selection programs were fastest or within noise of the fastest everywhere
            block_m, block_n = (16, 256) if rows <= 16 else (64, 128)
            return LaunchConfig(block_m, max(block_n, group), 64, 4, 1, group, candidate_block, gemm="torch")
        if bf16:  # a torch without mm(..., out_dtype): the Triton GEMM (the sweep's 128 x 256 tiles from 65 rows)
            block_m, block_n = (16, 128) if rows <= 16 else (64, 128) if rows <= 64 else (128, 256)
            warps, stages = (8, 4) if block_m == 128 else (4, 4)
            return LaunchConfig(block_m, max(block_n, group), 64, warps, stages, group, candidate_block)
        block_m = 16 if rows <= 16 else 64
        return LaunchConfig(block_m, max(64, group), 32, 4, 3, group, candidate_block)


@functools.cache
def _matmul_has_float32_output() -> bool:
    """torch.mm(..., out_dtype=torch.float32) from bf16 operands (torch 2.8 and later)."""
    return hasattr(torch.ops.aten.mm, "dtype")


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _group_size(d_sae: int) -> int:
    """16 to 256 features a group: about GROUPS_PER_ROW group maxima a row (64 features a group at d_sae 65,536;
    at most 4,096 group maxima up to d_sae 2**20); wider SAEs get wider groups, so a row stays under MAX_GROUPS."""
    group = min(256, max(16, _pow2(-(-d_sae // GROUPS_PER_ROW))))
    return max(group, _pow2(-(-d_sae // (MAX_GROUPS // 4))))


@functools.cache
def _kernels():
    from . import triton_kernels

    return triton_kernels


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
        self.columns = sae.spec.d_sae * (2 if gated else 1)  # of the float32 pre-activations: gated SAEs have two
        self.kernels = _kernels()
        self._torch_matrix: torch.Tensor | None = None  # built at the first gemm='torch' launch
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
        """Codes without fidelity (public for the encoder bench's kernel-only timings). `norms`: the rows' L2
        norms where the caller has them (`encode` does), so they are not computed twice."""
        spec = self.sae.spec
        rows, width = x.shape[0], self.selection.width
        use_bf16 = self.bf16 is not None and x.dtype == torch.bfloat16
        scale = None
        if use_bf16:
            if spec.normalization is Normalization.CONSTANT_NORM_RESCALE:
                norms = x.float().norm(dim=-1) if norms is None else norms
                # finite for unreadable rows too (zero, infinite or NaN norms): their codes are emptied after
                scale = torch.nan_to_num(spec.d_in**0.5 / norms, nan=1.0, posinf=1.0, neginf=1.0).contiguous()
            x = x if x.stride(1) == 1 else x.contiguous()
        else:
            x = normalize(x.to(torch.float32), spec).contiguous()
        ids = torch.empty((rows, self.k), dtype=torch.int32, device=self.device)  # the selection writes every slot
        values = torch.empty((rows, self.k), dtype=torch.float32, device=self.device)
        config = config or LaunchConfig.for_shape(rows, spec.d_sae, self.k, use_bf16, self.device)
        if config.gemm == "torch" and not use_bf16:
            raise ValueError("gemm='torch' needs bf16 operands (on a GPU an fp32 matmul may run in TF32)")
        groups = -(-spec.d_sae // config.group)
        if groups >= MAX_GROUPS:
            raise ValueError(
                f"encoder {self.sae.name}: d_sae {spec.d_sae} in groups of {config.group} is {groups} groups a row; "
                f"the selection counts them in 16-bit fields (at most {MAX_GROUPS - 1}): use a larger "
                "LaunchConfig.group"
            )
        chunk = max(config.block_m, SCRATCH_BYTES // (4 * self.columns) // config.block_m * config.block_m)
        for first in range(0, rows, chunk):
            last = min(rows, first + chunk)
            part_scale = scale[first:last] if scale is not None else None
            self._launch(x[first:last], part_scale, ids[first:last], values[first:last], config, use_bf16)
        if self.k < width:
            ids = torch.nn.functional.pad(ids, (0, width - self.k), value=EMPTY_ID)
            values = torch.nn.functional.pad(values, (0, width - self.k), value=0.0)
        return Codes(ids, values)

    def _launch(self, x, scale, ids, values, config: LaunchConfig, use_bf16: bool) -> None:
        spec, k, rows = self.sae.spec, self.k, x.shape[0]
        gated = spec.architecture is Architecture.GATED
        w = {**self.weights, **self.bf16} if use_bf16 else self.weights
        bias, bias2 = (w["b_gate"], w["b_mag"]) if gated else (w["b_enc"], w["b_enc"])
        threshold = w.get("threshold", w["b_enc"])
        scale_arg = scale if scale is not None else bias  # any float pointer where there is no row scale
        arch = ARCH_CODES[spec.architecture]
        group = config.group
        groups = -(-spec.d_sae // group)
        group_max = torch.empty((rows, groups), dtype=torch.float32, device=self.device)
        if config.gemm == "torch":
            pre = self._torch_products(x)
            self.kernels.group_max_kernel[(-(-rows // config.block_m), -(-spec.d_sae // config.block_n))](
                pre, bias, bias2, threshold, scale_arg, group_max, rows, spec.d_sae, pre.stride(0), groups,
                ARCH=arch, ROW_SCALE=scale is not None, GROUP=group, BLOCK_M=config.block_m,
                BLOCK_N=config.block_n, num_warps=config.num_warps,
            )  # fmt: skip
        else:
            # Triton 3.9's interpreter gets bf16 dots wrong (errors of 1e10 seen on CPU); there the bf16 operands
            # are widened to fp32 first, which is exact, so CI still checks everything else of the bf16 path.
            interpreted = self.device.type != "cuda"
            pre = torch.empty((rows, self.columns), dtype=torch.float32, device=self.device)
            blocks = -(-rows // config.block_m) * -(-spec.d_sae // config.block_n)
            self.kernels.gemm_kernel[(blocks,)](
                x, x.stride(0), w["W_enc"], w["W_mag"] if gated else w["W_enc"], bias, bias2, threshold,
                w["b_dec"], scale_arg, pre, group_max, rows, spec.d_in, spec.d_sae, pre.stride(0), groups,
                ARCH=arch, APPLY_BDEC=spec.apply_b_dec_to_input and not use_bf16, ROW_SCALE=scale is not None,
                IEEE=not use_bf16 or interpreted, WIDEN=use_bf16 and interpreted, GROUP=group,
                SWIZZLE=config.swizzle, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                num_warps=config.num_warps, num_stages=config.num_stages,
            )  # fmt: skip
        if not config.select:
            return
        padded = _pow2(groups)
        order = torch.empty((rows, padded), dtype=torch.int32, device=self.device)
        keep = config.keep or 2 * _pow2(k)
        kept = torch.empty((rows, keep), dtype=torch.int64, device=self.device)
        block_r = 1 if self.device.type == "cuda" else 16
        self.kernels.select_kernel[(-(-rows // block_r),)](
            pre, group_max, bias, bias2, threshold, scale_arg, order, kept, ids, values, rows, spec.d_sae,
            pre.stride(0), groups, K=k, KP=max(16, _pow2(k)), NGP=padded, GROUP=group, CB=config.candidate_block,
            KEEP=keep, BLOCK_R=block_r, ARCH=arch, RAW=config.gemm == "torch", ROW_SCALE=scale is not None,
            NO_ID=self.kernels.NO_ID, ABSENT=self.kernels.ABSENT, num_warps=config.select_warps,
        )  # fmt: skip

    def _torch_products(self, x: torch.Tensor) -> torch.Tensor:
        """x @ [W_enc | W_mag] in float32 without the bias, from bf16 operands: cuBLAS on a GPU; on CPU (tests)
        the same products in float32, which is exact for bf16 operands."""
        if self._torch_matrix is None:
            gated = self.sae.spec.architecture is Architecture.GATED
            matrix = torch.cat([self.bf16["W_enc"], self.bf16["W_mag"]], dim=1) if gated else self.bf16["W_enc"]
            self._torch_matrix = (matrix if self.device.type == "cuda" else matrix.float()).contiguous()
        if self.device.type == "cuda":
            return torch.mm(x, self._torch_matrix, out_dtype=torch.float32)
        return x.float() @ self._torch_matrix
