"""Batches on their way to the fleet store, on local disk, oldest first.

Every batch is written here before any insert is tried, so a store that is down, slow or refusing costs
nothing but disk: the exporter replays the spool in order when the store answers again. Files are named
<seq>-<run>.<table>.<rows>.arrow: seq orders batches across restarts, run (random per exporter start) keeps
every batch's deduplication token unique, rows lets the spool count what it drops without reading it.
The spool is bounded: before a batch goes in, the oldest batches are deleted until it fits (a batch larger than
the whole bound is not spooled), and the exporter counts and logs what went.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .rows import TABLES

log = logging.getLogger(__name__)

_NAME = re.compile(r"(\d{12})-([0-9a-f]{12})\.([a-z_]+)\.(\d+)\.arrow")


@dataclass(frozen=True)
class SpooledFile:
    path: Path
    seq: int
    table: str
    rows: int

    @property
    def token(self) -> str:
        """The insert's deduplication token: the same on every replay of this file, unique to it."""
        return self.path.name.rsplit(".", 2)[0]


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
        files = self.pending()
        self.next_seq = files[-1].seq + 1 if files else 0

    def pending(self) -> list[SpooledFile]:
        """Every spooled file, in insert order (batch by batch; in a batch, the order it was written)."""
        found = []
        for path in self.directory.glob("*.arrow"):
            match = _NAME.fullmatch(path.name)
            if match and match[3] in TABLES:
                found.append(SpooledFile(path, int(match[1]), match[3], int(match[4])))
        return sorted(found, key=lambda f: (f.seq, TABLES.index(f.table)))

    def stem(self) -> str:
        """The file stem of the next batch (the caller writes <stem>.<table>.<rows>.arrow files)."""
        stem = f"{self.next_seq:012d}-{self.run}"
        self.next_seq += 1
        return stem

    @property
    def nbytes(self) -> int:
        return sum(file_size(p) for p in self.directory.glob("*.arrow"))

    def make_room(self, incoming: int) -> tuple[Counter, bool]:
        """Delete the oldest batches until `incoming` more bytes fit; returns the rows dropped per table and
        whether they fit (a batch larger than the whole bound never does, and is not spooled)."""
        dropped: Counter = Counter()
        files = self.pending()
        sizes = {f.path: file_size(f.path) for f in files}
        total = sum(sizes.values())
        while files and total + incoming > self.max_bytes:
            oldest = files[0].seq
            while files and files[0].seq == oldest:
                gone = files.pop(0)
                total -= sizes[gone.path]
                gone.path.unlink(missing_ok=True)
                dropped[gone.table] += gone.rows
        return dropped, total + incoming <= self.max_bytes

    def remove(self, spooled: SpooledFile) -> None:
        spooled.path.unlink(missing_ok=True)
