"""Who hears about finished reports and circuit actions: WatchReports and WatchActions streams, and in-process
listeners such as the span exporter.

Fan-out never blocks finalisation: each watcher has a bounded queue, and a full queue drops (counted) rather
than wait; a listener that raises is logged and skipped.

Hand-off: the readers a report wakes (a WatchReports stream that was waiting, a GetReport waiting on that
request) need the interpreter to send it, and ingest would otherwise keep it for the rest of the engine step.
So ingest, between a step's finished requests and its other slices, waits (at most HANDOFF_S, outside the core's
lock) until those readers have sent their answers. Only readers that were waiting are awaited: a stream with a
backlog is not, so a client that reads slowly costs ingest at most HANDOFF_S per step that finalises a report.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from circuitwatch.proto import circuitwatch_pb2 as pb

log = logging.getLogger(__name__)

WATCH_QUEUE = 1_000
HANDOFF_S = 0.002  # the longest a step's other slices wait for the readers of its finished requests


@dataclass(eq=False)  # compared and hashed by identity: the hand-off keeps the woken ones in a set
class ReportWatcher:
    """One WatchReports stream."""

    flagged_only: bool
    queue: queue.Queue = field(default_factory=lambda: queue.Queue(WATCH_QUEUE))
    dropped: int = 0


class Watchers:
    def __init__(self, counters: Counter[str]) -> None:
        self._counters = counters
        self._lock = threading.Lock()
        self._reports: list[ReportWatcher] = []
        self._actions: list[queue.Queue] = []
        self.listeners: list[Callable[[pb.Report], None]] = []  # e.g. the span exporter
        self.handoff_s = HANDOFF_S
        self._handoff = threading.Condition()
        self._awaited: set[object] = set()  # readers woken by a report, whose answer is not sent yet

    def watch_reports(self, flagged_only: bool) -> ReportWatcher:
        watcher = ReportWatcher(flagged_only)
        with self._lock:
            self._reports.append(watcher)
        return watcher

    def unwatch_reports(self, watcher: ReportWatcher) -> None:
        with self._lock:
            if watcher in self._reports:
                self._reports.remove(watcher)
        self.answered(watcher)

    def watch_actions(self) -> queue.Queue:
        watcher: queue.Queue = queue.Queue(WATCH_QUEUE)
        with self._lock:
            self._actions.append(watcher)
        return watcher

    def unwatch_actions(self, watcher: queue.Queue) -> None:
        with self._lock:
            if watcher in self._actions:
                self._actions.remove(watcher)

    @property
    def anyone_acts(self) -> bool:
        """Whether any WatchActions stream is open (actions are evaluated only then)."""
        return bool(self._actions)

    def report_final(self, report: pb.Report) -> None:
        with self._lock:
            watchers = list(self._reports)
        for watcher in watchers:
            if watcher.flagged_only and not report.flags:
                continue
            waiting = watcher.queue.empty()
            try:
                watcher.queue.put_nowait(report)
                if waiting:
                    self.woken(watcher)
            except queue.Full:
                watcher.dropped += 1
                self._counters["watch_dropped"] += 1
        for listener in list(self.listeners):
            try:
                listener(report)
            except Exception:  # a listener (e.g. an exporter) must never break finalisation
                log.exception("report listener failed for %s", report.request_id)

    # --- hand-off ------------------------------------------------------------------------------------

    def woken(self, reader: object) -> None:
        """A reader (a watcher, a GetReport's event) was woken by a report just made final."""
        with self._handoff:
            self._awaited.add(reader)

    def answered(self, reader: object) -> None:
        """The reader sent its answer (or left)."""
        with self._handoff:
            self._awaited.discard(reader)
            if not self._awaited:
                self._handoff.notify_all()

    def hand_off(self) -> None:
        """Wait (without the core's lock) until the readers woken so far have answered, at most `handoff_s`;
        those that have not by then are no longer awaited (counted: handoff_timeouts)."""
        with self._handoff:
            if self._awaited and not self._handoff.wait_for(lambda: not self._awaited, self.handoff_s):
                self._counters["handoff_timeouts"] += 1
            self._awaited.clear()

    def action(self, notice: pb.ActionNotice) -> None:
        with self._lock:
            watchers = list(self._actions)
        for watcher in watchers:
            try:
                watcher.put_nowait(notice)
            except queue.Full:
                self._counters["actions_dropped"] += 1
