"""The start-up wiring check: do the first tokens a slot encodes read the way its calibration said they would?

An SAE on the wrong layer, the wrong hook point or another model still emits codes. Its first traffic shows it:
the reconstruction error is near or above 1, or the residual norm is an order of magnitude off (MISWIRED), or
the error is well above the calibration's (SUSPECT: mis-wired, or first traffic unlike the calibration text).
The verdict is logged loudly, sent to the sidecar (health, and every report of a mis-wired slot is low
fidelity) and never stops serving: the first traffic is the client's, and a client must not be able to take
the server down by sending odd text. For the same reason only an OK verdict is final: after a SUSPECT or
MISWIRED one, each following window of `tokens` tokens is judged again, so a client whose odd text came first
cannot brand a well-wired slot mis-wired for the life of the process, while a mis-wired SAE reads badly in
every window and stays MISWIRED.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from circuitwatch.kernels.baseline import FidelityBaseline
from circuitwatch.proto import circuitwatch_pb2 as pb

from .config import WiringCheckConfig

log = logging.getLogger(__name__)


@dataclass
class SlotWiringCheck:
    """Collects one slot's tokens in windows of `rule.tokens` until a window reads as calibrated; a verdict per
    window, logged when it changes."""

    slot: int
    describe: str  # "slot 0 (layer_2 on layer 3, resid_post)"
    baseline: FidelityBaseline | None
    rule: WiringCheckConfig
    errors: list[np.ndarray] = field(default_factory=list)
    norms: list[np.ndarray] = field(default_factory=list)
    seen: int = 0
    result: pb.WiringCheck | None = None

    def add(self, errors: np.ndarray, norms: np.ndarray) -> pb.WiringCheck | None:
        """Feed the valid rows of one step; returns a verdict when they complete a window."""
        if not len(errors) or (self.result is not None and self.result.verdict == pb.WIRING_VERDICT_OK):
            return None
        self.errors.append(errors)
        self.norms.append(norms)
        self.seen += len(errors)
        if self.seen < self.rule.tokens:
            return None
        previous = self.result
        self.result = self._verdict(np.concatenate(self.errors), np.concatenate(self.norms))
        self.errors, self.norms, self.seen = [], [], 0
        if previous is None or previous.verdict != self.result.verdict:
            _log(self.result, self.describe)
        return self.result

    def _verdict(self, errors: np.ndarray, norms: np.ndarray) -> pb.WiringCheck:
        error, norm = float(np.median(errors)), float(np.median(norms))
        rule, baseline = self.rule, self.baseline
        measured = f"median reconstruction error {error:.3f} and input norm {norm:.3g} over {len(errors)} tokens"
        verdict, cause = pb.WIRING_VERDICT_OK, "as calibrated" if baseline else "no baseline to compare the norm with"
        if baseline is not None:
            expected = f"calibration: error {baseline.error.p50:.3f}, norm {baseline.norm.p50:.3g}"
            ratio = norm / baseline.norm.p50 if baseline.norm.p50 > 0 else float("inf")
            if not 1 / rule.norm_factor < ratio < rule.norm_factor:
                verdict = pb.WIRING_VERDICT_MISWIRED
                cause = f"the norm is {ratio:.3g}x the calibration's: another layer, hook point or model ({expected})"
            elif error >= rule.error_ratio * baseline.error.p50:
                verdict = pb.WIRING_VERDICT_SUSPECT
                cause = (
                    f"{error / baseline.error.p50:.2f}x the calibration's error: the wrong layer or hook point, or "
                    f"first traffic unlike the calibration text ({expected})"
                )
            else:
                cause = f"as calibrated ({expected})"
        if error >= rule.max_error:
            explained = (
                "the codes explain almost nothing of the residual: the SAE was trained on another layer, hook point "
                "or model"
            )
            cause = f"{cause}; {explained}" if verdict == pb.WIRING_VERDICT_MISWIRED else explained
            verdict = pb.WIRING_VERDICT_MISWIRED
        return pb.WiringCheck(
            slot=self.slot,
            verdict=verdict,
            detail=f"{self.describe}: {measured}: {cause}",
            tokens=len(errors),
            error_median=error,
            norm_median=norm,
        )


def _log(check: pb.WiringCheck, describe: str) -> None:
    if check.verdict == pb.WIRING_VERDICT_MISWIRED:
        log.error("circuitwatch: MIS-WIRED SAE: %s. Every report of this slot is marked low fidelity.", check.detail)
    elif check.verdict == pb.WIRING_VERDICT_SUSPECT:
        log.warning("circuitwatch: suspect SAE wiring: %s", check.detail)
    else:
        log.info("circuitwatch: wiring check passed: %s", check.detail)
