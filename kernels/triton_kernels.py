"""The Triton kernels behind the triton encoder backend (kernels/triton_encoder.py launches them).

Selection by group maxima. The pre-activation matrix [rows, d_sae] is written once in float32 (as a bare GEMM
writes its output) together with, per row, the maximum activation of each group of GROUP consecutive features.
If T is the k-th largest group maximum of a row, the row's k strongest features all lie in groups whose maximum
is >= T: k distinct groups reach T, so the k-th strongest feature does too, and every feature at least that
strong sits in a group whose maximum is at least that. Usually exactly k groups qualify (more only where group
maxima tie at T), so the selection reads k * GROUP values per row instead of d_sae, keeps those >= T (a few
more than k) and orders them exactly, lower feature id first among equal activations (the reference's rule).

Comparisons go through 64-bit keys: the activation's float32 bits mapped to an order-preserving int32 in the
high half, NO_ID - feature id in the low half, so one integer max picks the strongest value and, among equal
values, the lowest id. ABSENT (the key of -inf with id NO_ID) is below every real key.

The pre-activations come from one of two places: `gemm_kernel` (a Triton GEMM whose epilogue adds the bias,
applies the activation rule for the group maxima and stores the biased pre-activations), or torch's matmul
(cuBLAS on a GPU) writing the raw products, after which `group_max_kernel` takes the group maxima. In the
second case (RAW) both the group maxima and the selection add the bias (and the row scale) with the same fused
multiply-add, so the two kernels see bit-identical activations.
"""

from __future__ import annotations

import triton
import triton.language as tl

NO_ID = 2**31 - 1
ABSENT = -2139095041 * 2**32  # the order-preserving int32 of -inf (0xFF800000 ^ 0x7FFFFFFF) in the high half


@triton.jit
def _activate(pre, mag, threshold, ARCH: tl.constexpr):
    """The architecture's activation rule on biased pre-activations: only comparisons, so it is exact."""
    if ARCH == 0:  # standard
        act = tl.maximum(pre, 0.0)
    elif ARCH == 1:  # jumprelu
        act = tl.where(pre > threshold, tl.maximum(pre, 0.0), 0.0)
    elif ARCH == 2:  # topk: the k largest pre-activations; only positive ones become codes
        act = tl.where(pre == pre, pre, float("-inf"))  # NaN (an overflow inside the GEMM) as -inf, as the reference
    else:  # gated: the gate's sign selects the magnitude path
        act = tl.where(pre > 0.0, tl.maximum(mag, 0.0), 0.0)
    return act


@triton.jit
def _key(value, ids, NO_ID: tl.constexpr):
    bits = value.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (NO_ID - ids).to(tl.int64)


@triton.jit
def _biased(raw, scale, bias, ROW_SCALE: tl.constexpr):
    if ROW_SCALE:  # noqa: SIM108 - a constexpr branch, the form Triton compiles away
        pre = tl.fma(raw, scale, bias)  # one rounding, the same in every kernel that recomputes it
    else:
        pre = raw + bias
    return pre


@triton.jit
def _store_group_maxima(
    pre, mag, thr_ptr, gmax_ptr, rows, cols, col_block, M, D_SAE, NG,
    ARCH: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """A [BLOCK_M, BLOCK_N] tile's group maxima of the activations (padding as -inf), from biased pre-activations;
    both sources of pre-activations end with it."""
    row_ok = rows < M
    col_ok = cols < D_SAE
    threshold = 0.0
    if ARCH == 1:
        threshold = tl.load(thr_ptr + cols, mask=col_ok, other=0.0)[None, :]
    act = tl.where(row_ok[:, None] & col_ok[None, :], _activate(pre, mag, threshold, ARCH), float("-inf"))
    group_max = tl.max(tl.reshape(act, (BLOCK_M, BLOCK_N // GROUP, GROUP)), 2)
    groups = col_block * (BLOCK_N // GROUP) + tl.arange(0, BLOCK_N // GROUP)
    tl.store(gmax_ptr + rows[:, None] * NG + groups[None, :], group_max, mask=row_ok[:, None] & (groups < NG)[None, :])


@triton.jit
def gemm_kernel(
    x_ptr, stride_x, w_ptr, w2_ptr, b_ptr, b2_ptr, thr_ptr, bdec_ptr, scale_ptr, pre_ptr, gmax_ptr,
    M, D_IN, D_SAE, PRE_STRIDE, NG,
    ARCH: tl.constexpr, APPLY_BDEC: tl.constexpr, ROW_SCALE: tl.constexpr, IEEE: tl.constexpr,
    WIDEN: tl.constexpr, GROUP: tl.constexpr, SWIZZLE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_M, BLOCK_N] tile of x @ W_enc (and of x @ W_mag for gated SAEs): biased pre-activations to
    pre_ptr, the tile's group maxima of the activations to gmax_ptr."""
    pid = tl.program_id(0)
    row_blocks = tl.cdiv(M, BLOCK_M)
    col_blocks = tl.cdiv(D_SAE, BLOCK_N)
    # SWIZZLE row blocks walk the columns together, so each W tile is read from memory about once per band
    band = SWIZZLE * col_blocks
    first = (pid // band) * SWIZZLE
    size = tl.minimum(row_blocks - first, SWIZZLE)
    row_block = first + (pid % band) % size
    col_block = (pid % band) // size
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < D_SAE
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, D_IN, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D_IN
        w_at = ks[:, None].to(tl.int64) * D_SAE + cols[None, :]  # 64-bit: d_in * d_sae may pass 2**31
        w_ok = k_ok[:, None] & col_ok[None, :]
        x_at = rows[:, None].to(tl.int64) * stride_x + ks[None, :]
        x = tl.load(x_ptr + x_at, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
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
    scale = 1.0
    if ROW_SCALE:
        scale = tl.load(scale_ptr + rows, mask=row_ok, other=1.0)[:, None]
    pre = _biased(acc, scale, tl.load(b_ptr + cols, mask=col_ok, other=0.0)[None, :], ROW_SCALE)
    at = rows[:, None].to(tl.int64) * PRE_STRIDE + cols[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    tl.store(pre_ptr + at, pre, mask=ok)
    mag = pre
    if ARCH == 3:
        mag = _biased(acc2, scale, tl.load(b2_ptr + cols, mask=col_ok, other=0.0)[None, :], ROW_SCALE)
        tl.store(pre_ptr + at + D_SAE, mag, mask=ok)
    _store_group_maxima(pre, mag, thr_ptr, gmax_ptr, rows, cols, col_block, M, D_SAE, NG, ARCH, GROUP, BLOCK_M, BLOCK_N)


@triton.jit
def group_max_kernel(
    pre_ptr, b_ptr, b2_ptr, thr_ptr, scale_ptr, gmax_ptr, M, D_SAE, PRE_STRIDE, NG,
    ARCH: tl.constexpr, ROW_SCALE: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Group maxima of the activations from raw products (torch's matmul wrote them, without the bias)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < D_SAE
    ok = row_ok[:, None] & col_ok[None, :]
    at = rows[:, None].to(tl.int64) * PRE_STRIDE + cols[None, :]
    scale = 1.0
    if ROW_SCALE:
        scale = tl.load(scale_ptr + rows, mask=row_ok, other=1.0)[:, None]
    raw = tl.load(pre_ptr + at, mask=ok, other=0.0)
    pre = _biased(raw, scale, tl.load(b_ptr + cols, mask=col_ok, other=0.0)[None, :], ROW_SCALE)
    mag = pre
    if ARCH == 3:
        raw2 = tl.load(pre_ptr + at + D_SAE, mask=ok, other=0.0)
        mag = _biased(raw2, scale, tl.load(b2_ptr + cols, mask=col_ok, other=0.0)[None, :], ROW_SCALE)
    _store_group_maxima(
        pre, mag, thr_ptr, gmax_ptr, rows, cols, tl.program_id(1), M, D_SAE, NG, ARCH, GROUP, BLOCK_M, BLOCK_N
    )


@triton.jit
def _candidate_keys(
    pre_ptr, order_ptr, b_ptr, b2_ptr, thr_ptr, scale, rows, first, count, D_SAE, PRE_STRIDE,
    NGP: tl.constexpr, GROUP: tl.constexpr, CB: tl.constexpr, ARCH: tl.constexpr, RAW: tl.constexpr,
    ROW_SCALE: tl.constexpr, NO_ID: tl.constexpr, ABSENT: tl.constexpr,
):  # fmt: skip
    """Keys [rows, CB, GROUP] of the features of candidate groups first .. first + CB - 1 (ABSENT past count)."""
    j = first + tl.arange(0, CB)[None, :]
    j_ok = j < count[:, None]
    group = tl.load(order_ptr + rows[:, None] * NGP + j, mask=j_ok, other=0)
    cols = group[:, :, None] * GROUP + tl.arange(0, GROUP)[None, None, :]
    ok = j_ok[:, :, None] & (cols < D_SAE)
    at = rows[:, None, None].to(tl.int64) * PRE_STRIDE + cols
    pre = tl.load(pre_ptr + at, mask=ok, other=0.0)
    mag = pre
    if ARCH == 3:
        mag = tl.load(pre_ptr + at + D_SAE, mask=ok, other=0.0)
    if RAW:
        pre = _biased(pre, scale, tl.load(b_ptr + cols, mask=ok, other=0.0), ROW_SCALE)
        if ARCH == 3:
            mag = _biased(mag, scale, tl.load(b2_ptr + cols, mask=ok, other=0.0), ROW_SCALE)
    threshold = 0.0
    if ARCH == 1:
        threshold = tl.load(thr_ptr + cols, mask=ok, other=0.0)
    return tl.where(ok, _key(_activate(pre, mag, threshold, ARCH), cols, NO_ID), ABSENT)


@triton.jit
def select_kernel(
    pre_ptr, gmax_ptr, b_ptr, b2_ptr, thr_ptr, scale_ptr, order_ptr, kept_ptr, ids_ptr, vals_ptr,
    M, D_SAE, PRE_STRIDE, NG,
    K: tl.constexpr, KP: tl.constexpr, NGP: tl.constexpr, GROUP: tl.constexpr, CB: tl.constexpr,
    KEEP: tl.constexpr, BLOCK_R: tl.constexpr, ARCH: tl.constexpr, RAW: tl.constexpr, ROW_SCALE: tl.constexpr,
    NO_ID: tl.constexpr, ABSENT: tl.constexpr,
):  # fmt: skip
    """BLOCK_R rows (1 on a GPU; more under the interpreter, where each operation costs the same whatever its
    size): each row's k-th largest group maximum T, the groups that reach it, then the exact top k.

    Only features >= T (and > 0) can be among the top k. Usually a few more than k are: they are packed into
    KEEP slots and ordered there (by counting where KEEP <= 64, else by k passes). A row with more (ties, or
    T <= 0 in a row with fewer than k active groups) takes k passes over each batch of CB candidate groups."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < M
    g = tl.arange(0, NGP)
    g_ok = row_ok[:, None] & (g < NG)[None, :]
    group_max = tl.load(gmax_ptr + rows[:, None] * NG + g[None, :], mask=g_ok, other=0.0)
    group_keys = tl.where(g_ok, _key(group_max, g[None, :], NO_ID), ABSENT)
    bar = _kth_largest_level(group_keys >> 32, K, BLOCK_R)
    level = group_keys >> 32
    candidate = g_ok & (level >= bar[:, None]) & (level > 0)
    count = tl.sum(candidate.to(tl.int32), 1)
    rank = tl.cumsum(candidate.to(tl.int32), 1) - 1
    tl.store(order_ptr + rows[:, None] * NGP + rank, tl.broadcast_to(g[None, :], (BLOCK_R, NGP)), mask=candidate)
    tl.debug_barrier()
    scale = 1.0
    if ROW_SCALE:
        scale = tl.load(scale_ptr + rows, mask=row_ok, other=1.0)[:, None, None]
    slot = tl.arange(0, KP)[None, :]
    last = tl.max(count, 0)
    # the features >= T, packed into KEEP slots a row
    kept = tl.zeros([BLOCK_R], tl.int32)
    for first in range(0, last, CB):
        batch = _candidate_keys(
            pre_ptr, order_ptr, b_ptr, b2_ptr, thr_ptr, scale, rows, first, count, D_SAE, PRE_STRIDE,
            NGP, GROUP, CB, ARCH, RAW, ROW_SCALE, NO_ID, ABSENT,
        )  # fmt: skip
        batch = tl.reshape(batch, (BLOCK_R, CB * GROUP))
        batch_level = batch >> 32
        keep = (batch != ABSENT) & (batch_level >= bar[:, None]) & (batch_level > 0)
        at = kept[:, None] + tl.cumsum(keep.to(tl.int32), 1) - 1
        tl.store(kept_ptr + rows[:, None] * KEEP + at, batch, mask=keep & (at < KEEP))
        kept += tl.sum(keep.to(tl.int32), 1)
    tl.debug_barrier()
    fits = row_ok & (kept <= KEEP)
    j = tl.arange(0, KEEP)[None, :]
    keys = tl.load(kept_ptr + rows[:, None] * KEEP + j, mask=fits[:, None] & (j < kept[:, None]), other=ABSENT)
    if KEEP <= 64:  # order by counting: a key's place is how many keys beat it (distinct keys, all > 0)
        place = tl.sum((keys[:, None, :] > keys[:, :, None]).to(tl.int32), 2)
        placed = fits[:, None] & (keys != ABSENT) & (place < K)
        tl.store(ids_ptr + rows[:, None] * K + place, _id_of(keys, NO_ID), mask=placed)
        tl.store(vals_ptr + rows[:, None] * K + place, _value_of(keys), mask=placed)
        unfilled = fits[:, None] & (slot >= tl.minimum(kept, K)[:, None]) & (slot < K)
        tl.store(ids_ptr + rows[:, None] * K + slot, tl.full([BLOCK_R, KP], -1, tl.int32), mask=unfilled)
        tl.store(vals_ptr + rows[:, None] * K + slot, tl.zeros([BLOCK_R, KP], tl.float32), mask=unfilled)
    else:
        best = tl.full([BLOCK_R, KP], ABSENT, tl.int64)
        for s in range(K):
            top = tl.max(keys, 1)
            best = tl.where(slot == s, top[:, None], best)
            keys = tl.where(keys == top[:, None], ABSENT, keys)
        _store_codes(best, rows, fits, ids_ptr, vals_ptr, K, KP, NO_ID)
    spilled = row_ok & ~fits
    if tl.max(spilled.to(tl.int32), 0) > 0:  # rare: k passes over every batch of candidates
        overflow = tl.full([BLOCK_R, KP], ABSENT, tl.int64)
        for start in range(0, last, CB):
            group_batch = _candidate_keys(
                pre_ptr, order_ptr, b_ptr, b2_ptr, thr_ptr, scale, rows, start, count, D_SAE, PRE_STRIDE,
                NGP, GROUP, CB, ARCH, RAW, ROW_SCALE, NO_ID, ABSENT,
            )  # fmt: skip
            merged = tl.full([BLOCK_R, KP], ABSENT, tl.int64)
            for t in range(K):  # the k strongest of the running best and this batch (keys are distinct)
                strongest = tl.maximum(tl.max(tl.max(group_batch, 2), 1), tl.max(overflow, 1))
                merged = tl.where(slot == t, strongest[:, None], merged)
                group_batch = tl.where(group_batch == strongest[:, None, None], ABSENT, group_batch)
                overflow = tl.where(overflow == strongest[:, None], ABSENT, overflow)
            overflow = merged
        _store_codes(overflow, rows, spilled, ids_ptr, vals_ptr, K, KP, NO_ID)


@triton.jit
def _kth_largest_level(level, K: tl.constexpr, BLOCK_R: tl.constexpr):
    """Per row, the k-th largest of `level` (order-preserving int32s in int64, k counted with multiplicity) by
    a radix select, 2 bits a round: a round's three counts share one 64-bit sum (16-bit fields; rows have
    fewer than 65,536 groups), so 16 reductions instead of k extractions. Fewer than k values: some value
    below every positive level."""
    u = level + 2**31  # unsigned order, [0, 2**32)
    prefix = tl.zeros([BLOCK_R], tl.int64)
    need = tl.full([BLOCK_R], K, tl.int64)
    for r in tl.static_range(16):
        shift = 30 - 2 * r
        digit = (u >> shift) & 3
        fields = (digit >= 1).to(tl.int64) + ((digit >= 2).to(tl.int64) << 16) + ((digit >= 3).to(tl.int64) << 32)
        counts = tl.sum(tl.where((u >> (shift + 2)) == (prefix >> (shift + 2))[:, None], fields, 0), 1)
        from1, from2, from3 = counts & 0xFFFF, (counts >> 16) & 0xFFFF, (counts >> 32) & 0xFFFF
        chosen = tl.where(from3 >= need, 3, tl.where(from2 >= need, 2, tl.where(from1 >= need, 1, 0)))
        need -= tl.where(chosen == 3, 0, tl.where(chosen == 2, from3, tl.where(chosen == 1, from2, from1)))
        prefix |= chosen.to(tl.int64) << shift
    return prefix - 2**31


@triton.jit
def _value_of(key):
    ordered = (key >> 32).to(tl.int32)
    return (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _id_of(key, NO_ID: tl.constexpr):
    return NO_ID - (key & 0x7FFFFFFF).to(tl.int32)


@triton.jit
def _store_codes(best, rows, row_mask, ids_ptr, vals_ptr, K: tl.constexpr, KP: tl.constexpr, NO_ID: tl.constexpr):
    """Ordered keys [rows, KP] to the rows' K code slots (id -1, value 0 where nothing positive is left)."""
    slot = tl.arange(0, KP)[None, :]
    value = _value_of(best)
    active = value > 0.0
    out = rows[:, None] * K + slot
    store_ok = row_mask[:, None] & (slot < K)
    tl.store(ids_ptr + out, tl.where(active, _id_of(best, NO_ID), -1), mask=store_ok)
    tl.store(vals_ptr + out, tl.where(active, value, 0.0), mask=store_ok)
