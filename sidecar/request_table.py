"""The request table: every request with codes in the index window, numbered for its token keys.

A request's sequence number ("seq") is the high half of its token keys (keys.py). The table maps seq and id
both ways and keeps what queries and contrasts need once the request's open state is gone (labels, trace,
arrival, status, its number in the request-level index). Requests whose codes have all left the window are
forgotten.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import grpc

from circuitwatch.proto import circuitwatch_pb2 as pb

from .config import LimitsConfig
from .errors import MonitorError
from .index import TimeWindow

CLIENT_LABEL_PREFIX = "client:"  # labels the API client sent with its request (plugin admission namespaces them)


@dataclass
class RequestRecord:
    """A request with codes in the index window."""

    request_id: str
    seq: int
    last_seen_ns: int
    model: str = ""
    labels: tuple[str, ...] = ()
    trace: pb.TraceContext | None = None
    arrival_ns: int = 0
    num_positions: int = 0
    status: int = pb.REPORT_STATUS_PENDING
    ridx: int | None = None  # its number in the request-level index, once final

    def finalized(self, report: pb.Report) -> None:
        """Keep what outlives the request's open state."""
        self.model, self.labels, self.trace = report.model, tuple(report.labels), report.trace
        self.arrival_ns, self.num_positions = report.arrival_unix_nanos, report.coverage.positions_total
        self.status = report.status


class RequestTable:
    """seq <-> request records. Written under the core's lock; `by_seq` may be read without it (queries)."""

    def __init__(self) -> None:
        self.by_seq: dict[int, RequestRecord] = {}
        self._seq_by_id: dict[str, int] = {}
        self._next_seq = 1

    def new_seq(self) -> int:
        """A fresh sequence number for a request seen for the first time."""
        seq = self._next_seq
        self._next_seq += 1
        return seq

    def codes_arrived(self, request_id: str, seq: int, now: int, model: str, arrival_ns: int) -> RequestRecord:
        """The record of a request whose codes just went into the index (created on its first codes)."""
        record = self.by_seq.get(seq)
        if record is None:
            self._seq_by_id[request_id] = seq
            record = self.by_seq[seq] = RequestRecord(request_id, seq, now, model, arrival_ns=arrival_ns)
        else:
            record.last_seen_ns = now
        return record

    def get(self, request_id: str) -> RequestRecord | None:
        """The record of a request with codes in the window (None: unknown, or its codes were evicted)."""
        seq = self._seq_by_id.get(request_id)
        return None if seq is None else self.by_seq.get(seq)

    def seq_of(self, request_id: str) -> int | None:
        return self._seq_by_id.get(request_id)

    def forget_before(self, horizon_ns: int) -> int:
        """Drop requests last seen before the horizon (their codes have left the index); returns how many."""
        old = [seq for seq, record in self.by_seq.items() if record.last_seen_ns < horizon_ns]
        for seq in old:
            self._seq_by_id.pop(self.by_seq.pop(seq).request_id, None)
        return len(old)

    def count_in(self, window: TimeWindow) -> int:
        """Requests that arrived before the window ended and were still seen after it began."""
        records = list(self.by_seq.values())
        return sum(1 for r in records if r.arrival_ns <= window.end and r.last_seen_ns >= window.start)

    def __len__(self) -> int:
        return len(self.by_seq)


def relabel(labels: Iterable[str], add: Iterable[str], remove: Iterable[str]) -> list[str]:
    """Labels after a change: removed ones go, added ones are appended once, order otherwise kept."""
    removed = set(remove)
    kept = [label for label in labels if label not in removed]
    return kept + [label for label in add if label not in kept]


def current_labels(report: pb.Report, changes: list[tuple[int, str, str, str, str]]) -> list[str]:
    """A final report's labels after the changes made since it was final (changes: the store's feedback
    rows, oldest first; earlier ones are already in the report)."""
    labels = list(report.labels)
    for unix_nanos, operation, label, _author, _note in changes:
        if unix_nanos > report.finalized_unix_nanos:
            labels = relabel(labels, [label] if operation == "add" else [], [label] if operation == "remove" else [])
    return labels


def check_label_request(request: pb.LabelRequest, limits: LimitsConfig) -> None:
    """A Label call names requests and at least one change, each label non-empty, printable and bounded,
    nothing both added and removed, and stays within the call bounds."""
    if not request.request_ids:
        raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, "request_ids: at least one request id is required")
    if len(request.request_ids) > limits.max_label_ids:
        raise MonitorError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"request_ids: {len(request.request_ids)}, more than limits.max_label_ids ({limits.max_label_ids})",
        )
    if not request.add and not request.remove:
        raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, "add / remove: give at least one label")
    if len(request.add) + len(request.remove) > limits.max_labels_per_call:
        raise MonitorError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"add / remove: more than limits.max_labels_per_call ({limits.max_labels_per_call}) labels",
        )
    for field_name in ("add", "remove"):
        for i, label in enumerate(getattr(request, field_name)):
            if not label.strip():
                raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, f"{field_name}[{i}]: empty label")
            if len(label) > limits.max_label_chars or not label.isprintable():
                raise MonitorError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{field_name}[{i}]: a label is printable text of at most limits.max_label_chars "
                    f"({limits.max_label_chars}) characters",
                )
            if label.startswith(CLIENT_LABEL_PREFIX):
                raise MonitorError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{field_name}[{i}]: {label[:64]!r}: labels starting with {CLIENT_LABEL_PREFIX!r} are the API "
                    "client's own (set at admission); a reviewer's label never uses that namespace",
                )
    for field_name, limit in (("author", 256), ("note", limits.max_note_chars)):
        if len(getattr(request, field_name)) > limit:
            raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, f"{field_name}: more than {limit} characters")
    clash = set(request.add) & set(request.remove)
    if clash:
        raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, f"labels {sorted(clash)} are both added and removed")
