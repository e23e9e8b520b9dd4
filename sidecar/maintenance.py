"""The sidecar's periodic maintenance: sealing and evicting the token index, finalising requests whose finish
deadline or timeout passed, keeping open requests within their budget, building the request-level index,
evidence retention, and the SAEs' drift states.

It runs on its own thread (server.py), one tick at a time, over a SidecarCore: each step takes the core's lock
only for as long as it changes shared state.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .streams import shown

if TYPE_CHECKING:
    from .core import SidecarCore

log = logging.getLogger(__name__)

PRUNE_EVERY_NS = 60 * 10**9  # evidence retention runs once a minute


class Maintenance:
    """The steps of one maintenance tick over a core. Each step is independent: one that fails is logged and
    counted, and the others still run, so a bad request or a full disk cannot wedge finalisation."""

    def __init__(self, core: SidecarCore) -> None:
        self.core = core
        self._last_prune_ns = 0

    def tick(self) -> None:
        core = self.core
        now = core.clock()
        for name, step in (
            ("seal", lambda: core.index.seal_due(now, core.maintenance_worker.seal)),
            ("evict", lambda: core.index.evict(now)),
            ("finish deadlines", lambda: self.finalize_overdue(now)),
            ("open-request limits", self.enforce_open_budget),
            ("forget requests", lambda: self.forget_old_requests(now)),
            ("request index", lambda: self.maintain_request_index(now)),
            ("evidence retention", lambda: self.prune_evidence(now)),
            ("drift", core.check_drift),
        ):
            try:
                step()
            except Exception:
                core.counters[f"maintenance_errors_{name.replace(' ', '_')}"] += 1
                log.exception("maintenance step %r failed; the others go on", name)

    def finalize_overdue(self, now: int) -> None:
        """Finished requests whose announced codes did not all arrive within finish_grace_ms, and requests
        with no traffic for request_timeout_s, are finalised incomplete."""
        core = self.core
        timeout_ns = int(core.config.request_timeout_s * 1e9)
        with core.lock:
            open_states = core.open_states()
            for state in [s for s in open_states if s.pending_finish is not None and now >= s.finish_deadline_ns]:
                log.warning(
                    "request %s: codes announced by its finish did not all arrive; finalised incomplete",
                    shown(state.request_id),
                )
                core.finalize(state, state.pending_finish)
            for state in [s for s in core.open_states() if now - s.last_activity_ns > timeout_ns]:
                log.warning(
                    "request %s saw no finish within %.0fs: finalised incomplete",
                    shown(state.request_id),
                    timeout_ns / 1e9,
                )
                core.finalize(state, None)

    def enforce_open_budget(self) -> None:
        """Open requests hold their codes in memory until final: past limits.open_requests_mb the least
        recently active are finalised early, down to 90% of the budget."""
        core = self.core
        budget = core.limits.open_requests_mb * 2**20
        with core.lock:
            open_states = core.open_states()
            held = sum(s.nbytes for s in open_states)
            if held <= budget:
                return
            count = 0
            for state in sorted(open_states, key=lambda s: s.last_activity_ns):
                if held <= 0.9 * budget:
                    break
                held -= state.nbytes
                count += 1
            core.end_least_active(count, "open_requests_mb")

    def forget_old_requests(self, now: int) -> None:
        core = self.core
        with core.lock:
            oldest = core.index.oldest_time
            horizon = now - core.index.window_ns if oldest is None else min(oldest, now - core.index.window_ns)
            core.requests.forget_before(horizon)

    def prune_evidence(self, now: int) -> None:
        core = self.core
        if now - self._last_prune_ns < PRUNE_EVERY_NS:
            return
        self._last_prune_ns = now
        deleted = core.store.prune(now - int(core.config.evidence_retention_s * 1e9), core.config.evidence_max_reports)
        if deleted:
            core.counters["reports_pruned"] += deleted
            log.info("evidence retention: %d old reports deleted", deleted)

    def maintain_request_index(self, now: int | None = None) -> None:
        """Reduce and seal finished requests into the request-level index (outside the lock), then evict."""
        core = self.core
        core.request_index.seal(core.lock, core.maintenance_worker.feature_sets, core.maintenance_worker.segment_words)
        with core.lock:
            early = core.request_index.evict(core.clock() if now is None else now)
            if early:
                core.counters["requests_evicted_for_budget"] += early
                log.warning(
                    "request index over index.request_index_budget_mb: %d requests left contrast queries before the "
                    "end of the window",
                    early,
                )
