"""Who hears about finished reports and circuit actions: WatchReports and WatchActions streams, and in-process
listeners such as the span exporter.

Fan-out never blocks finalisation: each watcher has a bounded queue, and a full queue drops (counted) rather
than wait; a listener that raises is logged and skipped.
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


@dataclass
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

    def watch_reports(self, flagged_only: bool) -> ReportWatcher:
        watcher = ReportWatcher(flagged_only)
        with self._lock:
            self._reports.append(watcher)
        return watcher

    def unwatch_reports(self, watcher: ReportWatcher) -> None:
        with self._lock:
            if watcher in self._reports:
                self._reports.remove(watcher)

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
            try:
                watcher.queue.put_nowait(report)
            except queue.Full:
                watcher.dropped += 1
                self._counters["watch_dropped"] += 1
        for listener in list(self.listeners):
            try:
                listener(report)
            except Exception:  # a listener (e.g. an exporter) must never break finalisation
                log.exception("report listener failed for %s", report.request_id)

    def action(self, notice: pb.ActionNotice) -> None:
        with self._lock:
            watchers = list(self._actions)
        for watcher in watchers:
            try:
                watcher.put_nowait(notice)
            except queue.Full:
                self._counters["actions_dropped"] += 1
