"""The maintenance worker: a child process that seals token segments, reduces finished requests and builds
request segments for the sidecar, at a lower CPU priority.

All three are pure functions of numpy arrays (SegmentParts.seal: a few hundred ms of numpy per 2M-posting
segment; request_feature_sets: ~2 ms a request; segment_words: a loop over a request segment's 256 requests).
On the maintenance thread they shared the interpreter with ingest (one numpy call holds it for up to ~15 ms)
and took a core from it whenever the cores were busy: under decode-shaped load at 100 engine steps/s that was
most of the report-latency tail (bench/sidecar_bench.py). In a child process at nice +`worker_nice` they hold
neither: arrays cross a socket pair (sent straight from their buffers, an active segment's per-batch pieces one
after another without joining them first; received straight into preallocated arrays), the interpreter free
during every send and receive, and the kernel gives the ingest thread the core first.

The worker is a fresh interpreter (`python -P -c`, the socket's other end passed as an inherited descriptor, the
sidecar's sys.path as an argument), not a multiprocessing child: spawn would import the embedding program's main
module again. Work smaller than
`worker_min_postings` stays in process (crossing costs more than it saves). If the worker cannot
start, dies, stalls or fails a piece of work, that work is done in process (same function, same result), the
failure is logged and counted (maintenance_worker_failures), and a new worker is started for later work no sooner
than RESTART_AFTER_S later.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from typing import Any

import numpy as np

from .config import MaintenanceConfig
from .index import ActiveSegment, SegmentParts, TokenSegment
from .request_index import segment_words
from .request_sets import MODES, FeatureSet, ReductionInput, SlotCodes, feature_sets_here, request_feature_sets

log = logging.getLogger(__name__)

RESTART_AFTER_S = 30.0  # after a failure, work stays in process at least this long
REPLY_TIMEOUT_S = 120.0  # a worker that takes or gives nothing this long (a send or a receive) is replaced


def _array_fields(cls: type) -> tuple[str, ...]:
    """A dataclass's numpy array fields, in order: what crosses the socket for it (its other fields travel in the
    header; TokenSegment's optional caches stay behind)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.type == "np.ndarray")


SEGMENT_ARRAYS = _array_fields(TokenSegment)
SLOT_ARRAYS = _array_fields(SlotCodes)


class MaintenanceWorker:
    """The sidecar's handle on its worker process: `seal`, `feature_sets` and `segment_words` give what the
    in-process functions give, computed there when the worker is enabled (worker_process), the work large enough
    and the worker healthy. One piece of work at a time."""

    def __init__(self, config: MaintenanceConfig, counters: Counter[str]) -> None:
        self.config = config
        self.counters = counters
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._conn: socket.socket | None = None
        self._failed_at: float | None = None
        self._closed = False  # after close(), work stays in process (a maintenance tick outliving the stop)

    @property
    def pid(self) -> int | None:
        """The worker's process id while one runs."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def seal(self, active: ActiveSegment) -> TokenSegment:
        """The sealed segment. Its per-batch pieces go to the worker as they are: joining them here would hold
        the interpreter for one long copy (tens of ms at 2M postings) that ingest would wait behind."""
        if not active.rows or active.num_postings < self.config.worker_min_postings:
            return active.seal()
        header = (active.base_uid, active.t_start, active.t_end)
        reply = self._run("seal", header, active.pieces())
        if reply is None:
            return active.seal()
        _, arrays = reply
        self.counters["maintenance_worker_seals"] += 1
        fields = dict(zip(SEGMENT_ARRAYS, arrays, strict=True))
        return TokenSegment(*header, **fields)

    def feature_sets(self, inputs: list[ReductionInput]) -> list[dict[int, FeatureSet]]:
        postings = sum(len(slot.features) for codes, _, _ in inputs for slot in codes.values())
        if postings < self.config.worker_min_postings:
            return feature_sets_here(inputs)
        header = [(num_prompt, list(bases), sorted(codes)) for codes, num_prompt, bases in inputs]
        arrays = [
            getattr(codes[gslot], name) for codes, _, _ in inputs for gslot in sorted(codes) for name in SLOT_ARRAYS
        ]
        reply = self._run("reduce", header, arrays)
        if reply is None:
            return feature_sets_here(inputs)
        _, out = reply
        self.counters["maintenance_worker_reductions"] += len(inputs)
        per_request = 2 * len(MODES)
        return [
            {mode: FeatureSet(out[at + 2 * m], out[at + 2 * m + 1]) for m, mode in enumerate(MODES)}
            for at in range(0, len(out), per_request)
        ]

    def segment_words(self, sets: list[FeatureSet], both_is_union: bool) -> tuple[np.ndarray, np.ndarray]:
        """A request segment's terms and words. Its cost is a Python loop over the segment's requests more than
        its terms, so it goes to the worker from an eighth of worker_min_postings terms."""
        lengths = np.array([len(s.terms) for s in sets], np.int64)
        if not sets or lengths.sum() < self.config.worker_min_postings // 8:
            return segment_words(sets, both_is_union)
        reply = self._run("build", both_is_union, [[s.terms for s in sets], [s.scopes for s in sets], lengths])
        if reply is None:
            return segment_words(sets, both_is_union)
        _, (unique, words) = reply
        self.counters["maintenance_worker_segments"] += 1
        return unique, words

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the worker (waiting up to timeout_s for a piece of work in progress)."""
        locked = self._lock.acquire(timeout=timeout_s)
        try:
            self._closed = True
            process, conn = self._process, self._conn
            self._process = self._conn = None
            if process is None:
                return
            if locked and conn is not None:
                with contextlib.suppress(OSError):
                    _send(conn, "stop", None, [])
            try:
                process.wait(timeout_s if locked else 0)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout_s)
            if conn is not None:
                conn.close()
        finally:
            if locked:
                self._lock.release()

    # --- the parent's side -----------------------------------------------------------------------------

    def _run(self, kind: str, header: Any, arrays: list[Arrays]) -> tuple[Any, list[np.ndarray]] | None:
        """The worker's (header, arrays) for one piece of work, or None: do it in process."""
        with self._lock:
            conn = self._connection()
            if conn is None:
                return None
            try:
                conn.settimeout(REPLY_TIMEOUT_S)  # each send or receive: a stalled worker cannot hold maintenance
                _send(conn, kind, header, arrays)
                status, reply_header, reply_arrays = _recv(conn)
            except TimeoutError:
                self._fail(f"{kind}: no progress within {REPLY_TIMEOUT_S:g}s")
                return None
            except (OSError, EOFError, pickle.UnpicklingError) as exc:
                self._fail(f"{kind}: {type(exc).__name__}: {exc}")
                return None
            if status != "ok":
                self.counters["maintenance_worker_failures"] += 1
                log.warning("maintenance worker: %s failed there; doing it in process:\n%s", kind, reply_header)
                return None
            return reply_header, reply_arrays

    def _connection(self) -> socket.socket | None:
        """The running worker's socket, starting one if none runs and the last failure is old enough."""
        if self._closed or not self.config.worker_process:
            return None
        if self._process is not None:
            if self._process.poll() is None:
                return self._conn
            self._fail(f"exited with code {self._process.returncode}")
        if self._failed_at is not None and time.monotonic() - self._failed_at < RESTART_AFTER_S:
            return None
        parent, child = socket.socketpair()  # the child's end is inherited by descriptor
        fd = child.fileno()
        command = [sys.executable, "-P", "-c", _CHILD, str(fd), str(self.config.worker_nice), json.dumps(sys.path)]
        try:  # exec a fresh interpreter: a fork of this threaded process would inherit its locks mid-use
            process = subprocess.Popen(command, pass_fds=(fd,), stdin=subprocess.DEVNULL)
        except Exception as exc:  # e.g. out of processes or memory
            parent.close()
            self._fail(f"cannot start: {type(exc).__name__}: {exc}")
            return None
        finally:
            child.close()
        self._process, self._conn = process, parent
        log.info("maintenance worker started (pid %d, nice +%d)", process.pid, self.config.worker_nice)
        return parent

    def _fail(self, reason: str) -> None:
        """Drop the worker after a failure; its work goes on in process until RESTART_AFTER_S have passed."""
        self.counters["maintenance_worker_failures"] += 1
        log.warning("maintenance worker: %s; its work runs in process for at least %gs", reason, RESTART_AFTER_S)
        process, conn = self._process, self._conn
        self._process = self._conn = None
        self._failed_at = time.monotonic()
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(5)
        if conn is not None:
            conn.close()


# --- the wire: a frame (kind, header, count), then per array a frame (dtype, shape) and its raw bytes -------

Arrays = np.ndarray | list[np.ndarray]  # one array, or its pieces along the first axis (sent back to back)
_LENGTH = struct.Struct("<Q")
_IOV_MAX = 1024  # buffers one sendmsg takes (Linux's UIO_MAXIOV)


def _send(conn: socket.socket, kind: str, header: Any, arrays: list[Arrays]) -> None:
    """Send (kind, header), then each array: its (dtype, shape) and its bytes. An array given as pieces arrives
    as one (the pieces are never joined here). The interpreter is free while the kernel copies, and the Python
    work between copies is short: an active segment has a piece per code batch and field, thousands a seal."""
    _send_buffers(conn, [_framed((kind, header, len(arrays)))])
    for array in arrays:
        pieces = array if isinstance(array, list) else [array]
        data = [p if p.flags.c_contiguous else np.ascontiguousarray(p) for p in pieces if p.size]
        _send_buffers(conn, [_framed(_spec(pieces)), *data])


def _framed(value: Any) -> bytes:
    meta = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(meta)) + meta


def _spec(pieces: list[np.ndarray]) -> tuple[str, tuple[int, ...]]:
    """(dtype, shape) of the array the pieces make: they share a dtype and all but the first dimension."""
    first = pieces[0]
    if len({(p.dtype, p.shape[1:]) for p in pieces}) > 1:
        shapes = [(p.dtype.str, p.shape) for p in pieces]
        raise ValueError(f"pieces of one array differ in dtype or trailing shape: {shapes}")
    return first.dtype.str, (sum(map(len, pieces)), *first.shape[1:])


def _send_buffers(conn: socket.socket, buffers: list) -> None:
    """Every buffer, in order, with as few system calls as the kernel allows (sendmsg gathers up to _IOV_MAX a
    call; each call leaves the interpreter to ingest and wakes this thread back into it)."""
    views = [memoryview(b).cast("B") for b in buffers]
    first = 0
    while first < len(views):
        sent = conn.sendmsg(views[first : first + _IOV_MAX])
        while sent:
            size = len(views[first])
            if sent < size:
                views[first] = views[first][sent:]
                break
            sent -= size
            first += 1


def _recv(conn: socket.socket) -> tuple[str, Any, list[np.ndarray]]:
    kind, header, count = _unframed(conn)
    arrays = []
    for _ in range(count):
        dtype, shape = _unframed(conn)
        array = np.empty(shape, np.dtype(dtype))
        _recv_into(conn, memoryview(array.reshape(-1).view(np.uint8)))
        arrays.append(array)
    return kind, header, arrays


def _unframed(conn: socket.socket) -> Any:
    (size,) = _LENGTH.unpack(_recv_exactly(conn, _LENGTH.size))
    return pickle.loads(_recv_exactly(conn, size))


def _recv_exactly(conn: socket.socket, size: int) -> bytearray:
    buffer = bytearray(size)
    _recv_into(conn, memoryview(buffer))
    return buffer


def _recv_into(conn: socket.socket, view: memoryview) -> None:
    """Fill the buffer from the socket (the kernel copies straight into it, the interpreter free meanwhile)."""
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])
        if n == 0:
            raise EOFError("the other end closed the socket")
        got += n


# --- the worker's side -----------------------------------------------------------------------------------


# The child resolves imports as the sidecar did: the sidecar's sys.path, not the working directory's packages (a
# source checkout's `circuitwatch/` would shadow the installed package that holds `circuitwatch.sidecar`).
_CHILD = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[3]); "
    "from circuitwatch.sidecar.maintenance_worker import serve; serve(int(sys.argv[1]), int(sys.argv[2]))"
)


def serve(fd: int, nice: int) -> None:
    """The worker process: one piece of work at a time until told to stop or the sidecar is gone."""
    conn = socket.socket(fileno=fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the sidecar stops the worker
    os.nice(nice)
    while True:
        try:
            kind, header, arrays = _recv(conn)
        except (EOFError, OSError, pickle.UnpicklingError):
            return
        if kind == "stop":
            return
        try:
            reply_header, reply_arrays = _WORK[kind](header, arrays)
        except Exception:
            _send(conn, "error", traceback.format_exc(), [])
        else:
            _send(conn, "ok", reply_header, reply_arrays)


def _seal(header: tuple[int, int, int], arrays: list[np.ndarray]) -> tuple[None, list[np.ndarray]]:
    segment = SegmentParts(*header, *arrays).seal()
    return None, [getattr(segment, name) for name in SEGMENT_ARRAYS]


def _reduce(header: list[tuple[int, list[int], list[int]]], arrays: list[np.ndarray]) -> tuple[None, list[np.ndarray]]:
    out: list[np.ndarray] = []
    at = 0
    for num_prompt, bases, gslots in header:
        codes = {}
        for gslot in gslots:
            codes[gslot] = SlotCodes(*arrays[at : at + len(SLOT_ARRAYS)])
            at += len(SLOT_ARRAYS)
        sets = request_feature_sets(codes, num_prompt, bases)
        for mode in MODES:
            out += [sets[mode].terms, sets[mode].scopes]
    return None, out


def _build(both_is_union: bool, arrays: list[np.ndarray]) -> tuple[None, list[np.ndarray]]:
    terms, scopes, lengths = arrays
    bounds = np.cumsum(lengths)[:-1]
    sets = [FeatureSet(t, s) for t, s in zip(np.split(terms, bounds), np.split(scopes, bounds), strict=True)]
    return None, list(segment_words(sets, both_is_union))


_WORK = {"seal": _seal, "reduce": _reduce, "build": _build}
