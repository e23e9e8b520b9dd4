"""The sidecar's fleet exporter: finished requests leave for the fleet store on a thread of their own.

    core (finalise / reduce / Label) --put--> bounded queue --flush--> queued file --> table files --insert--> store
                                                              (this thread)      (delivery.py)

The hooks only append to a bounded queue (dropping and counting the oldest when it is full), so nothing on the
ingest path waits for serialisation, disk or network. Every flush interval (or batch_rows requests) the thread
writes the queue to the spool as it is (queued.py: little more than concatenations); the delivery (delivery.py:
this thread for a server, a process of its own for the embedded store) turns each queued batch into one file per
table (rows.py) and inserts them oldest first, each with its own deduplication token; a file leaves the spool
only once the store took it. A store that fails is retried with back-off while batches keep accumulating in the
(bounded) spool; when it answers again the spool replays in order and nothing is counted twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from pathlib import Path

from circuitwatch.proto import circuitwatch_pb2 as pb

from ..config import FleetConfig
from ..registry import SaeRegistry
from ..request_sets import FeatureSet, SlotCodes
from .connection import FleetStore
from .delivery import ChildDelivery, SpoolDelivery, spool_dir_of
from .queued import stage_queued
from .rows import TABLES, load_arrow
from .spool import Spool, count_dropped, file_stat

log = logging.getLogger(__name__)

DROP_REASONS = ("queue_full", "spool_full", "unreadable")
QUEUED_TABLE = {"report": "reports", "reduced": "reports", "labels": "label_feedback"}


def check_installed(config: FleetConfig) -> None:
    """Fail at start, naming the extra, when the fleet store's client library is missing."""
    import importlib.util

    needed = ("pyarrow", "clickhouse_connect") + (() if config.url else ("chdb",))
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        from ..config import ConfigError

        raise ConfigError(
            f"fleet.enabled: the fleet store needs {', '.join(missing)}, which is not installed: "
            "pip install 'circuitwatch[fleet]'"
        )


class FleetExporter:
    def __init__(self, config: FleetConfig, evidence_dir: Path, store: FleetStore | None = None) -> None:
        self.config = config
        self.spool = Spool(spool_dir_of(config, evidence_dir), int(config.spool_max_mb * 2**20))
        # the embedded engine holds the GIL through its inserts: it gets a process of its own (delivery.py)
        self.delivery: SpoolDelivery | ChildDelivery = (
            SpoolDelivery(config, evidence_dir, self.spool, store)
            if store is not None or config.url
            else ChildDelivery(config, evidence_dir)
        )
        load_arrow()
        self.stats: Counter = Counter()  # dropped/<reason>/<table>, CPU times; the delivery counts the rest
        self._queue: deque = deque()
        self._queued_requests = 0
        self._wake = threading.Condition()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="circuitwatch-fleet", daemon=True)

    # --- hooks (any thread; O(1); never block) ------------------------------------------------------------

    def report_final(self, report: pb.Report) -> None:
        """A final report without codes (nothing to reduce): exported as it is."""
        self._put(("report", report), requests=1)

    def request_reduced(
        self, report: pb.Report, sets: dict[int, FeatureSet], codes: dict[int, SlotCodes], registry: SaeRegistry
    ) -> None:
        """A final request's feature sets, from the request index's reduction: exported with its report."""
        saes = tuple(
            (registry.term_bases[g], registry.identities[g], registry.producer_slot[g])
            for g in range(len(registry.identities))
        )
        kept_codes = codes if self.config.token_codes else None
        self._put(("reduced", report, sets, saes, kept_codes), requests=1)

    def labels_changed(
        self, audit: list[tuple[str, int, str, str, str, str]], states: list[tuple[str, int, int, list[str]]]
    ) -> None:
        """One Label call: its audit rows, and (request id, arrival, version, labels now) of each final request
        it changed, as one item, so both land in the same batch."""
        if audit or states:
            self._put(("labels", audit, states), requests=0)

    def _put(self, item: tuple, requests: int) -> None:
        with self._wake:
            if len(self._queue) >= self.config.queue_max_requests:
                dropped = self._queue.popleft()
                self.stats[f"dropped/queue_full/{QUEUED_TABLE[dropped[0]]}"] += (
                    len(dropped[1]) if dropped[0] == "labels" else 1
                )
                if self.stats["queue_full_logged"] == 0:
                    self.stats["queue_full_logged"] = 1
                    log.warning(
                        "fleet export queue over fleet.queue_max_requests (%d): dropping the oldest (counted in "
                        "circuitwatch_fleet_rows_dropped_total)",
                        self.config.queue_max_requests,
                    )
            self._queue.append(item)
            self._queued_requests += requests
            if self._queued_requests >= self.config.batch_rows:
                self._wake.notify()

    # --- the thread ------------------------------------------------------------------------------------

    def start(self) -> None:
        self.delivery.start()
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Spool what is queued and try to deliver the spool once more; what the store does not take now stays
        spooled for the next start."""
        self._stopping.set()
        with self._wake:
            self._wake.notify()
        self._thread.join(timeout=timeout_s)
        if self._thread.is_alive():  # stuck in an insert: what is queued stays queued rather than race it
            log.warning("fleet exporter still busy %.0fs after the stop; the spool keeps what it has", timeout_s)
            return
        self._flush_queue()
        self.delivery.close(timeout_s)

    def _run(self) -> None:
        while not self._stopping.is_set():
            with self._wake:
                self._wake.wait(self.config.flush_interval_s)
            try:
                started = time.thread_time_ns()
                self._flush_queue()
                flushed = time.thread_time_ns()
                self.delivery.deliver()
                self.stats["flush_cpu_ns"] += flushed - started  # what the bench reports per request
                self.stats["deliver_cpu_ns"] += time.thread_time_ns() - flushed
            except Exception:
                self.stats["export_errors"] += 1
                log.exception("fleet export step failed; retrying next interval")

    def _flush_queue(self) -> None:
        """Queue -> batches of at most batch_rows requests -> spool."""
        while True:
            with self._wake:
                if not self._queue:
                    return
                items, requests = [], 0
                while self._queue and requests < self.config.batch_rows:
                    item = self._queue.popleft()
                    items.append(item)
                    requests += item[0] in ("report", "reduced")
                self._queued_requests -= requests
            self._spool(items)

    def _spool(self, items: list[tuple]) -> None:
        """Into the spool as one queued file, after making room by dropping its oldest batches (counted and
        logged)."""
        dropped, admitted = self.spool.admit(stage_queued(items, self.spool.directory, self.spool.stem()))
        if admitted:
            self.stats["batches_spooled"] += 1
        else:
            dropped["reports"] += sum(item[0] in ("report", "reduced") for item in items)
            dropped["label_feedback"] += sum(len(item[1]) for item in items if item[0] == "labels")
            log.warning("fleet spool over fleet.spool_max_mb: a batch larger than the whole spool was dropped")
        count_dropped(self.stats, dropped)

    # --- what metrics and health read ------------------------------------------------------------------

    def snapshot(self) -> dict:
        """Counters and gauges for telemetry: rows exported and dropped per table, spool size, export lag."""
        pending = self.spool.pending()
        delivered = self.delivery.counters()
        stats = [s for s in (file_stat(f.path) for f in pending) if s is not None]  # delivered meanwhile: gone
        oldest = min((s.st_mtime for s in stats), default=None)
        return {
            "exported": {t: delivered[f"exported/{t}"] for t in TABLES},
            "dropped": {
                (r, t): self.stats[f"dropped/{r}/{t}"] + delivered[f"dropped/{r}/{t}"]
                for r in DROP_REASONS
                for t in TABLES
            },
            "insert_errors": delivered["insert_errors"],
            "spool_bytes": sum(s.st_size for s in stats),
            "spool_files": len(stats),
            "lag_s": max(0.0, time.time() - oldest) if oldest is not None else 0.0,  # the oldest batch not in
            "queued": len(self._queue),
        }
