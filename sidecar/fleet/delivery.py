"""Spooled batches into the fleet store: each queued batch turned into table files (rows.py), then oldest first,
each with its deduplication token, with back-off while the store is down.

    exporter thread --spool files--> SpoolDelivery (the exporter's thread: a ClickHouse server)
                                     ChildDelivery  (a process of its own: the embedded store)

The embedded engine (chdb) runs inside the Python process that calls it and holds the GIL through an insert, so
delivering on the sidecar's own thread slowed its ingest by 12-24% (bench/fleet_bench.py). For the embedded
store the same delivery loop therefore runs in a child process that shares only the spool directory with the
sidecar; its counters come back over a queue. Building the rows runs there too, at its lower priority (it held
the sidecar's interpreter for 0.4-0.5 ms a request on the exporter thread). A server store is only a network
client, so it stays a thread.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections import Counter
from pathlib import Path

from ..config import FleetConfig
from .connection import WANTED_POLL_S, FleetStore, StoreUnavailableError, open_store
from .queued import QUEUED, read_queued
from .rows import Batch, RowMaker
from .schema import Retention, migrate
from .spool import Spool, SpooledFile, count_dropped

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 10.0
RESTART_BACKOFF_S = 1.0  # a delivery process that died restarts no sooner, doubling while it keeps dying,
HEALTHY_RUN_S = 60.0  # unless it ran this long first
DELIVERY_NICENESS = 10  # the delivery process yields the CPU to the sidecar's ingest


def store_for(config: FleetConfig, evidence_dir: Path, linger: bool = False) -> FleetStore:
    """The store a sidecar configuration names (a server url, else the embedded directory, kept open between
    deliveries if `linger`: connection.py)."""
    if not config.url:  # a busy embedded store counts as down: the exporter spools instead of waiting long
        directory = str(config.embedded_dir or evidence_dir / "fleet")
        return open_store(directory, config.database, lock_timeout_s=1.0, linger=linger)
    password = ""
    if config.password_file is not None:
        try:
            password = config.password_file.read_text().strip()
        except OSError as exc:
            from ..config import ConfigError

            raise ConfigError(f"{config.password_file}: fleet.password_file: cannot read ({exc.strerror})") from None
    tls = config.tls
    return open_store(
        config.url,
        config.database,
        username=config.username,
        password=password,
        ca_file=tls.ca_file,
        verify=tls.verify,
        cert_file=tls.cert_file,
        key_file=tls.key_file,
        timeout_s=config.insert_timeout_s,
    )


def retention_of(config: FleetConfig) -> Retention:
    return Retention(days=config.retention_days, token_codes_hours=config.token_codes_retention_hours)


def spool_dir_of(config: FleetConfig, evidence_dir: Path) -> Path:
    return config.spool_dir or evidence_dir / "fleet-spool"


class SpoolDelivery:
    """Turns the spool's queued batches into table files, then inserts those oldest first until the spool is empty
    or the store fails (then backs off)."""

    def __init__(self, config: FleetConfig, evidence_dir: Path, spool: Spool, store: FleetStore | None = None) -> None:
        self.config = config
        self.store = store or store_for(config, evidence_dir)
        self.spool = spool
        self.rows = RowMaker(config.instance_name)
        self.stats: Counter = Counter()  # exported/<table>, inserts, insert_errors, batches_converted
        self._migrated = False
        self._retry_at = 0.0
        self._backoff = 0.5
        self._down_since: float | None = None

    @property
    def description(self) -> str:
        return self.store.description

    def start(self) -> None:
        """Nothing to start: it runs on the caller's thread."""

    def deliver(self, deadline: float | None = None, lock_wait_s: float | None = None) -> None:
        """Insert what is spooled, oldest first, until `deadline`; `lock_wait_s`: how long to wait for an embedded
        store another process holds (default: the store's own, 1 s for a sidecar's)."""
        self.convert(deadline)  # a store that is down does not keep batches in their larger queued form
        if time.monotonic() < self._retry_at or (self._migrated and not self.spool.pending()):
            return
        try:
            with self.store.held(wait_s=lock_wait_s):
                if not self._migrated:
                    migrate(self.store, self.config.database, retention_of(self.config))
                    self._migrated = True
                for spooled in self.spool.pending():
                    if spooled.table == QUEUED or (deadline is not None and time.monotonic() > deadline):
                        return  # a batch queued since convert(): it and what follows it wait for the next round
                    try:
                        self.store.insert_file(f"{self.config.database}.{spooled.table}", spooled.path, spooled.token)
                    except FileNotFoundError:  # the sidecar dropped it to make room (counted there); it is read
                        continue  # whole before the insert, so none of it went in
                    self.spool.remove(spooled)
                    self.stats[f"exported/{spooled.table}"] += spooled.rows
                    self.stats["inserts"] += 1
        except StoreUnavailableError as exc:
            self.stats["insert_errors"] += 1
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning("fleet store unavailable, spooling to %s: %s", self.spool.directory, exc)
            return
        self._backoff = 0.5
        if self._down_since is not None:
            log.info("fleet store back after %.1fs; spool replayed", time.monotonic() - self._down_since)
            self._down_since = None

    def convert(self, deadline: float | None = None) -> None:
        """Queued batches into table files, oldest first (those a stopped delivery had claimed, then the rest),
        until `deadline`."""
        claimed = self.spool.claimed()
        queued = [spooled for spooled in self.spool.pending() if spooled.table == QUEUED]
        for spooled, path in claimed + [(spooled, None) for spooled in queued]:
            if deadline is not None and time.monotonic() > deadline:
                return
            path = path or self.spool.claim(spooled)
            if path is not None:  # else the writer dropped it to make room (counted there)
                self._convert(spooled, path)

    def _convert(self, queued: SpooledFile, claimed: Path) -> None:
        try:
            items = read_queued(claimed)
        except Exception as exc:  # any reason a file cannot be read means the same: its rows are lost
            aside = claimed.with_name(queued.path.name + ".unreadable")
            claimed.rename(aside)
            for table, rows in queued.dropped_rows.items():
                self.stats[f"dropped/unreadable/{table}"] += rows
            log.error(
                "fleet spool: %s unreadable (%s: %s); moved aside, its rows are lost", aside, type(exc).__name__, exc
            )
            return
        batch = self.rows.add_items(Batch(), items)
        dropped, admitted = self.spool.admit(batch.stage(self.spool.directory, queued.stem), replacing=queued)
        self.stats["batches_converted" if admitted else "batches_dropped_converted"] += 1
        count_dropped(self.stats, dropped)

    def counters(self) -> Counter:
        return self.stats

    def final_delivery(self, timeout_s: float) -> None:
        """One more try within timeout_s, back-off or not (the sidecar is stopping). It waits that long for an
        embedded store another process holds (a regular delivery waits 1 s and tries again later), so a replica
        stopping while another one delivers into the same store does not leave its last batches spooled."""
        self._retry_at = 0.0
        self.deliver(deadline=time.monotonic() + timeout_s, lock_wait_s=timeout_s)

    def close(self, timeout_s: float) -> None:
        self.final_delivery(timeout_s)
        self.store.close()


class ChildDelivery:
    """SpoolDelivery in a process of its own (the embedded store). The exporter nudges it after each spooled
    batch; it also looks at the spool every flush interval. A process that died is started again at the next
    nudge (counted in `delivery_restarts`): the spool keeps every batch until the store took it."""

    def __init__(self, config: FleetConfig, evidence_dir: Path) -> None:
        self.config, self.evidence_dir = config, evidence_dir
        self.description = f"the embedded store in {config.embedded_dir or evidence_dir / 'fleet'} (own process)"
        self.stats: Counter = Counter()
        self._context = multiprocessing.get_context("spawn")
        self._process: multiprocessing.process.BaseProcess | None = None
        self._inbox: multiprocessing.Queue | None = None
        self._outbox: multiprocessing.Queue | None = None
        self._restart_at = 0.0
        self._restart_backoff = RESTART_BACKOFF_S / 2
        self._started_at = 0.0
        self._collecting = threading.Lock()  # the exporter thread and metric scrapes both collect

    def start(self) -> None:
        self._started_at = time.monotonic()
        self._inbox, self._outbox = self._context.Queue(), self._context.Queue()
        self._process = self._context.Process(
            target=_deliver_until_stopped,
            args=(self.config, self.evidence_dir, self._inbox, self._outbox, logging.getLogger().getEffectiveLevel()),
            name="circuitwatch-fleet-delivery",
            daemon=True,
        )
        self._process.start()

    def deliver(self, deadline: float | None = None) -> None:
        self._collect()
        if self._process is None or not self._process.is_alive():
            if self._process is not None:
                if time.monotonic() < self._restart_at:  # one that keeps dying is not restarted in a tight loop
                    return
                self.stats["delivery_restarts"] += 1
                healthy = time.monotonic() - self._started_at >= HEALTHY_RUN_S
                self._restart_backoff = RESTART_BACKOFF_S if healthy else min(self._restart_backoff * 2, MAX_BACKOFF_S)
                log.warning(
                    "fleet delivery process exited (code %s); starting it again (next restart no sooner than %.0fs)",
                    self._process.exitcode,
                    self._restart_backoff,
                )
                self._restart_at = time.monotonic() + self._restart_backoff
            self.start()
        assert self._inbox is not None
        self._inbox.put("deliver")

    def counters(self) -> Counter:
        self._collect()
        return self.stats

    def close(self, timeout_s: float) -> None:
        """One last delivery within timeout_s, then the process ends; what the store did not take stays spooled."""
        if self._process is None or self._inbox is None:
            return
        self._inbox.put(("stop", timeout_s))
        self._process.join(timeout_s + 5.0)
        if self._process.is_alive():
            log.warning(
                "fleet delivery process still busy %.0fs after the stop; ended (the spool keeps the rest)", timeout_s
            )
            self._process.kill()
            self._process.join(5.0)
        self._collect()

    def _collect(self) -> None:
        """Counter increments the process sent since the last look."""
        with self._collecting:
            while self._outbox is not None:
                try:
                    self.stats.update(self._outbox.get_nowait())
                except queue.Empty:
                    return


def _deliver_until_stopped(
    config: FleetConfig,
    evidence_dir: Path,
    inbox: multiprocessing.Queue,
    outbox: multiprocessing.Queue,
    log_level: int,
) -> None:
    """The delivery process: deliver when nudged or every flush interval, report counter increments, stop when
    told (after one last delivery) or when the sidecar is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the sidecar decides when this stops (a terminal's ^C too)
    os.nice(DELIVERY_NICENESS)  # before the engine starts its threads: they inherit it
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # as cli.py
    spool = Spool(spool_dir_of(config, evidence_dir), int(config.spool_max_mb * 2**20), writer=False)
    delivery = SpoolDelivery(config, evidence_dir, spool, store_for(config, evidence_dir, linger=True))
    parent = multiprocessing.parent_process()
    reported: Counter = Counter()
    stop_after: float | None = None
    while stop_after is None and (parent is None or parent.is_alive()):
        message = _next_message(inbox, delivery.store, config.flush_interval_s)
        while message == "deliver":  # nudges that queued up while a delivery ran: one delivery serves them all
            try:
                message = inbox.get_nowait()
            except queue.Empty:
                break
        if isinstance(message, tuple):  # ("stop", timeout_s)
            stop_after = message[1]
            delivery.final_delivery(stop_after)
        else:
            delivery.deliver()
        outbox.put(dict(delivery.stats - reported))
        reported = delivery.stats.copy()
    delivery.store.close()


def _next_message(inbox: multiprocessing.Queue, store: FleetStore, timeout_s: float):
    """The sidecar's next message, or "deliver" after timeout_s; meanwhile the lingering store is let go as soon
    as another process wants it."""
    deadline = time.monotonic() + timeout_s
    while True:
        store.let_go_if_wanted()
        try:
            return inbox.get(timeout=max(0.0, min(WANTED_POLL_S, deadline - time.monotonic())))
        except queue.Empty:
            if time.monotonic() >= deadline:
                return "deliver"
