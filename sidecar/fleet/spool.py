"""Batches on their way to the fleet store, on local disk, oldest first.

Every batch is written here before any insert is tried, so a store that is down, slow or refusing costs
nothing but disk: the exporter replays the spool in order when the store answers again. A batch arrives as one
queued file, <seq>-<run>.queued.<reports>.<feedback rows>.arrow (the exporter's items as they were: queued.py),
which the delivery turns into one file per table, <seq>-<run>.<table>.<rows>.arrow, before it inserts them. seq
orders batches across restarts, run (random per exporter start) keeps every batch's deduplication token unique,
the counts let the spool count what it drops without reading it.
The spool is bounded: before a batch goes in, the oldest batches are deleted until it fits (a batch larger than
the whole bound is not spooled), and the exporter counts and logs what went. A queued batch the delivery is
turning into table files is claimed first (renamed to *.converting): from then on it is the delivery's; it still
counts in the bound, but only the delivery removes it, once its table files are in. Admitting and claiming happen
under one file lock, shared by the writer and the delivery (another process for the embedded store), so a batch is
either dropped or claimed, never both.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .queued import QUEUED
from .rows import TABLES

log = logging.getLogger(__name__)

_NAME = re.compile(r"(\d{12})-([0-9a-f]{12})\.([a-z_]+)\.(\d+)(?:\.(\d+))?\.arrow")
ORDER = (QUEUED, *TABLES)  # a batch is either queued or in table files; its table files go in in TABLES order
CLAIMED = ".converting"


@dataclass(frozen=True)
class SpooledFile:
    path: Path
    seq: int
    table: str
    rows: int  # a queued file's: its reports
    feedback_rows: int = 0  # a queued file's label_feedback rows

    @property
    def stem(self) -> str:
        """<seq>-<run>: the batch's, shared by its queued file and the table files made from it."""
        return self.path.name.split(".", 1)[0]

    @property
    def token(self) -> str:
        """The insert's deduplication token: the same on every replay of this file, unique to it."""
        return self.path.name.rsplit(".", 2)[0]

    @property
    def dropped_rows(self) -> dict[str, int]:
        """The rows counted as dropped when this file is."""
        if self.table == QUEUED:
            return {"reports": self.rows, "label_feedback": self.feedback_rows}
        return {self.table: self.rows}


def claimed_path(queued: SpooledFile) -> Path:
    """Where a queued batch lies while the delivery turns it into table files."""
    return queued.path.with_name(queued.path.name + CLAIMED)


def file_stat(path: Path) -> os.stat_result | None:
    """A spooled file's stat; None once it is gone (the delivering process removes files as the store takes
    them)."""
    try:
        return path.stat()
    except FileNotFoundError:
        return None


def file_size(path: Path) -> int:
    stat = file_stat(path)
    return stat.st_size if stat is not None else 0


class Spool:
    def __init__(self, directory: Path, max_bytes: int, writer: bool = True) -> None:
        """`writer`: this process writes batches (and clears writes a crash cut short); the delivering process
        of an embedded store opens the same directory only to read and remove what the store took."""
        self.directory = directory
        self.max_bytes = max_bytes
        directory.mkdir(parents=True, exist_ok=True)
        if writer:
            for partial in directory.glob("*.partial"):  # a write cut short by a crash: never inserted
                partial.unlink()
        self.run = uuid.uuid4().hex[:12]
        seqs = [f.seq for f in self.pending()] + [f.seq for f, _ in self.claimed()]
        self.next_seq = max(seqs) + 1 if seqs else 0

    def pending(self) -> list[SpooledFile]:
        """Every spooled file, queued or in tables, in insert order (batch by batch; in a batch, TABLES order)."""
        found = []
        for path in self.directory.glob("*.arrow"):
            match = _NAME.fullmatch(path.name)
            if match and match[3] in ORDER and (match[5] is not None) == (match[3] == QUEUED):
                found.append(SpooledFile(path, int(match[1]), match[3], int(match[4]), int(match[5] or 0)))
        return sorted(found, key=lambda f: (f.seq, ORDER.index(f.table)))

    def claim(self, queued: SpooledFile) -> Path | None:
        """Take a queued batch out of the writer's reach before turning it into table files; None if the writer
        dropped it first (to make room: counted there)."""
        claimed = claimed_path(queued)
        with self._locked():  # not between the writer's listing of the spool and its dropping the oldest batch
            try:
                queued.path.rename(claimed)
            except FileNotFoundError:
                return None
        return claimed

    def claimed(self) -> list[tuple[SpooledFile, Path]]:
        """Queued batches claimed by a delivery that stopped before it finished them, oldest first."""
        found = []
        for path in self.directory.glob(f"*.{QUEUED}.*.arrow{CLAIMED}"):
            match = _NAME.fullmatch(path.name.removesuffix(CLAIMED))
            if match and match[3] == QUEUED and match[5] is not None:
                unclaimed = path.with_name(path.name.removesuffix(CLAIMED))
                found.append((SpooledFile(unclaimed, int(match[1]), QUEUED, int(match[4]), int(match[5])), path))
        return sorted(found, key=lambda pair: pair[0].seq)

    def stem(self) -> str:
        """The file stem of the next batch (the caller writes its queued file)."""
        stem = f"{self.next_seq:012d}-{self.run}"
        self.next_seq += 1
        return stem

    @property
    def nbytes(self) -> int:
        return sum(file_size(p) for p in self.directory.glob("*.arrow")) + self._claimed_bytes()

    def _claimed_bytes(self) -> int:
        return sum(file_size(path) for _, path in self.claimed())

    def admit(self, staged: list[tuple[Path, Path]], replacing: SpooledFile | None = None) -> tuple[Counter, bool]:
        """Rename staged (.partial, final) files into place if they fit once the oldest batches are dropped; else
        delete them. `replacing`: the claimed queued batch they were made from, counted in the bound until they
        are in and deleted then (or with them, if they cannot fit: that batch is dropped too). Returns the rows
        dropped per table and whether the files went in. The writer and the delivery (another process for the
        embedded store) both admit under one lock, so neither drops what the other is counting."""
        claimed = claimed_path(replacing) if replacing is not None else None
        incoming = sum(partial.stat().st_size for partial, _ in staged) - (file_size(claimed) if claimed else 0)
        with self._locked():
            dropped, fits = self.make_room(incoming)
            for partial, final in staged:
                if fits:
                    partial.rename(final)
                else:
                    partial.unlink(missing_ok=True)
            if replacing is not None and claimed is not None:
                if not fits:
                    dropped.update(replacing.dropped_rows)
                claimed.unlink(missing_ok=True)
        return dropped, fits

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The spool's lock, across processes (flock: another open of the file in this process waits too)."""
        with open(self.directory / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def make_room(self, incoming: int) -> tuple[Counter, bool]:
        """Delete the oldest batches until `incoming` more bytes fit; returns the rows dropped per table and
        whether they fit (a batch larger than the whole bound never does, and is not spooled). Claimed batches
        count, but are the delivery's: they are never dropped here."""
        dropped: Counter = Counter()
        files = self.pending()
        sizes = {f.path: file_size(f.path) for f in files}
        total = sum(sizes.values()) + self._claimed_bytes()
        while files and total + incoming > self.max_bytes:
            oldest = files[0].seq
            while files and files[0].seq == oldest:
                gone = files.pop(0)
                total -= sizes[gone.path]
                try:
                    gone.path.unlink()
                except FileNotFoundError:  # removed by the delivery since the listing, the store took it: not dropped
                    continue
                dropped.update(gone.dropped_rows)
        return dropped, total + incoming <= self.max_bytes

    def remove(self, spooled: SpooledFile) -> None:
        spooled.path.unlink(missing_ok=True)


def count_dropped(stats: Counter, dropped: Counter) -> None:
    """Rows dropped to make room, into the exporter's or the delivery's counters, and the log."""
    for table, rows in dropped.items():
        if rows:
            stats[f"dropped/spool_full/{table}"] += rows
            log.warning("fleet spool over fleet.spool_max_mb: dropped %d %s rows (oldest batch)", rows, table)
