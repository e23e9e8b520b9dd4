"""A finished request reduced to the features it carries, per code mode and scope: the unit the request-level
index (request_index.py) stores and counts.

Features are dense "term ids": the SAE's base (its gslot's offset in registration order) + the feature id.
Scopes are bits, so one sorted array per mode says which features a request carries in its prompt, in its
generated tokens and (for mean-pooled argmax, where "both" is its own computation) over both.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from circuitwatch.proto import circuitwatch_pb2 as pb

MODES = (pb.CODE_MODE_CODES, pb.CODE_MODE_ARGMAX_TOKEN, pb.CODE_MODE_ARGMAX_MEAN)
PROMPT_BIT, GENERATED_BIT, BOTH_BIT = 1, 2, 4
# Code modes whose "both" set is the union of the prompt and generated sets; mean-pooled argmax is not.
BOTH_IS_UNION = {pb.CODE_MODE_CODES: True, pb.CODE_MODE_ARGMAX_TOKEN: True, pb.CODE_MODE_ARGMAX_MEAN: False}
DENSE_SPAN = 4  # count features by id (no sort) while their id span is at most this many times the codes


@dataclass(frozen=True)
class SlotCodes:
    """One request's latest codes in one SAE slot (superseded rows already left out)."""

    positions: np.ndarray  # int64 [rows]
    row_offsets: np.ndarray  # int64 [rows + 1]
    features: np.ndarray  # uint32 [nnz]
    activations: np.ndarray  # float32 [nnz]


@dataclass(frozen=True)
class FeatureSet:
    """Sorted unique term ids, each with scope bits (PROMPT_BIT, GENERATED_BIT, BOTH_BIT)."""

    terms: np.ndarray  # uint32
    scopes: np.ndarray  # uint8

    @classmethod
    def empty(cls) -> FeatureSet:
        return cls(np.empty(0, np.uint32), np.empty(0, np.uint8))


def request_feature_sets(codes: dict[int, SlotCodes], num_prompt: int, base: Sequence[int]) -> dict[int, FeatureSet]:
    """A request's feature sets per code mode.

    codes: every active feature of every token. argmax_token: each token's strongest feature (lower id on a
    tie). argmax_mean: per slot, the feature with the largest activation mean-pooled over the scope's tokens
    (the paper's one code per prompt and component), computed separately for prompt, generated and both.
    Slots are taken in gslot order, so their term ranges (base + feature) concatenate already sorted.
    """
    parts: dict[int, list[FeatureSet]] = {mode: [] for mode in MODES}
    for gslot in sorted(codes):
        slot = codes[gslot]
        if not len(slot.features):
            continue
        offset = base[gslot]
        per_row = np.diff(slot.row_offsets)
        filled = per_row > 0
        starts = slot.row_offsets[:-1][filled]
        generated_row = slot.positions >= num_prompt
        generated = np.repeat(generated_row, per_row)  # per posting: rows' postings are contiguous, in row order
        acts = slot.activations
        unique, scopes, sums = _per_feature(slot.features, generated, acts)
        parts[pb.CODE_MODE_CODES].append(FeatureSet((unique + offset).astype(np.uint32), scopes))
        # strongest feature per token, lower id on a tie (each filled row's maximum, repeated over its postings)
        best = np.repeat(np.maximum.reduceat(acts, starts), per_row[filled])
        candidates = np.where(acts == best, slot.features, np.uint32(2**32 - 1))
        strongest = np.minimum.reduceat(candidates, starts)
        phase = np.where(generated_row[filled], GENERATED_BIT, PROMPT_BIT)
        parts[pb.CODE_MODE_ARGMAX_TOKEN].append(_merge([(strongest + offset, phase | BOTH_BIT)]))
        # mean-pooled argmax per scope (argmax of the sums: the token count divides every feature alike)
        pooled = []
        for bit, scope_sums in zip((PROMPT_BIT, GENERATED_BIT, BOTH_BIT), sums, strict=True):
            if scope_sums.any():
                pooled.append((np.array([unique[np.argmax(scope_sums)] + offset]), np.array([bit])))  # first = lower id
        parts[pb.CODE_MODE_ARGMAX_MEAN].append(_merge(pooled))
    return {
        mode: FeatureSet(np.concatenate([p.terms for p in found]), np.concatenate([p.scopes for p in found]))
        if found
        else FeatureSet.empty()
        for mode, found in parts.items()
    }


@dataclass(frozen=True)
class Reduction:
    """A final request waiting for its feature sets: how to read its codes (when it is reduced, off the ingest
    path) and who else wants the result (the fleet exporter: sets and codes)."""

    codes: Callable[[], dict[int, SlotCodes]]
    num_prompt: int
    bases: Sequence[int]  # each gslot's term base (the registry's, append-only)
    reduced: Callable[[dict[int, FeatureSet], dict[int, SlotCodes]], None] | None = None


# What reduces requests: (codes, num_prompt, bases) per request -> their feature sets, in order.
ReductionInput = tuple[dict[int, SlotCodes], int, Sequence[int]]
FeatureSetsOf = Callable[[list[ReductionInput]], list[dict[int, FeatureSet]]]


def feature_sets_here(inputs: list[ReductionInput]) -> list[dict[int, FeatureSet]]:
    """Reduce in this process, letting other threads in between requests (a request is ~2 ms of numpy)."""
    out = []
    for codes, num_prompt, bases in inputs:
        out.append(request_feature_sets(codes, num_prompt, bases))
        time.sleep(0)
    return out


def _per_feature(
    features: np.ndarray, generated: np.ndarray, acts: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """A slot's distinct features (sorted), each one's scope bits (PROMPT_BIT, GENERATED_BIT, BOTH_BIT) and its
    activation sums over prompt, generated and all tokens. Counted by feature id when the ids span little more
    than the codes do (no sort: a decode-shaped request's 32k codes over 16k ids), else by np.unique's ranks; both
    add each feature's activations in the same order, so the sums are the same to the bit."""
    span = int(features.max()) + 1
    if span <= DENSE_SPAN * len(features):
        keys, length = features, span
    else:
        ranks_of, keys = np.unique(features, return_inverse=True)
        length = len(ranks_of)
    # One pass per count for both scopes: key * 2 + generated puts a feature's prompt and generated bins side by
    # side, and each bin adds its activations in array order, as counting the two scopes apart would. Weights in
    # float64, as bincount adds them (given float32, it converts them on every call, 5x slower).
    by_scope = keys.astype(np.intp) * 2 + generated
    weights = acts.astype(np.float64)
    in_scope = np.bincount(by_scope, minlength=2 * length).reshape(length, 2) > 0
    scope_sums = np.bincount(by_scope, weights=weights, minlength=2 * length).reshape(length, 2)
    scopes = (in_scope[:, 0] * np.uint8(PROMPT_BIT)) | (in_scope[:, 1] * np.uint8(GENERATED_BIT)) | np.uint8(BOTH_BIT)
    sums = [scope_sums[:, 0], scope_sums[:, 1], np.bincount(keys, weights=weights, minlength=length)]
    if keys is features:  # keep the ids that occur (nonzero of a bool array: 4x faster than of counts)
        unique = np.flatnonzero(in_scope[:, 0] | in_scope[:, 1])
        return unique.astype(features.dtype), scopes[unique], [s[unique] for s in sums]
    return ranks_of, scopes, sums


def _merge(parts: list[tuple[np.ndarray, np.ndarray]]) -> FeatureSet:
    """Unique terms with the OR of their scope bits."""
    if not parts:
        return FeatureSet.empty()
    terms = np.concatenate([t for t, _ in parts]).astype(np.uint32)
    bits = np.concatenate([b for _, b in parts]).astype(np.uint8)
    order = np.argsort(terms, kind="stable")
    terms, bits = terms[order], bits[order]
    starts = np.flatnonzero(np.diff(terms, prepend=np.int64(-1)) != 0)
    return FeatureSet(terms[starts], np.bitwise_or.reduceat(bits, starts).astype(np.uint8))


def scope_bits(scope: int, mode: int) -> int:
    """The FeatureSet scope bits that put a feature in `scope` for this code mode."""
    if scope == pb.SCOPE_PROMPT:
        return PROMPT_BIT
    if scope == pb.SCOPE_GENERATED:
        return GENERATED_BIT
    return PROMPT_BIT | GENERATED_BIT if BOTH_IS_UNION[mode] else BOTH_BIT
