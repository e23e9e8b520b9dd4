"""Per-request fidelity: how well each SAE slot read the request's tokens, and whether the report is
`low_fidelity` (never clean: the SAE did not read this request well, so the absence of flags means nothing).

Each slot's per-token threshold comes from the producer's calibration baseline, an operator override in the
sidecar config, or the uncalibrated default, in that order of precedence (override first). A slot whose
producer's start-up wiring check found it mis-wired is low fidelity in every report.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from circuitwatch.proto import circuitwatch_pb2 as pb

from .config import FidelityConfig
from .registry import SaeIdentity


@dataclass(frozen=True)
class SlotThreshold:
    value: float
    source: str  # shown in the report's note


class FidelityPolicy:
    """Thresholds and mis-wiring per SAE (gslot), set as producers connect; reads are lock-free snapshots."""

    def __init__(self, config: FidelityConfig) -> None:
        self.config = config
        self.thresholds: dict[int, SlotThreshold] = {}
        self.miswired: dict[int, dict[str, str]] = {}  # gslot -> {producer: its wiring check's detail}

    def set_baseline(self, gslot: int, identity: SaeIdentity, baseline: pb.FidelityBaseline | None) -> None:
        for selector, value in self.config.error_thresholds.items():
            if identity.matches(selector):
                self.thresholds[gslot] = SlotThreshold(value, f"threshold {value:g} from fidelity.error_thresholds")
                return
        if baseline is not None:
            self.thresholds[gslot] = SlotThreshold(
                baseline.error_threshold, f"threshold {baseline.error_threshold:.3g} from calibration"
            )
        elif gslot not in self.thresholds:
            value = self.config.uncalibrated_error_threshold
            self.thresholds[gslot] = SlotThreshold(value, f"uncalibrated: default threshold {value:g}")

    def wiring(self, gslot: int, producer: str, check: pb.WiringCheck) -> None:
        """A producer's latest verdict; the SAE is mis-wired while any producer's latest says so."""
        by_producer = self.miswired.setdefault(gslot, {})
        if check.verdict == pb.WIRING_VERDICT_MISWIRED:
            by_producer[producer] = check.detail
        else:
            by_producer.pop(producer, None)

    def forget_producer(self, gslot: int, producer: str) -> None:
        self.miswired.get(gslot, {}).pop(producer, None)

    def summarize(self, slot: int, gslot: int, errors: np.ndarray, norms: np.ndarray) -> pb.SlotFidelity:
        """One slot's fidelity over the request's measured tokens (errors and norms of the latest rows)."""
        threshold = self.thresholds.get(gslot) or SlotThreshold(
            self.config.uncalibrated_error_threshold, "uncalibrated: default threshold"
        )
        fidelity = pb.SlotFidelity(slot=slot, tokens=len(errors), error_threshold=threshold.value)
        if len(errors):
            above = float((errors > threshold.value).mean())
            fidelity.error_mean = float(errors.mean())
            fidelity.error_max = float(errors.max())
            fidelity.fraction_above_threshold = above
            finite = norms[np.isfinite(norms)]
            fidelity.norm_mean = float(finite.mean()) if len(finite) else 0.0
            fidelity.low_fidelity = above > self.config.low_fidelity_fraction
        fidelity.note = threshold.source
        if fidelity.low_fidelity:
            fidelity.note = (
                f"{fidelity.fraction_above_threshold:.0%} of tokens above the error threshold "
                f"(more than {self.config.low_fidelity_fraction:.0%}): {threshold.source}"
            )
        miswired = next(iter(self.miswired.get(gslot, {}).values()), None)
        if miswired is not None:
            fidelity.low_fidelity = True
            fidelity.note = f"mis-wired per the producer's start-up check: {miswired}"[:1000]
        return fidelity
