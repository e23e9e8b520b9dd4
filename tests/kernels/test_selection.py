"""Code selection: deterministic ties, inactive rows, small and empty batches, every selection mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from circuitwatch.kernels import EMPTY_ID, CodeSelection, SelectionMode, select_codes, top_k_lowest_id


def test_ties_go_to_the_lower_feature_id() -> None:
    scores = torch.tensor([[1.0, 3.0, 2.0, 3.0, 3.0, 0.5], [5.0, 5.0, 5.0, 5.0, 5.0, 5.0]])
    ids, values = top_k_lowest_id(scores, 2)
    assert ids.tolist() == [[1, 3], [0, 1]]
    assert values.tolist() == [[3.0, 3.0], [5.0, 5.0]]
    ids, _ = top_k_lowest_id(scores, 4)
    assert ids.tolist() == [[1, 3, 4, 2], [0, 1, 2, 3]]


def test_ties_are_stable_under_permuted_storage() -> None:
    """Same answer whatever order torch.topk happens to return ties in (large rows, many equal values)."""
    scores = torch.zeros(8, 4096)
    scores[:, ::7] = 1.0
    ids, _ = top_k_lowest_id(scores, 16)
    assert (ids == torch.arange(0, 16 * 7, 7)).all()


def test_all_negative_rows_give_no_codes() -> None:
    codes = select_codes(-torch.rand(3, 50) - 0.1, CodeSelection(SelectionMode.TOPK, 4))
    assert (codes.ids == EMPTY_ID).all()
    assert (codes.values == 0).all()
    assert codes.rows() == [{}, {}, {}]


def test_k_larger_than_active_features_pads() -> None:
    acts = torch.zeros(2, 10)
    acts[0, [2, 7]] = torch.tensor([0.5, 0.9])
    codes = select_codes(acts, CodeSelection(SelectionMode.TOPK, 5))
    assert codes.ids.tolist()[0] == [7, 2, EMPTY_ID, EMPTY_ID, EMPTY_ID]
    assert codes.rows() == [{7: pytest.approx(0.9), 2: pytest.approx(0.5)}, {}]


def test_k_larger_than_d_sae_keeps_width() -> None:
    codes = select_codes(torch.tensor([[0.1, 0.3, 0.2]]), CodeSelection(SelectionMode.TOPK, 8))
    assert codes.ids.shape == (1, 8)
    assert codes.ids.tolist()[0][:3] == [1, 2, 0]


def test_empty_batch() -> None:
    codes = select_codes(torch.zeros(0, 64), CodeSelection(SelectionMode.TOPK, 4))
    assert codes.ids.shape == (0, 4)
    offsets, ids, values = codes.to_csr()
    assert offsets.tolist() == [0]
    assert len(ids) == len(values) == 0


def test_threshold_mode_caps_strongest_first() -> None:
    acts = torch.tensor([[0.0, 0.4, 0.2, 0.9, 0.4, 0.1]])
    assert select_codes(acts, CodeSelection(SelectionMode.THRESHOLD, 3)).ids.tolist() == [[3, 1, 4]]
    assert select_codes(acts, CodeSelection(SelectionMode.THRESHOLD, 64)).rows()[0].keys() == {1, 2, 3, 4, 5}


def test_argmax_mode() -> None:
    acts = torch.tensor([[0.0, 0.7, 0.7, 0.1], [0.0, 0.0, 0.0, 0.0]])
    codes = select_codes(acts, CodeSelection(SelectionMode.ARGMAX))
    assert codes.ids.tolist() == [[1], [EMPTY_ID]]
    assert CodeSelection(SelectionMode.ARGMAX).describe() == "argmax"


def test_nan_activations_never_become_codes() -> None:
    acts = torch.tensor([[float("nan"), 0.2, float("nan"), 0.1]])
    assert select_codes(acts, CodeSelection(SelectionMode.TOPK, 3)).ids.tolist() == [[1, 3, EMPTY_ID]]


def test_csr_drops_padding() -> None:
    acts = torch.tensor([[0.0, 0.5, 0.0], [0.3, 0.0, 0.6], [0.0, 0.0, 0.0]])
    offsets, ids, values = select_codes(acts, CodeSelection(SelectionMode.TOPK, 2)).to_csr()
    assert offsets.tolist() == [0, 1, 3, 3]
    assert ids.tolist() == [1, 2, 0]
    assert values.tolist() == pytest.approx([0.5, 0.6, 0.3])


def test_on_host_without_fidelity_counts_every_row_valid() -> None:
    acts = torch.tensor([[0.0, 0.5, 0.0], [0.0, 0.0, 0.0]])
    codes = select_codes(acts, CodeSelection(SelectionMode.TOPK, 2))
    assert codes.norms is None
    host = codes.on_host()
    assert host.valid.tolist() == [True, True] and host.errors is None and host.norms is None
    assert host.row_offsets.tolist() == [0, 1, 1] and host.feature_ids.tolist() == [1]


def test_selection_needs_positive_k() -> None:
    with pytest.raises(ValueError, match="topk needs a positive k"):
        CodeSelection(SelectionMode.TOPK, 0)


def _lexsort_oracle(scores: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent of torch.topk: per row, numpy's lexsort by (score descending, index ascending); NaN as -inf,
    and infinities as the extreme finite float32 values (as torch.nan_to_num does)."""
    array = np.nan_to_num(scores.numpy(), nan=-np.inf)
    order = np.stack([np.lexsort((np.arange(row.size), -row))[:k] for row in array])
    return order, np.take_along_axis(array, order, axis=1)


@pytest.mark.parametrize("seed", range(6))
def test_top_k_equals_a_lexsort_of_every_row(seed: int) -> None:
    """Random rows heavy with ties (few distinct values), ties across the k-th place and not, saturated rows,
    NaN and -inf, every k from 1 to the width: the fast path (one topk) and the exact pass for rows whose k-th
    value ties past the k-th place must together equal a plain sort of every row."""
    g = torch.Generator().manual_seed(seed)
    width = 40
    scores = torch.randint(-3, 4, (64, width), generator=g).float()  # integer-valued: ties everywhere
    scores[:16] = torch.randn(16, width, generator=g)  # rows without ties: the fast path alone
    scores[16, :] = 2.0  # one value everywhere
    scores[17, ::3] = float("nan")
    scores[18, 5:] = float("-inf")
    for k in range(1, width + 1):
        ids, values = top_k_lowest_id(scores, k)
        expected_ids, expected_values = _lexsort_oracle(scores, k)
        assert ids.tolist() == expected_ids.tolist(), k
        assert np.array_equal(values.numpy(), expected_values), k


@pytest.mark.parametrize("seed", range(3))
def test_codes_from_sparse_rows_equal_a_lexsort(seed: int) -> None:
    """select_codes lets ties at or below 0 fall either way (they never become codes): its codes still equal the
    oracle's positive entries, in order, on sparse integer-valued rows (ties at 0 and above it)."""
    g = torch.Generator().manual_seed(seed)
    activations = torch.relu(torch.randint(-6, 4, (64, 50), generator=g).float())
    for width in (1, 3, 8, 20, 50):
        codes = select_codes(activations, CodeSelection(SelectionMode.THRESHOLD, width))
        expected_ids, expected_values = _lexsort_oracle(activations, width)
        active = expected_values > 0
        assert codes.ids.tolist() == np.where(active, expected_ids, EMPTY_ID).tolist(), width
        assert np.array_equal(codes.values.numpy(), np.where(active, expected_values, 0.0)), width
