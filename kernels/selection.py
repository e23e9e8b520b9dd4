"""Which features of a token become codes, with deterministic tie-breaking (lower feature id wins)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from .codes import EMPTY_ID, Codes
from .spec import Architecture


class SelectionMode(enum.StrEnum):
    TOPK = "topk"  # the k strongest active features
    THRESHOLD = "threshold"  # every active feature, capped at max_codes strongest
    ARGMAX = "argmax"  # the single strongest active feature (O'Neill & Bui's discretisation)


@dataclass(frozen=True)
class CodeSelection:
    mode: SelectionMode
    k: int = 0  # TOPK: features per token; THRESHOLD: cap per token

    def __post_init__(self) -> None:
        if self.mode is not SelectionMode.ARGMAX and self.k <= 0:
            raise ValueError(f"code selection {self.mode.value} needs a positive k/max_codes, got {self.k}")

    @property
    def width(self) -> int:
        return 1 if self.mode is SelectionMode.ARGMAX else self.k

    def describe(self) -> str:
        """The manifest's `selection` string."""
        if self.mode is SelectionMode.TOPK:
            return f"topk:k={self.k}"
        if self.mode is SelectionMode.THRESHOLD:
            return f"threshold:max={self.k}"
        return "argmax"


def top_k_lowest_id(
    scores: torch.Tensor, k: int, drop_at_or_below: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest scores per row, ordered by score descending and, among equal scores, by lower index.

    torch.topk finds the k largest values exactly but leaves the order among ties unspecified. Its k largest
    *indices* are still the right set wherever the k-th and (k+1)-th largest values differ, so one topk of k+1
    and a sort of the k chosen settle most rows; only rows with a tie across the k-th place (which of the tied
    indices get in is up to topk) take the exact pass over the whole row, in index order. So the result is
    reproducible across devices and backends. NaN scores are treated as -inf.

    `drop_at_or_below`: the caller discards scores at or below it, so a tie there may fall either way (codes
    keep only activations > 0, and a sparse row's k-th value is usually 0: without this most rows would take
    the exact pass for ties nobody sees).
    """
    rows, width = scores.shape
    k = min(k, width)
    if rows == 0 or k == 0:
        return (
            torch.empty(rows, k, dtype=torch.int64, device=scores.device),
            torch.empty(rows, k, dtype=scores.dtype, device=scores.device),
        )
    scores = torch.nan_to_num(scores, nan=float("-inf"))
    if k == width:
        indices = torch.arange(width, device=scores.device).expand(rows, width)
    else:
        top = torch.topk(scores, k + 1, dim=1)
        indices = top.indices[:, :k]
        straddled = top.values[:, k] == top.values[:, k - 1]
        if drop_at_or_below is not None:
            straddled &= top.values[:, k - 1] > drop_at_or_below
        if straddled.any():  # rare outside saturated or integer-valued scores
            at = straddled.nonzero()[:, 0]
            indices = indices.clone()
            indices[at] = _ties_in_index_order(scores[at], k, top.values[at, k - 1 : k])
    # order the chosen set by index, then stably by score: equal scores keep the lower index first
    indices = torch.sort(indices, dim=1).values
    values = scores.gather(1, indices)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    return indices.gather(1, order), values.gather(1, order)


def _ties_in_index_order(scores: torch.Tensor, k: int, kth: torch.Tensor) -> torch.Tensor:
    """The k chosen indices (ascending) of rows whose k-th value ties past the k-th place: every score above
    the k-th value, then the tied ones in index order until k are chosen."""
    above = scores > kth
    tied = scores == kth
    still_needed = k - above.sum(dim=1, keepdim=True)
    tie_rank = torch.cumsum(tied.to(torch.int32), dim=1)
    chosen = above | (tied & (tie_rank <= still_needed))
    # nonzero() walks row-major, so each row's chosen indices come out in ascending order.
    return chosen.nonzero()[:, 1].reshape(scores.shape[0], k)


def select_codes(activations: torch.Tensor, selection: CodeSelection) -> Codes:
    """Codes from post-activation values [rows, d_sae]: only features with activation > 0 are codes."""
    ids, values = top_k_lowest_id(activations, selection.width, drop_at_or_below=0.0)
    inactive = ~(values > 0)
    ids = ids.to(torch.int32).masked_fill(inactive, EMPTY_ID)
    values = values.to(torch.float32).masked_fill(inactive, 0.0)
    if ids.shape[1] < selection.width:  # d_sae smaller than k: pad to the promised width
        pad = selection.width - ids.shape[1]
        ids = torch.nn.functional.pad(ids, (0, pad), value=EMPTY_ID)
        values = torch.nn.functional.pad(values, (0, pad), value=0.0)
    return Codes(ids=ids, values=values)


def selection_for(mode: str, k: int | None, sae, max_codes: int) -> CodeSelection:
    """A slot's selection from its settings (`default`, `topk`, `threshold`, `argmax`); shared by the plugin
    and `circuitwatch calibrate`, which must select codes exactly alike (the error is that of the codes)."""
    if mode == "default":
        if sae.spec.architecture is Architecture.TOPK and sae.spec.k:
            return CodeSelection(SelectionMode.TOPK, sae.spec.k)
        return CodeSelection(SelectionMode.THRESHOLD, max_codes)
    if mode == "argmax":
        return CodeSelection(SelectionMode.ARGMAX)
    if mode == "topk":
        return CodeSelection(SelectionMode.TOPK, k or sae.spec.k or max_codes)
    if mode == "threshold":
        return CodeSelection(SelectionMode.THRESHOLD, k or max_codes)
    raise ValueError(f"unknown selection {mode!r} (supported: default, topk, threshold, argmax)")
