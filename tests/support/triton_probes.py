"""Small Triton kernels that call the encoder's device helpers directly, for tests that check a helper
against an independent computation. Imported only inside the Triton child run (support/triton_child.py)."""

from __future__ import annotations

import triton
import triton.language as tl

from circuitwatch.kernels.triton_kernels import _kth_largest_level


@triton.jit
def kth_largest_level_kernel(level_ptr, out_ptr, N: tl.constexpr, K: tl.constexpr, R: tl.constexpr):
    rows = tl.arange(0, R)
    level = tl.load(level_ptr + rows[:, None] * N + tl.arange(0, N)[None, :])
    tl.store(out_ptr + rows, _kth_largest_level(level, K, R))
