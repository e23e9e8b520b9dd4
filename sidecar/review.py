"""The reviewer's calls over a SidecarCore: Contrast (which features separate these requests from those) and
Label (labels attached after the fact, audited).

Both name requests by key or by response id; an id that names several requests is listed unresolved, never
guessed. The contrast itself is identify.py; here is what it needs from the live sidecar.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import grpc
import numpy as np

from circuitwatch.proto import circuitwatch_pb2 as pb

from .errors import MonitorError, check_enum
from .identify import Resolved, contrast
from .request_table import check_label_request, current_labels, relabel
from .streams import request_id_ok, shown

if TYPE_CHECKING:
    from .core import SidecarCore


def check_contrast_strings(request: pb.ContrastRequest, limits) -> None:
    """Every id, model and instance name a contrast carries is bounded (INVALID_ARGUMENT names the field)."""
    for name, selector in (("positives", request.positives), ("negatives", request.negatives)):
        for i, request_id in enumerate(selector.request_ids):
            request_id_ok(request_id, f"{name}.request_ids[{i}]", limits)
    for field in ("models", "instances"):
        for i, value in enumerate(getattr(request, field)):
            if len(value.encode()) > limits.max_request_id_bytes:
                raise MonitorError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{field}[{i}]: {shown(value)} is longer than limits.max_request_id_bytes "
                    f"({limits.max_request_id_bytes})",
                )


class Review:
    """Contrast and Label over a core's request-level index, request table and evidence store."""

    def __init__(self, core: SidecarCore) -> None:
        self.core = core

    def contrast(self, request: pb.ContrastRequest) -> pb.ContrastResponse:
        core = self.core
        started = time.perf_counter()
        check_enum(request.scope, pb.Scope, "scope")
        check_enum(request.mode, pb.CodeMode, "mode")
        check_contrast_strings(request, core.limits)
        request = self._with_keys(request)
        scope = request.scope or pb.SCOPE_BOTH
        selectors = {"positives": request.positives, "negatives": request.negatives}
        if request.HasField("truth"):
            selectors["truth.requests"] = request.truth.requests
        matching_seqs = {
            name: core.queries.expression_seqs(name, selector.expression, scope, request.window)
            for name, selector in selectors.items()
            if selector.HasField("expression")
        }
        core.request_index.reduce(core.lock)  # requests final before this query are all counted
        with core.lock:
            view = core.request_index.view()
            why_not = {
                rid: self._not_indexed_reason(rid)
                for selector in selectors.values()
                for rid in selector.request_ids
                if rid not in view.ridx_by_id
            }
            expressions = {name: self._request_index_numbers(seqs) for name, seqs in matching_seqs.items()}
            loaded = frozenset(core.circuits.names)
        resolved = Resolved(why_not, expressions, loaded, core.config.fleet.instance_name)
        response = contrast(request, view, core.registry, resolved, core.clock())
        response.elapsed_ms = (time.perf_counter() - started) * 1e3
        core.counters["contrasts"] += 1
        return response

    def _with_keys(self, request: pb.ContrastRequest) -> pb.ContrastRequest:
        """The contrast with every selector id that is the response id of exactly one request replaced by that
        request's key (ids naming several stay, and are reported unresolved)."""
        selectors = [request.positives, request.negatives, request.truth.requests]
        if not any(s.request_ids for s in selectors):
            return request
        copy = pb.ContrastRequest()
        copy.CopyFrom(request)
        for selector in (copy.positives, copy.negatives, copy.truth.requests):
            ids = list(selector.request_ids)
            if ids:
                resolved = [(keys[0] if len(keys := self.core.resolve(i)) == 1 else i) for i in ids]
                del selector.request_ids[:]
                selector.request_ids.extend(resolved)
        return copy

    def _request_index_numbers(self, seqs: np.ndarray) -> np.ndarray:
        """Sorted request-index numbers (ridx) of the requests with these sequence numbers, where indexed."""
        by_seq = self.core.requests.by_seq
        found = [r.ridx for s in seqs.tolist() if (r := by_seq.get(s)) and r.ridx is not None]
        return np.unique(np.array(found, np.int64))

    def _not_indexed_reason(self, request_id: str) -> str:
        """Why a request id named in a contrast is not in the request-level index."""
        core = self.core
        if core.is_open(request_id):
            return "not finished yet"
        record = core.requests.get(request_id)
        if record is not None:
            if record.ridx is not None:
                return "evicted from the request index (older than the window, or over index.request_index_budget_mb)"
            return "has no codes"
        if core.finals.get(request_id) is not None:
            return "its codes have left the index window"
        named = len(core.finals.resolve(request_id, is_open=False))
        if named > 1:
            return f"the response id of {named} requests: name one by its request id"
        return "unknown to this sidecar"

    def label(self, request: pb.LabelRequest) -> pb.LabelResponse:
        """Attach or remove labels after the fact; the change is audited in the evidence store, one
        transaction per call."""
        core = self.core
        check_label_request(request, core.limits)
        response = pb.LabelResponse()
        audit = []
        now = core.clock()
        resolved = {request_id: core.resolve(request_id) for request_id in dict.fromkeys(request.request_ids)}
        max_changes = core.limits.max_label_changes_per_request
        with core.lock:
            for asked, keys in resolved.items():
                if len(keys) > 1:
                    response.unresolved.add(
                        request_id=asked, reason=f"the response id of {len(keys)} requests: name one by its request id"
                    )
                    continue
                request_id = keys[0] if keys else asked
                state = core.open_state(request_id)
                record = core.requests.get(request_id)
                if state is None and record is None and core.finals.get(request_id) is None:
                    response.unresolved.add(request_id=request_id, reason="unknown to this sidecar")
                    continue
                changes = len(request.add) + len(request.remove)
                if core.store.feedback_count(request_id) + changes > max_changes:
                    response.unresolved.add(
                        request_id=request_id,
                        reason=f"more than limits.max_label_changes_per_request ({max_changes}) label changes",
                    )
                    continue
                if state is not None:  # its report, when final, carries the labels
                    state.labels = relabel(state.labels, request.add, request.remove)
                if record is not None:
                    record.labels = tuple(relabel(record.labels, request.add, request.remove))
                    if record.ridx is not None:
                        core.request_index.relabel(record.ridx, list(request.add), list(request.remove))
                for operation, labels in (("add", request.add), ("remove", request.remove)):
                    audit += [(request_id, now, operation, label, request.author, request.note) for label in labels]
                response.updated += 1
        core.store.add_feedback(audit)
        if core.fleet is not None and audit:
            self._export_labels(audit, now)
        return response

    def _export_labels(self, audit: list[tuple[str, int, str, str, str, str]], now: int) -> None:
        """The fleet store gets the audit trail and each final request's labels as they now are (an open
        request's report will carry them)."""
        core = self.core
        states = []
        for request_id in dict.fromkeys(row[0] for row in audit):
            report = None if core.is_open(request_id) else core.finals.get(request_id)
            if report is not None:
                labels = current_labels(report, core.store.feedback(request_id))
                states.append((request_id, report.arrival_unix_nanos, now, labels))
        core.fleet.labels_changed(audit, states)
