"""The sidecar against a caller holding an ingest (or read) connection who means harm, and against poison: it stays
bounded, unstarvable and unpoisoned, answers each attempt with a clear status, and keeps serving good traffic.
Each test reproduces one finding of the hardening review (it failed before the fix)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from circuitwatch.proto import CONTRACT_VERSION
from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto.codec import pack_slice
from circuitwatch.sidecar.reports import ALL_SLOTS

from support.sidecar_harness import SyntheticRequest, manifest, messages, running_sidecar


def rejected(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def good_request(request_id: str = "good") -> SyntheticRequest:
    request = SyntheticRequest(request_id, num_prompt=2, num_positions=3, tokens=[1, 2, 3])
    request.codes = {0: [{1: 1.0}] * 3, 1: [{2: 1.0}] * 3}
    return request


def assert_still_serving(client) -> None:
    request = good_request(f"good-{time.monotonic_ns()}")
    client.ingest(messages([request], np.random.default_rng(0)))
    assert client.report(request.request_id).status == pb.REPORT_STATUS_COMPLETE


def idle_stream(stub, opened: threading.Event, release: threading.Event, errors: list) -> None:
    def messages_():
        yield pb.IngestMessage(manifest=manifest())
        opened.set()
        release.wait(30)

    try:
        stub.Ingest(messages_(), timeout=60)
    except grpc.RpcError as exc:
        errors.append(exc)
        opened.set()


def test_idle_streams_cannot_take_every_thread(tmp_path: Path) -> None:
    """Ingest streams beyond limits.ingest_streams get RESOURCE_EXHAUSTED at once; health checks and reads
    answer while the allowed ones are held (16 idle streams used to stall the monitor)."""
    limits = {"ingest_streams": 2, "watch_streams": 1, "report_waits": 1, "read_workers": 2}
    with running_sidecar(tmp_path, limits=limits) as (_, client):
        release, errors, threads = threading.Event(), [], []
        for _ in range(3):
            opened = threading.Event()
            thread = threading.Thread(target=idle_stream, args=(client.stub, opened, release, errors), daemon=True)
            thread.start()
            opened.wait(10)
            threads.append(thread)
        deadline = time.monotonic() + 10
        while not errors and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            assert [e.code() for e in errors] == [grpc.StatusCode.RESOURCE_EXHAUSTED]
            assert "limits.ingest_streams" in errors[0].details()
            watch = client.stub.WatchReports(pb.WatchReportsRequest(), timeout=10)
            time.sleep(0.3)  # the watch holds its slot
            second = rejected(lambda: next(client.stub.WatchReports(pb.WatchReportsRequest(), timeout=5)))
            assert second.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "watch_streams" in second.details()
            health = health_pb2_grpc.HealthStub(client.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            assert client.stub.ListReports(pb.ListReportsRequest(), timeout=5) is not None
            watch.cancel()
        finally:
            release.set()
            for thread in threads:
                thread.join(10)


def test_positions_are_bounded(tmp_path: Path) -> None:
    """A slice at position 2^26 used to cost 512 MB; 2^32 - 2 and a finish announcing 2^32 - 1 positions raised
    uncaught errors. Each is INVALID_ARGUMENT now, naming the bound."""
    with running_sidecar(tmp_path) as (running, client):
        for first in (1 << 26, (1 << 32) - 2):
            far = pack_slice("far", 0, first, pb.PHASE_PROMPT, [1], [0, 1], [1], [1.0])
            error = rejected(lambda far=far: client.ingest(
                [pb.IngestMessage(manifest=manifest()), pb.IngestMessage(codes=pb.CodeBatch(step=1, slices=[far]))]
            ))  # fmt: skip
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "exceed" in error.details()
        finish = pb.RequestFinish(request_id="far", num_positions=(1 << 32) - 1)
        error = rejected(
            lambda: client.ingest([pb.IngestMessage(manifest=manifest()), pb.IngestMessage(finish=finish)])
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "limits.max_positions" in error.details()
        gaps = pb.RequestGaps(request_id="far", gaps=[pb.Gap(slot=0, start=5, end=1)])
        error = rejected(lambda: client.ingest([pb.IngestMessage(manifest=manifest()), pb.IngestMessage(gaps=gaps)]))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert_still_serving(client)
        assert running.core.counters["rows"] == 3 * 2  # only the good request's rows went in


def test_junk_manifests_cannot_lock_producers_out(tmp_path: Path) -> None:
    """4,096 junk SAEs in one manifest used to lock every later producer out; d_sae 2^28 made every contrast
    allocate 4 GiB. Now: at most limits.max_slots_per_manifest per manifest, d_sae bounded, and SAEs that only
    a closed stream's manifest ever named are retired and their places reused."""
    with running_sidecar(tmp_path) as (running, client):
        junk = manifest(layers=tuple(range(65)))
        error = rejected(lambda: client.ingest([pb.IngestMessage(manifest=junk)]))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_slots_per_manifest" in error.details()
        huge = manifest(d_sae=1 << 28)
        error = rejected(lambda: client.ingest([pb.IngestMessage(manifest=huge)]))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "limits.max_d_sae" in error.details()
        for round_ in range(80):  # 80 x 64 = 5,120 junk SAEs, more than the registry's 4,096 places
            client.ingest([pb.IngestMessage(manifest=manifest(layers=tuple(range(64)), hash_prefix=f"junk{round_}-"))])
        assert running.core.counters["saes_retired"] >= 80 * 64
        assert_still_serving(client)
        contrast = pb.ContrastRequest(positives=pb.RequestSelector(request_ids=["nobody"]))
        assert (
            rejected(lambda: client.stub.Contrast(contrast, timeout=10)).code() == grpc.StatusCode.FAILED_PRECONDITION
        )


def test_features_of_all_saes_are_bounded_and_recover(tmp_path: Path) -> None:
    with running_sidecar(tmp_path, limits={"max_total_features": 200}) as (_, client):
        error = rejected(lambda: client.ingest([pb.IngestMessage(manifest=manifest(layers=(1, 2, 3, 4)))]))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_total_features" in error.details()
        assert_still_serving(client)  # two SAEs of 64 fit; the failed manifest registered nothing


def test_non_finite_activations_are_refused(tmp_path: Path) -> None:
    """NaN/Inf activations used to be accepted, poisoned FeatureStats means and wedged maintenance."""
    with running_sidecar(tmp_path) as (_, client):
        for value in (np.nan, np.inf, -np.inf):
            bad = pack_slice("poison", 0, 0, pb.PHASE_PROMPT, [1, 2], [0, 1, 2], [3, 4], [1.0, value])
            error = rejected(lambda bad=bad: client.ingest(
                [pb.IngestMessage(manifest=manifest()), pb.IngestMessage(codes=pb.CodeBatch(step=1, slices=[bad]))]
            ))  # fmt: skip
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "NaN or infinite" in error.details()
        assert_still_serving(client)
        stats = client.stub.FeatureStats(pb.FeatureStatsRequest(slot=0), timeout=10)
        assert all(np.isfinite(s.mean_activation) for s in stats.features)


def test_many_gaps_are_merged_or_refused_and_cost_a_good_request_nothing(tmp_path: Path) -> None:
    """500k producer gaps on one request used to make a good producer's request wait up to 2 s."""
    with running_sidecar(tmp_path) as (_, client):
        flood = pb.RequestGaps(
            request_id="gappy",
            gaps=[pb.Gap(slot=0, start=i, end=i + 1, reason=pb.GAP_REASON_BACKPRESSURE) for i in range(0, 10_000, 2)],
        )
        error = rejected(lambda: client.ingest([pb.IngestMessage(manifest=manifest()), pb.IngestMessage(gaps=flood)]))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_gaps_per_request" in error.details()
        adjacent = pb.RequestGaps(
            request_id="merged",
            gaps=[pb.Gap(slot=ALL_SLOTS, start=i, end=i + 1, reason=pb.GAP_REASON_BACKPRESSURE) for i in range(4000)],
        )
        finish = pb.RequestFinish(request_id="merged", num_positions=4000)
        client.ingest(
            [pb.IngestMessage(manifest=manifest()), pb.IngestMessage(gaps=adjacent), pb.IngestMessage(finish=finish)]
        )
        gaps = client.report("merged").coverage.gaps
        assert [(g.slot, g.start, g.end, g.reason) for g in gaps] == [(ALL_SLOTS, 0, 4000, pb.GAP_REASON_BACKPRESSURE)]
        assert_still_serving(client)


def test_open_requests_are_held_within_their_bounds(tmp_path: Path) -> None:
    """Never-finishing requests used to hold memory outside every budget until request_timeout_s. Past
    limits.max_open_requests (or open_requests_mb) the least recently active are finalised early, incomplete,
    with a SIDECAR_LIMIT gap over what had not arrived."""
    with running_sidecar(tmp_path, limits={"max_open_requests": 5}) as (running, client):
        stream = [pb.IngestMessage(manifest=manifest())]
        for i in range(12):
            request = good_request(f"open-{i}")
            stream.append(
                pb.IngestMessage(codes=pb.CodeBatch(step=i + 1, slices=[request.slice(s, 0, 2) for s in (0, 1)]))
            )
        client.ingest(stream)
        assert len(running.core._open) <= 5
        early = client.report("open-0")
        assert early.status == pb.REPORT_STATUS_INCOMPLETE
        assert {g.reason for g in early.coverage.gaps} == {pb.GAP_REASON_SIDECAR_LIMIT}
        assert any("max_open_requests" in n for n in early.notes)
    with running_sidecar(tmp_path / "mb", limits={"open_requests_mb": 0.02}) as (running, client):
        stream = [pb.IngestMessage(manifest=manifest())]
        for i in range(40):
            request = SyntheticRequest.random(np.random.default_rng(i), f"big-{i}")
            chunk = request.chunks(100)[0]
            stream.append(
                pb.IngestMessage(codes=pb.CodeBatch(step=i + 1, slices=[request.slice(s, *chunk) for s in (0, 1)]))
            )
        client.ingest(stream)
        running.core.tick()
        assert sum(s.nbytes for s in running.core._open.values()) <= 0.02 * 2**20
        assert running.core.counters["requests_ended_by_limits"] > 0


def test_request_ids_are_bounded_and_never_echoed_whole(tmp_path: Path) -> None:
    """4 MB request ids used to be kept in memory and SQLite, and an error echoing one exceeded gRPC's trailer
    limit (the client saw RESOURCE_EXHAUSTED instead of the error)."""
    long_id = "x" * 4_000_000
    with running_sidecar(tmp_path, max_message_bytes=8 << 20) as (_, client):
        error = rejected(lambda: client.report(long_id))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and len(error.details()) < 400
        start = pb.RequestStart(request_id="y" * 600)
        error = rejected(lambda: client.ingest([pb.IngestMessage(manifest=manifest()), pb.IngestMessage(start=start)]))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_request_id_bytes" in error.details()
        assert_still_serving(client)


def test_labels_are_bounded_and_atomic(tmp_path: Path) -> None:
    """Two 83 KB Label calls used to write 297 MB to the evidence store and break GetReport of the request."""
    with running_sidecar(tmp_path, limits={"max_label_changes_per_request": 4}) as (running, client):
        request = good_request("labelled")
        client.ingest(messages([request], np.random.default_rng(0)))
        huge = pb.LabelRequest(request_ids=["labelled"], add=["x" * 83_000])
        assert rejected(lambda: client.stub.Label(huge, timeout=10)).code() == grpc.StatusCode.INVALID_ARGUMENT
        many = pb.LabelRequest(request_ids=["labelled"] * 20_000, add=["y"])
        assert rejected(lambda: client.stub.Label(many, timeout=10)).code() == grpc.StatusCode.INVALID_ARGUMENT
        for i in range(3):
            assert client.stub.Label(pb.LabelRequest(request_ids=["labelled"], add=[f"l{i}"]), timeout=10).updated == 1
        over = client.stub.Label(pb.LabelRequest(request_ids=["labelled"], add=["a", "b"]), timeout=10)
        assert over.updated == 0 and "max_label_changes_per_request" in over.unresolved[0].reason
        assert len(client.report("labelled").feedback) == 3
        store = running.core.store
        before = store.feedback_count("labelled")
        with pytest.raises(Exception):  # noqa: B017, PT011 - any failure inside the batch: none of it stays
            store.add_feedback([("labelled", 1, "add", "ok", "a", ""), ("labelled", 2, "add", None, "a", "")])
        assert store.feedback_count("labelled") == before


def test_evidence_retention_deletes_old_reports(tmp_path: Path) -> None:
    with running_sidecar(tmp_path, evidence_retention_s=1, evidence_max_reports=3) as (running, client):
        requests = [good_request(f"kept-{i}") for i in range(5)]
        for request in requests:
            client.ingest(messages([request], np.random.default_rng(0)))
        assert running.core.store.count() == 5
        running.core.maintenance._last_prune_ns = 0
        running.core.maintenance.prune_evidence(time.time_ns())
        assert running.core.store.count() == 3  # the newest three, by evidence_max_reports
        running.core.maintenance._last_prune_ns = 0
        running.core.maintenance.prune_evidence(time.time_ns() + 2 * 10**9)
        assert running.core.store.count() == 0  # past evidence_retention_s


def test_a_report_that_cannot_be_built_is_still_reported_and_maintenance_goes_on(tmp_path: Path, monkeypatch) -> None:
    """One poisoned request used to make every maintenance tick fail, leaving other requests PENDING."""
    from circuitwatch.sidecar.reports import ReportBuilder

    original = ReportBuilder.build

    def build(self, state, *args, **kwargs):
        if state.request_id == "poisoned":
            raise FloatingPointError("simulated poison")
        return original(self, state, *args, **kwargs)

    monkeypatch.setattr(ReportBuilder, "build", build)
    with running_sidecar(tmp_path, finish_grace_ms=0) as (running, client):
        poisoned, waiting = good_request("poisoned"), good_request("waiting")
        client.ingest(messages([poisoned], np.random.default_rng(0)))
        stream = [pb.IngestMessage(manifest=manifest())]
        stream.append(pb.IngestMessage(codes=pb.CodeBatch(step=1, slices=[waiting.slice(s, 0, 2) for s in (0, 1)])))
        stream.append(pb.IngestMessage(finish=waiting.finish()))  # announces 3 positions, 2 arrive
        client.ingest(stream)
        running.core.tick()
        report = client.report("poisoned")
        assert report.status == pb.REPORT_STATUS_INCOMPLETE
        assert [g.reason for g in report.coverage.gaps] == [pb.GAP_REASON_SIDECAR_ERROR]
        assert any("simulated poison" in n for n in report.notes)
        assert client.report("waiting").status == pb.REPORT_STATUS_INCOMPLETE  # finalised by the tick


def test_unknown_enums_and_impossible_features_are_invalid_arguments(tmp_path: Path) -> None:
    with running_sidecar(tmp_path) as (_, client):
        client.ingest(messages([good_request()], np.random.default_rng(0)))
        for request in (pb.ContrastRequest(positives=pb.RequestSelector(labels=["x"]), scope=99),
                        pb.ContrastRequest(positives=pb.RequestSelector(labels=["x"]), mode=42)):  # fmt: skip
            error = rejected(lambda request=request: client.stub.Contrast(request, timeout=10))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown value" in error.details()
        beyond = pb.QueryRequestsRequest(expression=pb.Expr(feature=pb.FeatureTerm(slot=0, feature=70_000)))
        error = rejected(lambda: client.stub.QueryRequests(beyond, timeout=10))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "d_sae 64" in error.details()
        overflow = pb.QueryRequestsRequest(expression=pb.Expr(feature=pb.FeatureTerm(slot=0, feature=(1 << 28) + 1)))
        assert (
            rejected(lambda: client.stub.QueryRequests(overflow, timeout=10)).code() == grpc.StatusCode.INVALID_ARGUMENT
        )


def test_request_ids_are_escaped_in_logs(tmp_path: Path, caplog) -> None:
    """A request id with a newline used to write a forged line into the sidecar's log."""
    forged = "evil\n2026-01-01 00:00:00 INFO circuitwatch: all clear"
    with running_sidecar(tmp_path, finish_grace_ms=0) as (running, client):
        stream = [
            pb.IngestMessage(manifest=manifest()),
            pb.IngestMessage(finish=pb.RequestFinish(request_id=forged, num_positions=3)),
        ]
        client.ingest(stream)
        with caplog.at_level("WARNING"):
            running.core.tick()
        assert caplog.records and all("\n" not in r.getMessage() for r in caplog.records)
        assert any("evil\\n2026" in r.getMessage() for r in caplog.records)


def test_contract_version_in_ack() -> None:
    assert CONTRACT_VERSION >= 3
