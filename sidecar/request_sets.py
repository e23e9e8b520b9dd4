"""A finished request reduced to the features it carries, per code mode and scope: the unit the request-level
index (request_index.py) stores and counts.

Features are dense "term ids": the SAE's base (its gslot's offset in registration order) + the feature id.
Scopes are bits, so one sorted array per mode says which features a request carries in its prompt, in its
generated tokens and (for mean-pooled argmax, where "both" is its own computation) over both.
"""

from __future__ import annotations

from collections.abc import Sequence
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
        starts = slot.row_offsets[:-1]
        filled = np.flatnonzero(np.diff(slot.row_offsets) > 0)
        row_of = np.repeat(np.arange(len(starts)), np.diff(slot.row_offsets))
        generated_row = slot.positions >= num_prompt
        generated = generated_row[row_of]
        acts = slot.activations
        unique, in_prompt, in_generated, sums = _per_feature(slot.features, generated, acts)
        scopes = (in_prompt * PROMPT_BIT) | (in_generated * GENERATED_BIT) | BOTH_BIT
        parts[pb.CODE_MODE_CODES].append(FeatureSet((unique + offset).astype(np.uint32), scopes.astype(np.uint8)))
        # strongest feature per token, lower id on a tie
        best = np.maximum.reduceat(acts, starts[filled])
        candidates = np.where(acts == best[np.searchsorted(filled, row_of)], slot.features, np.uint32(2**32 - 1))
        strongest = np.minimum.reduceat(candidates, starts[filled])
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


def _per_feature(
    features: np.ndarray, generated: np.ndarray, acts: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    """A slot's distinct features (sorted), whether each occurs in prompt and in generated tokens, and each one's
    activation sums over prompt, generated and all tokens. Counted by feature id when the ids span little more
    than the codes do (no sort: a decode-shaped request's 32k codes over 16k ids), else by np.unique's ranks; both
    add each feature's activations in the same order, so the sums are the same to the bit."""
    span = int(features.max()) + 1
    if span <= DENSE_SPAN * len(features):
        keys, length = features, span
    else:
        ranks_of, keys = np.unique(features, return_inverse=True)
        length = len(ranks_of)
    in_prompt = np.bincount(keys[~generated], minlength=length)
    in_generated = np.bincount(keys[generated], minlength=length)
    sums = [
        np.bincount(keys[select], weights=acts[select], minlength=length)
        for select in (~generated, generated, slice(None))
    ]
    if keys is features:  # keep the ids that occur
        unique = np.flatnonzero(in_prompt + in_generated).astype(features.dtype)
        return unique, in_prompt[unique] > 0, in_generated[unique] > 0, [s[unique] for s in sums]
    return ranks_of, in_prompt > 0, in_generated > 0, sums


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
