"""Drift: does the traffic an SAE reads still look like its calibration text?

Per SAE (registry gslot) the sidecar keeps exponentially decayed sums over the codes it ingests (half-life
`drift.half_life_tokens` tokens): each feature's firings, tokens, L0, reconstruction error and input norm. It
compares them with the SAE's baseline, which the producer sends in its manifest (`circuitwatch calibrate`):

- js: Jensen-Shannon divergence, in bits (0..1), between how firings spread over features now and on the
  calibration text;
- error_ratio: mean reconstruction error now / on the calibration text;
- norm_ratio: mean input norm now / on the calibration text;
- dead_fraction: of the features that fired on at least 0.1% of calibration tokens, the share now firing at
  under a tenth of that rate; dense_fraction: the share of features now firing on more than 10% of tokens.

Alarm rule: with at least `drift.min_tokens` effective tokens, DRIFT when js >= js_threshold, or error_ratio >=
error_ratio_threshold, or norm_ratio is outside [1/norm_ratio_threshold, norm_ratio_threshold]. It clears
when every one is back within `clear_fraction` of its threshold, so a borderline window does not flap.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from circuitwatch.proto import circuitwatch_pb2 as pb

from .config import DriftConfig

log = logging.getLogger(__name__)

ALIVE_FREQUENCY = 1e-3  # a feature firing on at least 0.1% of calibration tokens counts as alive there
DEAD_RATIO = 0.1  # ...and as dead now below a tenth of that rate
DENSE_FREQUENCY = 0.1  # a feature firing on more than 10% of tokens is dense
RESCALE_BELOW = 2.0**-64  # raw firing counts stay far inside float64's range (1/scale <= 2^64 a count)


@dataclass
class SlotDrift:
    """Decayed sums for one SAE, and its alarm state."""

    d_sae: int
    baseline: pb.FidelityBaseline | None
    # each feature's decayed firings are _raw * _scale: decaying all d_sae counts on every code batch cost
    # O(d_sae) a message (a one-row decode step touched 4 x d_sae floats per SAE), so the decay goes into the
    # scale, and the raw counts are rescaled only when it gets small
    _raw: np.ndarray = field(init=False, repr=False)
    _scale: float = field(init=False, default=1.0)
    tokens: float = 0.0
    l0_sum: float = 0.0
    error_sum: float = 0.0
    error_tokens: float = 0.0
    norm_sum: float = 0.0
    state: int = pb.SLOT_STATE_WARMING_UP
    since_ns: int = 0
    reasons: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    _reference: np.ndarray | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self._raw = np.zeros(self.d_sae, np.float64)
        if self.baseline is not None and len(self.baseline.firing_frequencies) == 4 * self.d_sae:
            self._reference = np.frombuffer(self.baseline.firing_frequencies, "<f4").astype(np.float64)

    def observe(
        self, features: np.ndarray, rows: int, errors: np.ndarray | None, norms: np.ndarray | None, half_life: float
    ) -> None:
        """Fold in `rows` tokens and their codes (errors and norms: finite values of the rows that have them)."""
        decay = 0.5 ** (rows / half_life)
        self._scale *= decay
        if self._scale < RESCALE_BELOW:
            self._raw *= self._scale
            self._scale = 1.0
        if len(features) and int(features.max()) >= self.d_sae:
            features = features[features < self.d_sae]
        if 4 * len(features) >= self.d_sae:  # a whole engine step's codes: counting by id beats add.at 3x
            self._raw += np.bincount(features, minlength=self.d_sae) * (1.0 / self._scale)
        else:
            np.add.at(self._raw, features, 1.0 / self._scale)
        self.tokens = self.tokens * decay + rows
        self.l0_sum = self.l0_sum * decay + len(features)
        self.error_sum *= decay
        self.error_tokens *= decay
        self.norm_sum *= decay
        if errors is not None and len(errors):
            self.error_sum += float(errors.sum())
            self.error_tokens += len(errors)
            self.norm_sum += float(norms.sum())

    @property
    def firings(self) -> np.ndarray:
        """Each feature's decayed number of firings."""
        return self._raw * self._scale

    @firings.setter
    def firings(self, counts: np.ndarray) -> None:
        self._raw, self._scale = np.array(counts, np.float64), 1.0

    def evaluate(self, settings: DriftConfig) -> tuple[int, list[str]]:
        """(state, reasons) from the sums now; also refreshes `metrics`."""
        firings = self.firings
        frequencies = firings / self.tokens if self.tokens else np.zeros(self.d_sae)
        metrics = {
            "tokens": self.tokens,
            "l0_mean": self.l0_sum / self.tokens if self.tokens else 0.0,
            "dense_fraction": float((frequencies > DENSE_FREQUENCY).mean()) if self.d_sae else 0.0,
        }
        if self.error_tokens:
            metrics["error_mean"] = self.error_sum / self.error_tokens
            metrics["norm_mean"] = self.norm_sum / self.error_tokens
        baseline = self.baseline
        if baseline is None or self._reference is None:
            self.metrics = metrics
            return pb.SLOT_STATE_NO_BASELINE, ["no calibration baseline: run `circuitwatch calibrate` for this SAE"]
        alive = self._reference >= ALIVE_FREQUENCY
        metrics["js"] = js_divergence(firings, self._reference)
        metrics["dead_fraction"] = (
            float((frequencies[alive] < DEAD_RATIO * self._reference[alive]).mean()) if alive.any() else 0.0
        )
        if "error_mean" in metrics and baseline.error_mean > 0:
            metrics["error_ratio"] = metrics["error_mean"] / baseline.error_mean
        if "norm_mean" in metrics and baseline.norm_mean > 0:
            metrics["norm_ratio"] = metrics["norm_mean"] / baseline.norm_mean
        self.metrics = metrics
        if self.tokens < settings.min_tokens:
            return pb.SLOT_STATE_WARMING_UP, [f"{self.tokens:.0f} of {settings.min_tokens:.0f} tokens seen"]
        scale = settings.clear_fraction if self.state == pb.SLOT_STATE_DRIFT else 1.0
        reasons = []
        if metrics["js"] >= scale * settings.js_threshold:
            reasons.append(f"firing distribution: JS divergence {metrics['js']:.3f} bits >= {settings.js_threshold}")
        ratio = metrics.get("error_ratio")
        if ratio is not None and ratio >= scale * settings.error_ratio_threshold:
            reasons.append(f"reconstruction error {ratio:.2f}x calibration >= {settings.error_ratio_threshold}x")
        ratio = metrics.get("norm_ratio")
        limit = settings.norm_ratio_threshold * scale
        if ratio is not None and not 1 / limit < ratio < limit:
            reasons.append(f"input norm {ratio:.2f}x calibration, outside 1/{limit:g}..{limit:g}")
        return (pb.SLOT_STATE_DRIFT if reasons else pb.SLOT_STATE_OK), reasons


def js_divergence(counts: np.ndarray, reference: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits between two non-negative vectors, each normalised to sum 1."""
    p_total, q_total = float(counts.sum()), float(reference.sum())
    if p_total <= 0 or q_total <= 0:
        return 0.0
    p, q = counts / p_total, reference / q_total
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        on = a > 0
        return float((a[on] * np.log2(a[on] / m[on])).sum())

    return max(0.0, 0.5 * kl(p) + 0.5 * kl(q))


class DriftMonitor:
    """Every SAE's drift state; `observe` runs on ingest (under the core's lock), `check` on maintenance."""

    def __init__(self, settings: DriftConfig, clock: Callable[[], int]) -> None:
        self.settings = settings
        self.clock = clock
        self.slots: dict[int, SlotDrift] = {}
        self.listeners: list[Callable[[int, SlotDrift, int], None]] = []  # (gslot, drift, previous state)

    def register(self, gslot: int, d_sae: int, baseline: pb.FidelityBaseline | None) -> None:
        """A producer's manifest named this SAE; a baseline arriving later (a calibrated producer) replaces none."""
        current = self.slots.get(gslot)
        if current is None or (current.baseline is None and baseline is not None):
            drift = SlotDrift(d_sae, baseline)
            drift.since_ns = self.clock()
            if current is not None:
                drift.firings, drift.tokens, drift.l0_sum = current.firings, current.tokens, current.l0_sum
                drift.error_sum, drift.error_tokens, drift.norm_sum = (
                    current.error_sum,
                    current.error_tokens,
                    current.norm_sum,
                )
            self.slots[gslot] = drift

    def observe(self, gslot: int, features: np.ndarray, rows: int, errors, norms) -> None:
        drift = self.slots.get(gslot)
        if drift is not None and rows:
            drift.observe(features, rows, errors, norms, self.settings.half_life_tokens)

    def check(self) -> None:
        """Re-evaluate every SAE; a change of state is logged and told to the listeners (metrics, OTel)."""
        for gslot, drift in list(self.slots.items()):
            state, reasons = drift.evaluate(self.settings)
            drift.reasons = reasons
            if state == drift.state:
                continue
            previous, drift.state, drift.since_ns = drift.state, state, self.clock()
            name = pb.SlotState.Name(state).removeprefix("SLOT_STATE_")
            if state == pb.SLOT_STATE_DRIFT:
                log.warning("drift alarm for SAE %d: %s", gslot, "; ".join(reasons))
            else:
                log.info("SAE %d is now %s", gslot, name)
            for listener in self.listeners:
                try:
                    listener(gslot, drift, previous)
                except Exception:
                    log.exception("a drift listener failed")
