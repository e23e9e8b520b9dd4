"""The start-up wiring check's rule (plugin/wiring.py) on measured windows: each verdict and its named cause, no
baseline, and windows judged again until one reads as calibrated, so odd first traffic cannot brand a slot
mis-wired for good. The
engine-level check (real vLLM, real SAEs, a model they were not made for) is in test_fidelity.py."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from circuitwatch.kernels.baseline import measure
from circuitwatch.plugin.config import WiringCheckConfig
from circuitwatch.plugin.wiring import SlotWiringCheck
from circuitwatch.proto import circuitwatch_pb2 as pb

RULE = WiringCheckConfig(tokens=100)


def calibration(error: float = 0.2, norm: float = 10.0):
    rng = np.random.default_rng(0)
    identity = dict.fromkeys(("sae_name", "weights_hash", "decoder_hash", "model", "model_fingerprint"), "")
    identity |= {"layer": 1, "hook_point": "resid_post", "selection": "", "text": "", "documents": 1}
    errors = error * (0.9 + 0.2 * rng.random(1000))
    return measure(errors, np.full(1000, norm), np.full(1000, 4), rng.integers(0, 8, 4000), 8, **identity)


def window(check: SlotWiringCheck, error: float, norm: float, steps: int = 4) -> pb.WiringCheck | None:
    """RULE.tokens rows in `steps` steps; the verdict the last step returns."""
    verdict = None
    for _ in range(steps):
        rows = RULE.tokens // steps
        verdict = check.add(np.full(rows, error, np.float32), np.full(rows, norm, np.float32))
    return verdict


@pytest.mark.parametrize(
    ("error", "norm", "verdict", "cause"),
    [
        (0.21, 10.5, pb.WIRING_VERDICT_OK, "as calibrated"),
        (0.3, 10.0, pb.WIRING_VERDICT_SUSPECT, "1.49x the calibration's error"),
        (0.25, 0.5, pb.WIRING_VERDICT_MISWIRED, "the norm is 0.05x the calibration's"),
        (0.2, 150.0, pb.WIRING_VERDICT_MISWIRED, "the norm is 15x the calibration's"),
        (0.95, 10.0, pb.WIRING_VERDICT_MISWIRED, "explain almost nothing"),
    ],
    ids=["as-calibrated", "error-up", "norm-20x-down", "norm-15x-up", "error-near-1"],
)
def test_verdicts_name_their_cause(error: float, norm: float, verdict: int, cause: str) -> None:
    check = SlotWiringCheck(2, "slot 2 (layer_1 on layer 1, resid_post)", calibration(), RULE)
    assert window(check, error, norm, steps=1 if error > 0.9 else 4) is not None
    result = check.result
    assert result.verdict == verdict and result.slot == 2 and result.tokens == RULE.tokens
    assert result.detail.startswith("slot 2 (layer_1 on layer 1, resid_post): median reconstruction error")
    assert cause in result.detail, result.detail


def test_without_a_baseline_only_the_error_ceiling_judges() -> None:
    check = SlotWiringCheck(0, "slot 0", None, RULE)
    assert window(check, 1.2, 1e4).verdict == pb.WIRING_VERDICT_MISWIRED
    assert window(check, 0.6, 1e4).verdict == pb.WIRING_VERDICT_OK  # no norm to compare with
    assert "no baseline" in check.result.detail


def test_windows_are_judged_until_one_reads_as_calibrated_and_changes_are_logged(caplog) -> None:
    check = SlotWiringCheck(0, "slot 0", calibration(), RULE)
    with caplog.at_level(logging.INFO, logger="circuitwatch.plugin.wiring"):
        assert window(check, 3.0, 10.0, steps=1).verdict == pb.WIRING_VERDICT_MISWIRED  # byte soup came first
        assert check.add(np.zeros(0, np.float32), np.zeros(0, np.float32)) is None  # a step with no readable rows
        assert check.add(np.full(10, 0.2, np.float32), np.full(10, 10.0, np.float32)) is None  # mid-window
        assert window(check, 3.0, 10.0, steps=1).verdict == pb.WIRING_VERDICT_MISWIRED  # not logged again
        assert window(check, 0.2, 10.0).verdict == pb.WIRING_VERDICT_OK  # then ordinary traffic: final
        assert window(check, 3.0, 10.0, steps=1) is None
    assert [r.levelname for r in caplog.records] == ["ERROR", "INFO"]
    assert "MIS-WIRED" in caplog.records[0].getMessage()
    assert check.result.verdict == pb.WIRING_VERDICT_OK
