"""The maintenance worker process (sidecar/maintenance_worker.py): real child processes, real pipes. What it
computes must equal the in-process functions bit for bit, and a worker that dies or cannot run must never cost a
segment or a request's feature sets."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest

from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto import circuitwatch_pb2_grpc as pb_grpc
from circuitwatch.sidecar import maintenance_worker
from circuitwatch.sidecar.config import MaintenanceConfig
from circuitwatch.sidecar.index import ActiveSegment, SegmentParts
from circuitwatch.sidecar.keys import token_keys
from circuitwatch.sidecar.maintenance_worker import SEGMENT_ARRAYS, MaintenanceWorker
from circuitwatch.sidecar.request_index import segment_words
from circuitwatch.sidecar.request_sets import MODES, FeatureSet, SlotCodes, feature_sets_here

from support.processes import free_port, start_sidecar
from support.sidecar_harness import SyntheticRequest, manifest

FORCED = MaintenanceConfig(worker_min_postings=0)  # every piece of work goes to the worker


def random_parts(rng: np.random.Generator, rows: int = 3000, d_sae: int = 4096) -> SegmentParts:
    """Rows of several requests in arrival order (keys out of order across requests), two SAEs, 0-12 codes a row,
    some fidelity NaN (not measured)."""
    seqs = rng.integers(0, 40, rows)
    positions = rng.integers(0, 500, rows)
    counts = rng.integers(0, 13, rows).astype(np.int64)
    postings = int(counts.sum())
    fidelity = rng.random((rows, 2)).astype(np.float32)
    fidelity[rng.random(rows) < 0.3] = np.nan
    return SegmentParts(
        base_uid=1000,
        t_start=5,
        t_end=9,
        keys=token_keys(seqs, positions),
        gslot=rng.integers(0, 2, rows).astype(np.uint16),
        phase=rng.integers(1, 3, rows).astype(np.uint8),
        tokens=rng.integers(0, 50_000, rows).astype(np.uint32),
        times=rng.integers(0, 10**9, rows).astype(np.int64),
        fidelity=fidelity,
        counts=counts,
        features=rng.integers(0, d_sae, postings).astype(np.uint32),
        acts=rng.random(postings).astype(np.float16),
    )


def active_segment(parts: SegmentParts, batches: int = 7) -> ActiveSegment:
    """The parts as the index's active segment holds them: a piece per code batch, of uneven sizes, one empty."""
    active = ActiveSegment(parts.base_uid, parts.t_start)
    active.t_end = parts.t_end
    rows = len(parts.keys)
    bounds = np.concatenate(([0], np.sort(np.random.default_rng(rows).integers(0, rows, batches - 2)), [rows, rows]))
    post_bounds = np.concatenate(([0], np.cumsum(parts.counts)))[bounds]
    row_fields = (parts.keys, parts.gslot, parts.phase, parts.tokens, parts.times, parts.fidelity, parts.counts)
    for r0, r1, p0, p1 in zip(bounds[:-1], bounds[1:], post_bounds[:-1], post_bounds[1:], strict=True):
        active.rows.append(tuple(field[r0:r1] for field in row_fields))
        active.postings.append((parts.features[p0:p1], parts.acts[p0:p1]))
    active.num_rows, active.num_postings = rows, len(parts.features)
    return active


def random_reductions(rng: np.random.Generator, requests: int = 20) -> list:
    out = []
    for _ in range(requests):
        codes = {}
        for gslot in (0, 2):
            rows = int(rng.integers(1, 200))
            counts = rng.integers(0, 9, rows)
            offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
            codes[gslot] = SlotCodes(
                np.arange(rows, dtype=np.int64),
                offsets,
                rng.integers(0, 2048, int(offsets[-1])).astype(np.uint32),
                rng.random(int(offsets[-1])).astype(np.float16).astype(np.float32),
            )
        out.append((codes, int(rng.integers(0, 200)), [0, 2048, 4096]))
    return out


@pytest.fixture
def worker():
    counters: Counter[str] = Counter()
    worker = MaintenanceWorker(FORCED, counters)
    yield worker
    worker.close()


def assert_same_segment(got, expected) -> None:
    assert (got.base_uid, got.t_start, got.t_end) == (expected.base_uid, expected.t_start, expected.t_end)
    for name in SEGMENT_ARRAYS:
        a, b = getattr(got, name), getattr(expected, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        np.testing.assert_array_equal(a, b, err_msg=name)  # NaN fidelity compares equal to NaN


def test_worker_seals_and_reduces_exactly_as_in_process(
    worker: MaintenanceWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(3)
    parts = random_parts(rng)
    active = active_segment(parts)
    with monkeypatch.context() as patched:  # the pieces cross as they are: nothing is joined in the sidecar
        patched.setattr(ActiveSegment, "concatenated", lambda self: pytest.fail("joined in the sidecar's process"))
        assert_same_segment(worker.seal(active), parts.seal())
        # more pieces than one sendmsg gathers, and more bytes than a socket buffer holds
        many = random_parts(rng, rows=40_000)
        assert_same_segment(worker.seal(active_segment(many, batches=2500)), many.seal())
    empty = ActiveSegment(7, 1)
    empty.t_end = 2
    assert_same_segment(worker.seal(empty), SegmentParts.empty(7, 1, 2).seal())  # nothing to send: in process
    inputs = random_reductions(rng)
    got, expected = worker.feature_sets(inputs), feature_sets_here(inputs)
    for g, e in zip(got, expected, strict=True):
        for mode in MODES:
            np.testing.assert_array_equal(g[mode].terms, e[mode].terms)
            np.testing.assert_array_equal(g[mode].scopes, e[mode].scopes)
            assert g[mode].terms.dtype == e[mode].terms.dtype and g[mode].scopes.dtype == e[mode].scopes.dtype
    # request segments' words, from those sets (and with every request's set empty)
    for mode in MODES:
        sets = [per_request[mode] for per_request in expected]
        for both_is_union in (True, False):
            for run in (sets, [FeatureSet.empty()] * len(sets)):
                got_terms, got_words = worker.segment_words(run, both_is_union)
                terms, words = segment_words(run, both_is_union)
                assert got_terms.dtype == terms.dtype and got_words.dtype == words.dtype
                np.testing.assert_array_equal(got_terms, terms)
                np.testing.assert_array_equal(got_words, words)
    assert worker.counters == Counter(
        {
            "maintenance_worker_seals": 2,
            "maintenance_worker_reductions": len(inputs),
            "maintenance_worker_segments": 4 * len(MODES),
        }
    )
    # it runs at a lower CPU priority than the sidecar
    assert os.getpriority(os.PRIO_PROCESS, worker.pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)


def test_after_close_work_stays_in_process(worker: MaintenanceWorker) -> None:
    parts = random_parts(np.random.default_rng(9))
    worker.seal(active_segment(parts))
    first = worker.pid
    worker.close()
    assert worker.pid is None
    with pytest.raises(ProcessLookupError):  # stopped and reaped
        os.kill(first, 0)
    # e.g. a maintenance tick that outlived the stop
    assert_same_segment(worker.seal(active_segment(parts)), parts.seal())
    assert worker.pid is None and worker.counters["maintenance_worker_seals"] == 1


def test_worker_process_false_keeps_everything_in_process() -> None:
    counters: Counter[str] = Counter()
    worker = MaintenanceWorker(MaintenanceConfig(worker_process=False, worker_min_postings=0), counters)
    rng = np.random.default_rng(10)
    parts, inputs = random_parts(rng), random_reductions(rng, 3)
    assert_same_segment(worker.seal(active_segment(parts)), parts.seal())
    assert [s[MODES[0]].terms.tolist() for s in worker.feature_sets(inputs)] == [
        s[MODES[0]].terms.tolist() for s in feature_sets_here(inputs)
    ]
    assert worker.pid is None and not counters


def test_small_work_stays_in_process() -> None:
    counters: Counter[str] = Counter()
    worker = MaintenanceWorker(MaintenanceConfig(worker_min_postings=10**9), counters)
    parts = random_parts(np.random.default_rng(4), rows=50)
    assert_same_segment(worker.seal(active_segment(parts)), parts.seal())
    assert worker.pid is None and not counters


def test_a_killed_worker_costs_nothing_and_is_replaced(
    worker: MaintenanceWorker, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(5)
    parts = random_parts(rng)
    worker.seal(active_segment(parts))
    first = worker.pid
    os.kill(first, signal.SIGKILL)
    while worker._process.poll() is None:
        time.sleep(0.01)
    with caplog.at_level(logging.WARNING, logger=maintenance_worker.__name__):
        assert_same_segment(worker.seal(active_segment(parts)), parts.seal())  # done in process
    assert worker.counters["maintenance_worker_failures"] == 1
    assert f"exited with code {-signal.SIGKILL}" in caplog.text and "runs in process" in caplog.text
    assert worker.pid is None
    inputs = random_reductions(rng, 3)
    worker.feature_sets(inputs)  # within RESTART_AFTER_S: still in process, no new worker
    assert worker.pid is None and worker.counters["maintenance_worker_reductions"] == 0
    monkeypatch.setattr(maintenance_worker, "RESTART_AFTER_S", 0.0)
    worker.feature_sets(inputs)
    assert worker.pid not in (None, first) and worker.counters["maintenance_worker_reductions"] == len(inputs)


def test_a_worker_that_stalls_is_replaced(worker: MaintenanceWorker, monkeypatch: pytest.MonkeyPatch) -> None:
    parts = random_parts(np.random.default_rng(6))
    worker.seal(active_segment(parts))
    stalled = worker.pid
    os.kill(stalled, signal.SIGSTOP)  # alive, never answers
    monkeypatch.setattr(maintenance_worker, "REPLY_TIMEOUT_S", 0.5)
    try:
        assert_same_segment(worker.seal(active_segment(parts)), parts.seal())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stalled, signal.SIGCONT)
    assert worker.counters["maintenance_worker_failures"] == 1 and worker.pid is None
    with pytest.raises(ProcessLookupError):  # the stalled one was killed and reaped, not left behind
        os.kill(stalled, 0)


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
def test_the_sidecar_process_stops_its_worker(tmp_path: Path, stop: str) -> None:
    """Through the real CLI: the worker starts at the first reduction; SIGTERM stops it, and a sidecar killed
    outright leaves no worker behind either (it ends at its pipe's end of file)."""
    port = free_port()
    process = start_sidecar(tmp_path, port, "maintenance: {worker_min_postings: 0}\n", "sidecar.log")
    try:
        stub = pb_grpc.MonitorStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        request = SyntheticRequest.random(np.random.default_rng(8), "r")
        chunks = [request.slice(slot, a, b) for a, b in request.chunks(5) for slot in request.codes]
        stub.Ingest(
            iter(
                [
                    pb.IngestMessage(manifest=manifest()),
                    pb.IngestMessage(codes=pb.CodeBatch(step=1, slices=chunks)),
                    pb.IngestMessage(finish=request.finish()),
                ]
            ),
            timeout=30,
        )
        deadline = time.monotonic() + 30
        while not (children := _children(process.pid)):  # the next maintenance tick reduces the request there
            assert time.monotonic() < deadline, "no maintenance worker started"
            time.sleep(0.1)
        if stop == "sigterm":
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0
            log = (tmp_path / "sidecar.log").read_text()
            assert "maintenance worker started" in log and "sidecar stopped" in log, log
        else:
            process.kill()
            process.wait(30)
        deadline = time.monotonic() + 10
        while alive := [pid for pid in children if _running(pid)]:
            assert time.monotonic() < deadline, f"left running: {alive}"
            time.sleep(0.1)
    finally:
        if process.poll() is None:
            process.kill()


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = task / "children"
        if children.exists():
            out += [int(c) for c in children.read_text().split()]
    return out


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False
