"""Final reports as readers see them: written durably before anyone sees them final, the recent ones kept in
memory, readers waiting on a request until its report is final, and the ids clients use resolved to keys.

A request's key (request_id) is unique; the response id the API client knows may be shared by several
requests (clients reuse X-Request-Id), so an id resolves to every request it names, never to a merge of them.
Called under the core's lock where noted; reads of the evidence store happen outside it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import grpc

from circuitwatch.proto import circuitwatch_pb2 as pb

from .errors import MonitorError
from .store import EvidenceStore

RECENT_REPORTS = 10_000


class FinalReports:
    def __init__(self, store: EvidenceStore) -> None:
        self.store = store
        self._recent: OrderedDict[str, pb.Report] = OrderedDict()
        self._waiters: dict[str, threading.Event] = {}
        self._open_by_response: dict[str, set[str]] = {}  # response id -> keys of requests still open

    # --- writes (under the core's lock) -----------------------------------------------------------------

    def opened(self, request_id: str, response_id: str) -> None:
        """A request with a response id started: it resolves by that id from now on."""
        if response_id:
            self._open_by_response.setdefault(response_id, set()).add(request_id)

    def add(self, report: pb.Report) -> threading.Event | None:
        """Durable first, then visible: readers waiting for it wake up (returns their event, if any)."""
        self.store.put(report)
        siblings = self._open_by_response.get(report.response_id)
        if siblings is not None:
            siblings.discard(report.request_id)
            if not siblings:
                del self._open_by_response[report.response_id]
        self._recent[report.request_id] = report
        while len(self._recent) > RECENT_REPORTS:
            self._recent.popitem(last=False)
        event = self._waiters.pop(report.request_id, None)
        if event is not None:
            event.set()
        return event

    # --- reads ----------------------------------------------------------------------------------------

    def get(self, request_id: str) -> pb.Report | None:
        """The final report of a key, as it was finalised (without later label changes)."""
        report = self._recent.get(request_id)
        return report if report is not None else self.store.get(request_id)

    def waiter(self, request_id: str) -> threading.Event:
        """An event set when the request's report becomes final (under the core's lock)."""
        return self._waiters.setdefault(request_id, threading.Event())

    def drop_waiter(self, request_id: str, event: threading.Event) -> None:
        if not event.is_set() and self._waiters.get(request_id) is event:
            del self._waiters[request_id]

    def resolve(self, request_id: str, is_open: bool) -> list[str]:
        """The requests an id names: itself when it is a key (`is_open`: an open request's), else every
        request whose response id it is."""
        if is_open or self.get(request_id) is not None:
            return [request_id]
        keys = set(self._open_by_response.get(request_id, ()))
        keys.update(self.store.keys_for_response(request_id))
        return sorted(keys)

    def with_feedback(self, report: pb.Report) -> pb.Report:
        """The report as read by clients: with the label changes made after it was final (the store answers
        from memory for the many requests that have none)."""
        changes = self.store.feedback(report.request_id)
        if not changes:
            return report
        answer = pb.Report()
        answer.CopyFrom(report)  # the cached report stays as it was finalised
        for unix_nanos, operation, label, author, note in changes:
            answer.feedback.add(unix_nanos=unix_nanos, operation=operation, label=label, author=author, note=note)
        return answer

    def list(self, request: pb.ListReportsRequest) -> list[pb.Report]:
        reports = self.store.list(
            request.window.start_unix_nanos,
            request.window.end_unix_nanos,
            list(request.request_ids),
            request.flagged_only,
            request.limit or 100,
            list(request.response_ids),
        )
        return [self.with_feedback(r) for r in reports]


def one_request(request_id: str, keys: list[str]) -> str:
    """The key an id names when it names at most one request (an unknown id is returned as it is)."""
    if len(keys) > 1:
        shown = ", ".join(repr(k) for k in keys[:5])
        raise MonitorError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"{request_id!r} is the response id of {len(keys)} requests ({shown}): ask for one of them by its "
            "request id, or list them all (ListReports response_ids)",
        )
    return keys[0] if keys else request_id
