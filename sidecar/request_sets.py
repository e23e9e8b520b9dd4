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
        unique, inverse = np.unique(slot.features, return_inverse=True)
        in_prompt = np.bincount(inverse[~generated], minlength=len(unique)) > 0
        in_generated = np.bincount(inverse[generated], minlength=len(unique)) > 0
        scopes = (in_prompt * PROMPT_BIT) | (in_generated * GENERATED_BIT) | BOTH_BIT
        parts[pb.CODE_MODE_CODES].append(FeatureSet((unique + offset).astype(np.uint32), scopes.astype(np.uint8)))
        # strongest feature per token, lower id on a tie
        acts = slot.activations
        best = np.maximum.reduceat(acts, starts[filled])
        candidates = np.where(acts == best[np.searchsorted(filled, row_of)], slot.features, np.uint32(2**32 - 1))
        strongest = np.minimum.reduceat(candidates, starts[filled])
        phase = np.where(generated_row[filled], GENERATED_BIT, PROMPT_BIT)
        parts[pb.CODE_MODE_ARGMAX_TOKEN].append(_merge([(strongest + offset, phase | BOTH_BIT)]))
        # mean-pooled argmax per scope (argmax of the sums: the token count divides every feature alike)
        pooled = []
        for bit, select in ((PROMPT_BIT, ~generated), (GENERATED_BIT, generated), (BOTH_BIT, slice(None))):
            sums = np.bincount(inverse[select], weights=acts[select], minlength=len(unique))
            if sums.any():
                pooled.append((np.array([unique[np.argmax(sums)] + offset]), np.array([bit])))  # first = lower id
        parts[pb.CODE_MODE_ARGMAX_MEAN].append(_merge(pooled))
    return {
        mode: FeatureSet(np.concatenate([p.terms for p in found]), np.concatenate([p.scopes for p in found]))
        if found
        else FeatureSet.empty()
        for mode, found in parts.items()
    }


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
