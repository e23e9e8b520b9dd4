"""A real sidecar over 127.0.0.1 with real gRPC clients: ingest, reports, waits, watches, eviction, restart,
hot reload, malformed input, coverage gaps, recomputed positions, auth, TLS, health and reflection."""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest

from circuitwatch.proto import CONTRACT_VERSION
from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto import circuitwatch_pb2_grpc as pb_grpc
from circuitwatch.proto.codec import pack_slice
from circuitwatch.sidecar import SidecarConfig
from circuitwatch.sidecar.core import SidecarCore
from circuitwatch.sidecar.store import EvidenceStore

from support.sidecar_harness import (
    D_SAE,
    LAYERS,
    SyntheticRequest,
    brute_force_matches,
    codes_in_sidecar,
    manifest,
    messages,
    running_sidecar,
)
from support.tls import self_signed

FEATURE_3 = "circuits:\n  - {name: f3, severity: critical, when: {layer: 1, feature: 3}}\n"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_concurrent_producers_interleaved(tmp_path: Path) -> None:
    """4 producers at once, 60 requests, slices interleaved across requests: every code lands on its request."""
    rng = np.random.default_rng(1)
    groups = [[SyntheticRequest.random(rng, f"p{p}-r{i}") for i in range(15)] for p in range(4)]
    with running_sidecar(tmp_path, circuits=[write(tmp_path / "c.yaml", FEATURE_3)]) as (running, client):
        errors: list[Exception] = []

        def produce(requests, seed):
            try:
                client.ingest(messages(requests, np.random.default_rng(seed)))
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=produce, args=(g, i)) for i, g in enumerate(groups)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        everything = [r for g in groups for r in g]
        for request in everything:
            report = client.report(request.request_id)
            assert report.status == pb.REPORT_STATUS_COMPLETE, report.coverage
            assert (report.coverage.positions_total, report.coverage.positions_seen) == (request.num_positions,) * 2
            expected = brute_force_matches({"layer": 1, "feature": 3}, request)
            flags = {f.circuit: f.matching_tokens for f in report.flags}
            assert flags == ({"f3": len(expected)} if expected else {})
            assert [s.layer for s in report.saes] == [1, 2]
            assert codes_in_sidecar(client.stub, request.request_id) == {
                (slot, position): (request.tokens[position], row)
                for slot, rows in request.codes.items()
                for position, row in enumerate(rows)
            }
        for slot in (0, 1):
            stats = client.stub.FeatureStats(pb.FeatureStatsRequest(slot=slot))
            expected_counts = Counter(f for r in everything for row in r.codes[slot] for f in row)
            assert stats.tokens == sum(r.num_positions for r in everything)
            assert {s.feature: s.tokens for s in stats.features} == dict(expected_counts)
            first = stats.features[0]
            acts = [row[first.feature] for r in everything for row in r.codes[slot] if first.feature in row]
            assert first.mean_activation == pytest.approx(np.mean(acts), rel=1e-6)


def _slow_stream(request: SyntheticRequest, delay_s: float, ready: threading.Event):
    yield pb.IngestMessage(manifest=manifest())
    yield pb.IngestMessage(codes=pb.CodeBatch(step=1, slices=[request.slice(s, 0, request.num_prompt) for s in (0, 1)]))
    ready.set()
    time.sleep(delay_s)
    rest = (
        [request.slice(s, request.num_prompt, request.num_positions) for s in (0, 1)]
        if request.num_positions > request.num_prompt
        else []
    )
    yield pb.IngestMessage(codes=pb.CodeBatch(step=2, slices=rest))
    yield pb.IngestMessage(finish=request.finish())


def test_report_waits_for_finish_and_pending_past_deadline(tmp_path: Path) -> None:
    request = SyntheticRequest.random(np.random.default_rng(2), "slow")
    with running_sidecar(tmp_path) as (_, client):
        ready = threading.Event()
        producer = threading.Thread(target=lambda: client.stub.Ingest(_slow_stream(request, 0.8, ready)))
        producer.start()
        ready.wait(10)
        time.sleep(0.1)
        pending = client.report("slow", wait_ms=100)  # the producer is still asleep: past the wait, pending
        assert pending.status == pb.REPORT_STATUS_PENDING
        final = client.report("slow", wait_ms=5000)
        assert final.status == pb.REPORT_STATUS_COMPLETE
        producer.join()
        with pytest.raises(grpc.RpcError) as info:
            client.report("never-seen", wait_ms=50)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_watch_streams_flagged_reports(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    requests = [SyntheticRequest.random(rng, f"w{i}", d_sae=8) for i in range(12)]
    with running_sidecar(tmp_path, circuits=[write(tmp_path / "c.yaml", FEATURE_3)]) as (_, client):
        call = client.stub.WatchReports(pb.WatchReportsRequest(flagged_only=True))
        seen: list[str] = []

        def collect() -> None:
            try:
                seen.extend(r.request_id for r in call)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.CANCELLED

        watcher = threading.Thread(target=collect)
        watcher.start()
        time.sleep(0.3)
        client.ingest(messages(requests, rng))
        expected = {r.request_id for r in requests if brute_force_matches({"layer": 1, "feature": 3}, r)}
        deadline = time.monotonic() + 5
        while set(seen) != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        call.cancel()
        watcher.join()
        assert expected and set(seen) == expected and len(seen) == len(expected)


def test_eviction_by_window(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    old = [SyntheticRequest.random(rng, f"old{i}", d_sae=8) for i in range(5)]
    new = [SyntheticRequest.random(rng, f"new{i}", d_sae=8) for i in range(5)]
    index = {"window_s": 1.0, "segment_s": 0.2}
    with running_sidecar(tmp_path, circuits=[write(tmp_path / "c.yaml", FEATURE_3)], index=index) as (running, client):
        client.ingest(messages(old, rng))
        time.sleep(1.6)
        client.ingest(messages(new, rng))
        matched = {m.request_id for m in client.stub.QueryRequests(pb.QueryRequestsRequest(circuit="f3")).matches}
        assert matched == {r.request_id for r in new if brute_force_matches({"layer": 1, "feature": 3}, r)}
        assert matched
        assert running.core.index.evicted_segments > 0
        assert client.report("old0").status == pb.REPORT_STATUS_COMPLETE  # reports outlive the index window


def test_restart_keeps_reports(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    requests = [SyntheticRequest.random(rng, f"keep{i}") for i in range(6)]
    circuits = [write(tmp_path / "c.yaml", FEATURE_3)]
    with running_sidecar(tmp_path, circuits=circuits) as (_, client):
        client.ingest(messages(requests, rng))
        before = {r.request_id: client.report(r.request_id) for r in requests}
        # an open request at shutdown is finalised as incomplete, never left unreported
        client.ingest(
            [
                pb.IngestMessage(manifest=manifest()),
                pb.IngestMessage(codes=pb.CodeBatch(step=1, slices=[requests[0].slice(0, 0, 2)])),
            ]
        )
    with running_sidecar(tmp_path, circuits=circuits) as (_, client):
        for request_id, report in before.items():
            assert client.report(request_id, wait_ms=0) == report
    with running_sidecar(tmp_path, circuits=circuits) as (_, client):
        listed = client.stub.ListReports(pb.ListReportsRequest(request_ids=list(before)))
        assert {r.request_id for r in listed.reports} == set(before)
        window = pb.TimeRange(start_unix_nanos=min(r.finalized_unix_nanos for r in before.values()))
        assert len(client.stub.ListReports(pb.ListReportsRequest(window=window, limit=100)).reports) == len(before)


def test_open_request_at_shutdown_is_incomplete(tmp_path: Path) -> None:
    request = SyntheticRequest.random(np.random.default_rng(6), "cut-off")
    with running_sidecar(tmp_path) as (_, client):
        client.ingest(
            [
                pb.IngestMessage(manifest=manifest()),
                pb.IngestMessage(codes=pb.CodeBatch(step=1, slices=[request.slice(0, 0, 2), request.slice(1, 0, 2)])),
            ]
        )
    with running_sidecar(tmp_path) as (_, client):
        report = client.report("cut-off", wait_ms=0)
        assert report.status == pb.REPORT_STATUS_INCOMPLETE
        assert {g.reason for g in report.coverage.gaps} == {pb.GAP_REASON_STREAM_ENDED}
        assert report.coverage.positions_seen == 2


def test_hot_reload_good_and_bad(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    path = write(tmp_path / "c.yaml", FEATURE_3)
    with running_sidecar(tmp_path, circuits=[path]) as (_, client):
        write(path, FEATURE_3 + "  - {name: f4, when: {layer: 2, feature: 4}}\n")
        reply = client.stub.ReloadCircuits(pb.ReloadCircuitsRequest())
        assert reply.ok and list(reply.circuits) == ["f3", "f4"]
        write(path, "circuits:\n  - {name: broken, when: {layer: 2}}\n")
        reply = client.stub.ReloadCircuits(pb.ReloadCircuitsRequest())
        assert not reply.ok
        assert str(path) in reply.error and "circuits[0].when" in reply.error
        assert list(reply.circuits) == ["f3", "f4"]  # the old set stays active
        requests = [SyntheticRequest.random(rng, f"r{i}", d_sae=8) for i in range(8)]
        client.ingest(messages(requests, rng))
        for request in requests:
            flagged = {f.circuit for f in client.report(request.request_id).flags}
            expected = {
                name
                for name, term in (("f3", {"layer": 1, "feature": 3}), ("f4", {"layer": 2, "feature": 4}))
                if brute_force_matches(term, request)
            }
            assert flagged == expected


def _bad_slice() -> pb.RequestSlice:
    return pack_slice("bad", 0, 0, pb.PHASE_PROMPT, [1], [0, 1], [D_SAE + 5], [1.0])


@pytest.mark.parametrize(
    ("stream", "reason"),
    [
        ([pb.IngestMessage(codes=pb.CodeBatch(step=1))], "first ingest message must be a manifest"),
        (
            [
                pb.IngestMessage(manifest=pb.Manifest(contract_version=1)),
                pb.IngestMessage(
                    codes=pb.CodeBatch(step=1, slices=[pack_slice("bad", 0, 0, pb.PHASE_PROMPT, [], [0], [], [])])
                ),
            ],
            "slot 0 is not in the manifest",
        ),
        ([pb.IngestMessage(manifest=pb.Manifest(slots=manifest().slots))], "contract_version must be >= 1"),
        (
            [
                pb.IngestMessage(
                    manifest=pb.Manifest(contract_version=1, slots=[manifest().slots[0], manifest().slots[0]])
                )
            ],
            r"slots\[1\] \(slot 0\): slot number used twice",
        ),
        (
            [
                pb.IngestMessage(manifest=manifest()),
                pb.IngestMessage(codes=pb.CodeBatch(step=1, slices=[_bad_slice()])),
            ],
            "feature id 69 >= d_sae 64",
        ),
        (
            [
                pb.IngestMessage(manifest=manifest()),
                pb.IngestMessage(
                    codes=pb.CodeBatch(step=1, slices=[pack_slice("bad", 7, 0, pb.PHASE_PROMPT, [], [0], [], [])])
                ),
            ],
            "request 'bad': slot 7 is not in the manifest",
        ),
        (
            [
                pb.IngestMessage(manifest=manifest()),
                pb.IngestMessage(codes=pb.CodeBatch(step=2)),
                pb.IngestMessage(codes=pb.CodeBatch(step=2)),
            ],
            "step 2 after step 2",
        ),
        (
            [pb.IngestMessage(manifest=manifest()), pb.IngestMessage(finish=pb.RequestFinish())],
            "finish.request_id: a request id is required",
        ),
        ([pb.IngestMessage(manifest=manifest()), pb.IngestMessage(manifest=manifest())], "one manifest"),
    ],
)
def test_malformed_input_is_rejected_and_server_keeps_serving(tmp_path: Path, stream, reason: str) -> None:
    rng = np.random.default_rng(9)
    good = SyntheticRequest.random(rng, "good")
    with running_sidecar(tmp_path) as (_, client):
        # a valid slice for "bad" in the same batch as an invalid one must not be half-applied
        for message in stream:
            if message.WhichOneof("kind") == "codes" and message.codes.slices:
                message.codes.slices.insert(0, pack_slice("bad", 0, 0, pb.PHASE_PROMPT, [1], [0, 1], [3], [1.0]))
        with pytest.raises(grpc.RpcError) as info:
            client.ingest(stream)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() and __import__("re").search(reason, info.value.details()), info.value.details()
        with pytest.raises(grpc.RpcError):
            client.report("bad", wait_ms=0)
        client.ingest(messages([good], rng))
        assert client.report("good").status == pb.REPORT_STATUS_COMPLETE


def test_oversized_messages_are_refused_before_they_are_read(tmp_path: Path) -> None:
    """gRPC refuses a message over max_message_bytes from its length prefix, before reading it into memory; the
    server keeps serving. (The bound used to be checked after gRPC had parsed up to 256 MB.)"""
    request = SyntheticRequest.random(np.random.default_rng(10), "big")
    with running_sidecar(tmp_path, max_message_bytes=200) as (running, client):
        with pytest.raises(grpc.RpcError) as info:
            client.ingest(
                [
                    pb.IngestMessage(manifest=manifest()),
                    pb.IngestMessage(codes=pb.CodeBatch(step=1, slices=[request.slice(0, 0, request.num_prompt)] * 4)),
                ]
            )
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in info.value.details()
        assert running.core.counters["batches"] == 0  # nothing of it reached the sidecar
        small = SyntheticRequest("small", num_prompt=1, num_positions=1, tokens=[1])
        small.codes = {0: [{1: 1.0}], 1: [{2: 1.0}]}
        client.ingest(messages([small], np.random.default_rng(1)))
        assert client.report("small").status == pb.REPORT_STATUS_COMPLETE


def test_gaps_are_reported_never_hidden(tmp_path: Path) -> None:
    request = SyntheticRequest(request_id="gappy", num_prompt=10, num_positions=14)
    request.tokens = list(range(14))
    request.codes = {0: [{3: 1.0}] * 14, 1: [{3: 1.0}] * 14}
    circuits = [write(tmp_path / "c.yaml", FEATURE_3)]
    with running_sidecar(tmp_path, circuits=circuits, finish_grace_ms=200) as (_, client):
        prefix = pb.Gap(slot=0, start=0, end=4, reason=pb.GAP_REASON_PREFIX_CACHE)
        client.ingest(
            [
                pb.IngestMessage(manifest=manifest()),
                # slot 0: prefix-cache hit 0..3 (declared); slot 1: positions 4..5 never arrive (undeclared)
                pb.IngestMessage(
                    codes=pb.CodeBatch(
                        step=1, slices=[request.slice(0, 4, 10), request.slice(1, 0, 4), request.slice(1, 6, 10)]
                    )
                ),
                pb.IngestMessage(
                    codes=pb.CodeBatch(step=2, slices=[request.slice(0, 10, 14), request.slice(1, 10, 14)])
                ),
                pb.IngestMessage(
                    finish=request.finish(
                        gaps=[prefix, pb.Gap(slot=1, start=0, end=0, reason=pb.GAP_REASON_PREFIX_CACHE)]
                    )
                ),
            ]
        )
        report = client.report("gappy", wait_ms=5000)
        assert report.status == pb.REPORT_STATUS_INCOMPLETE
        gaps = {(g.slot, g.start, g.end, g.reason) for g in report.coverage.gaps if g.end > g.start}
        assert gaps == {(0, 0, 4, pb.GAP_REASON_PREFIX_CACHE), (1, 4, 6, pb.GAP_REASON_MISSING)}
        assert report.coverage.positions_total == 14
        assert report.coverage.positions_seen == 8  # positions with codes in both slots


def test_recomputed_positions_replace_earlier_codes(tmp_path: Path) -> None:
    """vLLM recomputes a preempted request: the later codes for a position win, in reports and queries."""
    first = SyntheticRequest(request_id="pre", num_prompt=6, num_positions=6, tokens=list(range(6)))
    first.codes = {0: [{}, {}, {3: 2.0}, {}, {}, {}], 1: [{}] * 6}
    again = SyntheticRequest(request_id="pre", num_prompt=6, num_positions=6, tokens=list(range(6)))
    again.codes = {0: [{}, {}, {5: 2.0}, {}, {3: 1.0}, {}], 1: [{}] * 6}
    with running_sidecar(tmp_path, circuits=[write(tmp_path / "c.yaml", FEATURE_3)]) as (_, client):
        client.ingest(
            [
                pb.IngestMessage(manifest=manifest()),
                pb.IngestMessage(codes=pb.CodeBatch(step=1, slices=[first.slice(0, 0, 6), first.slice(1, 0, 6)])),
                pb.IngestMessage(codes=pb.CodeBatch(step=2, slices=[again.slice(0, 0, 6), again.slice(1, 0, 6)])),
                pb.IngestMessage(finish=again.finish()),
            ]
        )
        [flag] = client.report("pre").flags
        assert flag.matching_tokens == 1 and [e.position for e in flag.evidence] == [4]
        [match] = client.stub.QueryRequests(pb.QueryRequestsRequest(circuit="f3")).matches
        assert list(match.positions) == [4]
        latest = codes_in_sidecar(client.stub, "pre")
        assert {p: row for (slot, p), (_, row) in latest.items() if slot == 0} == dict(enumerate(again.codes[0]))
        stats = {s.feature: s.tokens for s in client.stub.FeatureStats(pb.FeatureStatsRequest(slot=0)).features}
        assert stats == {5: 1, 3: 1}


def test_bearer_token(tmp_path: Path) -> None:
    token_file = write(tmp_path / "token", "s3cret\n")
    with running_sidecar(tmp_path, auth_token_file=token_file) as (running, client):
        with pytest.raises(grpc.RpcError) as info:
            client.report("x", wait_ms=0)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            client.ingest([pb.IngestMessage(manifest=manifest())], metadata=[("authorization", "Bearer wrong")])
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ack = client.ingest([pb.IngestMessage(manifest=manifest())], metadata=[("authorization", "Bearer s3cret")])
        assert ack.contract_version == CONTRACT_VERSION
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        health = health_pb2_grpc.HealthStub(client.channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_tls(tmp_path: Path) -> None:
    from circuitwatch.sidecar import SidecarConfig
    from circuitwatch.sidecar.server import start

    cert, key = self_signed(tmp_path, "localhost", ip="127.0.0.1")
    running = start(
        SidecarConfig(listen="127.0.0.1:0", evidence_dir=tmp_path / "ev", tls={"cert_file": cert, "key_file": key})
    )
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(f"localhost:{running.port}", credentials) as channel:
            ack = pb_grpc.MonitorStub(channel).Ingest(iter([pb.IngestMessage(manifest=manifest())]), timeout=10)
            assert ack.contract_version == CONTRACT_VERSION
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel, pytest.raises(grpc.RpcError):
            pb_grpc.MonitorStub(channel).GetReport(pb.GetReportRequest(request_id="x"), timeout=2)
    finally:
        running.stop(1)


def test_reflection_lists_services(tmp_path: Path) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with running_sidecar(tmp_path) as (_, client):
        stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
        [response] = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in response.list_services_response.service}
        assert {"circuitwatch.v1.Monitor", "grpc.health.v1.Health"} <= names


CONTROL = pb.Manifest(contract_version=1, producer="engine-core", instance_id="core")


def test_finish_may_overtake_codes_on_another_stream(tmp_path: Path) -> None:
    """vLLM's engine core sends the finish; a worker sends the codes: the report waits for the codes."""
    request = SyntheticRequest.random(np.random.default_rng(11), "overtaken")
    with running_sidecar(tmp_path) as (running, client):
        client.ingest([pb.IngestMessage(manifest=CONTROL), pb.IngestMessage(finish=request.finish())])
        assert client.report("overtaken", wait_ms=0).status == pb.REPORT_STATUS_PENDING
        slices = [request.slice(s, a, b) for a, b in request.chunks(5) for s in (0, 1)]
        client.ingest(
            [pb.IngestMessage(manifest=manifest()), pb.IngestMessage(codes=pb.CodeBatch(step=1, slices=slices))]
        )
        report = client.report("overtaken", wait_ms=0)  # final as soon as the last codes arrived
        assert report.status == pb.REPORT_STATUS_COMPLETE
        assert report.coverage.positions_seen == request.num_positions


def test_a_finished_request_is_final_before_the_rest_of_its_engine_step(tmp_path: Path) -> None:
    """One engine step carries the last codes of a request whose finish came first and another request's codes
    (first on the wire): the finished one's report is built as soon as its own slices are in, so it waits for
    its codes, not for every other request's slices of the step."""
    rng = np.random.default_rng(13)
    done, other = SyntheticRequest.random(rng, "done"), SyntheticRequest.random(rng, "other")
    core = SidecarCore(SidecarConfig(evidence_dir=tmp_path), EvidenceStore(tmp_path))
    other_postings_at_report = []

    def listener(report: pb.Report) -> None:
        if report.request_id == "done":
            state = core.open_state("other")  # its slices are indexed, none added to it yet
            other_postings_at_report.append(state.postings if state is not None else 0)

    core.watchers.listeners.append(listener)
    codes, control = core.open_stream(manifest()), core.open_stream(CONTROL)
    core.ingest(control, pb.IngestMessage(finish=done.finish()))
    slices = [r.slice(s, a, b) for r in (other, done) for a, b in r.chunks(1000) for s in (0, 1)]
    core.ingest(codes, pb.IngestMessage(codes=pb.CodeBatch(step=1, slices=slices)))
    assert core.finals.get("done").status == pb.REPORT_STATUS_COMPLETE
    assert other_postings_at_report == [0]
    assert core.open_state("other").postings == sum(len(row) for rows in other.codes.values() for row in rows) > 0


def test_a_request_made_final_during_the_hand_off_gets_none_of_the_rest_of_the_step(tmp_path: Path) -> None:
    """The step's other slices are added after the hand-off, in a lock section of their own: a request another
    thread made final in between (here: ended by the open-requests limit, as the maintenance thread may) gets none
    of them, and they count as late postings, as codes arriving after a report always have."""
    done, other, slices = _finishing_step(np.random.default_rng(17))
    core = SidecarCore(SidecarConfig(evidence_dir=tmp_path), EvidenceStore(tmp_path))
    hand_off = core.watchers.hand_off

    def ending_other() -> None:
        hand_off()
        with core.lock:
            core.end_least_active(1, "max_open_requests")  # "done" is final: "other" is the one open

    core.watchers.hand_off = ending_other
    codes, control = core.open_stream(manifest()), core.open_stream(CONTROL)
    core.ingest(control, pb.IngestMessage(finish=done.finish()))
    core.ingest(codes, pb.IngestMessage(codes=pb.CodeBatch(step=1, slices=slices)))
    assert core.finals.get("done").status == pb.REPORT_STATUS_COMPLETE
    ended = core.finals.get("other")
    assert ended.status == pb.REPORT_STATUS_INCOMPLETE and ended.coverage.positions_seen == 0
    assert not core.is_open("other")
    assert core.counters["late_postings"] == sum(len(row) for rows in other.codes.values() for row in rows) > 0


def test_a_circuit_reload_during_the_hand_off_matches_the_rest_of_the_step_against_the_new_terms(
    tmp_path: Path,
) -> None:
    """Which codes a circuit term names is worked out for the whole step before the hand-off; a reload in between
    makes the step's other slices matched against the reloaded circuits, not the old ones."""
    done, other, slices = _finishing_step(np.random.default_rng(19))
    position, row = next((p, r) for p, r in enumerate(other.codes[0]) if r)
    feature = next(iter(row))
    unused = next(f for f in range(D_SAE) if all(f not in r for rows in other.codes.values() for r in rows))
    circuits = tmp_path / "circuits.yaml"
    circuit = "circuits:\n  - {{name: {name}, severity: high, when: {{layer: {layer}, feature: {feature}}}}}\n"
    circuits.write_text(circuit.format(name="before", layer=LAYERS[0], feature=unused))
    core = SidecarCore(SidecarConfig(evidence_dir=tmp_path, circuits=[circuits]), EvidenceStore(tmp_path))
    hand_off = core.watchers.hand_off

    def reloading() -> None:
        hand_off()
        circuits.write_text(circuit.format(name="after", layer=LAYERS[0], feature=feature))
        assert core.reload_circuits().ok

    core.watchers.hand_off = reloading
    codes, control = core.open_stream(manifest()), core.open_stream(CONTROL)
    core.ingest(control, pb.IngestMessage(finish=done.finish()))
    core.ingest(codes, pb.IngestMessage(codes=pb.CodeBatch(step=1, slices=slices)))
    core.ingest(control, pb.IngestMessage(finish=other.finish()))
    report = core.finals.get("other")
    assert report.status == pb.REPORT_STATUS_COMPLETE
    [flag] = report.flags
    assert flag.circuit == "after" and position in {t.position for t in flag.evidence}


def test_finishes_carried_by_a_code_batch_go_first_and_equal_finishes_sent_after_it(tmp_path: Path) -> None:
    """A producer that knows which requests finished with a step (the engine core in the worker's process) sends
    their finishes inside that step's code batch: the request is final as soon as its own slices are in, before the
    step's other slices, and its report equals the one made from the same codes with the finish sent after."""
    rng = np.random.default_rng(21)
    done, other = SyntheticRequest.random(rng, "done"), SyntheticRequest.random(rng, "other")
    earlier = SyntheticRequest.random(rng, "earlier")  # its codes all came with the step before
    empty = SyntheticRequest(request_id="empty", num_prompt=0, num_positions=0, tokens=[])
    slices = [r.slice(s, a, b) for r in (other, done) for a, b in r.chunks(1000) for s in (0, 1)]
    before = [earlier.slice(s, a, b) for a, b in earlier.chunks(1000) for s in (0, 1)]
    finished = ("done", "earlier", "empty")
    reports = {}
    for way in ("in the batch", "after the batch"):
        core = SidecarCore(SidecarConfig(evidence_dir=tmp_path / way), EvidenceStore(tmp_path / way))
        other_postings_at_report: dict[str, int] = {}

        def listener(report: pb.Report, core=core, seen=other_postings_at_report) -> None:
            seen[report.request_id] = _postings_of(core, "other")

        core.watchers.listeners.append(listener)
        codes = core.open_stream(manifest())
        core.ingest(codes, pb.IngestMessage(codes=pb.CodeBatch(step=1, slices=before)))
        finishes = [done.finish(), earlier.finish(), empty.finish()]
        if way == "in the batch":
            core.ingest(codes, pb.IngestMessage(codes=pb.CodeBatch(step=2, slices=slices, finishes=finishes)))
            # each was final before any of "other"'s codes went in
            assert other_postings_at_report == {r: 0 for r in finished}
        else:
            core.ingest(codes, pb.IngestMessage(codes=pb.CodeBatch(step=2, slices=slices)))
            for finish in finishes:
                core.ingest(codes, pb.IngestMessage(finish=finish))
        assert core.open_state("other").postings > 0 and core.open_state("other").pending_finish is None
        assert codes.finished == 3
        reports[way] = {r: core.finals.get(r) for r in finished}
    for request_id in finished:
        first, second = reports["in the batch"][request_id], reports["after the batch"][request_id]
        for report in (first, second):
            for when in ("arrival_unix_nanos", "finalized_unix_nanos", "inputs_received_unix_nanos"):  # the clock's
                report.ClearField(when)
        assert first == second
    assert reports["in the batch"]["done"].status == pb.REPORT_STATUS_COMPLETE
    assert reports["in the batch"]["done"].coverage.positions_seen == done.num_positions


def test_a_bad_finish_in_a_code_batch_refuses_the_whole_batch(tmp_path: Path) -> None:
    """Validated with the slices, before any of the batch is applied."""
    request = SyntheticRequest.random(np.random.default_rng(22), "whole")
    slices = [request.slice(s, a, b) for a, b in request.chunks(1000) for s in (0, 1)]
    bad = pb.RequestFinish(request_id="x" * 10_000, num_positions=1)
    with running_sidecar(tmp_path) as (running, client):
        batch = pb.CodeBatch(step=1, slices=slices, finishes=[request.finish(), bad])
        with pytest.raises(grpc.RpcError) as refused:
            client.ingest([pb.IngestMessage(manifest=manifest()), pb.IngestMessage(codes=batch)])
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "codes.finishes[1].request_id" in refused.value.details()
        assert not running.core.is_open("whole") and running.core.finals.get("whole") is None


def _finishing_step(rng: np.random.Generator) -> tuple[SyntheticRequest, SyntheticRequest, list]:
    """Requests "done" (finish sent first) and "other", and one engine step with all their codes, "other" first."""
    done, other = SyntheticRequest.random(rng, "done"), SyntheticRequest.random(rng, "other")
    slices = [r.slice(s, a, b) for r in (other, done) for a, b in r.chunks(1000) for s in (0, 1)]
    return done, other, slices


def _postings_of(core: SidecarCore, request_id: str) -> int:
    state = core.open_state(request_id)
    return state.postings if state is not None else 0


def test_a_report_reaches_its_watch_stream_before_the_rest_of_its_engine_step(tmp_path: Path) -> None:
    """Through the real server: the WatchReports stream sends the finished request's report while ingest waits
    (hand-off) with the step's other slices; before, the stream's thread waited for the interpreter until the
    whole step was in."""
    done, other, slices = _finishing_step(np.random.default_rng(13))
    with running_sidecar(tmp_path) as (running, client):
        core = running.core
        core.watchers.handoff_s = 30.0  # ends as soon as the stream has sent the report
        registered, sent_while = threading.Event(), []
        watch_reports, answered = core.watchers.watch_reports, core.watchers.answered

        def watching(flagged_only: bool):
            watcher = watch_reports(flagged_only)
            registered.set()
            return watcher

        def answering(reader) -> None:  # called by the servicer once gRPC has sent a report
            sent_while.append(_postings_of(core, "other"))
            answered(reader)

        core.watchers.watch_reports, core.watchers.answered = watching, answering
        call = client.stub.WatchReports(pb.WatchReportsRequest())
        received: list[str] = []
        reader = threading.Thread(target=lambda: received.extend(r.request_id for r in itertools.islice(call, 2)))
        reader.start()
        assert registered.wait(10)
        client.ingest([pb.IngestMessage(manifest=CONTROL), pb.IngestMessage(finish=done.finish())])
        client.ingest(
            [pb.IngestMessage(manifest=manifest()), pb.IngestMessage(codes=pb.CodeBatch(step=1, slices=slices))]
        )
        client.ingest([pb.IngestMessage(manifest=CONTROL), pb.IngestMessage(finish=other.finish())])
        reader.join(10)
        call.cancel()
        assert received == ["done", "other"]
        assert sent_while[0] == 0  # "done" was sent before any of "other"'s codes went in
        assert core.counters["handoff_timeouts"] == 0
        assert core.finals.get("other").coverage.positions_seen == other.num_positions


def test_a_get_report_waiter_answers_before_the_rest_of_its_engine_step(tmp_path: Path) -> None:
    """A GetReport waiting on the finished request answers while ingest waits with the step's other slices."""
    done, other, slices = _finishing_step(np.random.default_rng(14))
    core = SidecarCore(SidecarConfig(evidence_dir=tmp_path), EvidenceStore(tmp_path))
    core.watchers.handoff_s = 30.0
    codes, control = core.open_stream(manifest()), core.open_stream(CONTROL)
    core.ingest(control, pb.IngestMessage(finish=done.finish()))
    waiting, answered_while = threading.Event(), []
    waiter, with_feedback = core.finals.waiter, core.finals.with_feedback

    def registering(request_id: str) -> threading.Event:
        event = waiter(request_id)
        waiting.set()
        return event

    def answering(report: pb.Report) -> pb.Report:  # the waiter's last step before it answers
        answered_while.append(_postings_of(core, "other"))
        return with_feedback(report)

    core.finals.waiter, core.finals.with_feedback = registering, answering
    answers: list[pb.Report] = []
    reader = threading.Thread(target=lambda: answers.append(core.get_report("done", 30_000)))
    reader.start()
    assert waiting.wait(10)
    core.ingest(codes, pb.IngestMessage(codes=pb.CodeBatch(step=1, slices=slices)))
    reader.join(10)
    assert [a.status for a in answers] == [pb.REPORT_STATUS_COMPLETE]
    assert answered_while == [0]
    assert core.counters["handoff_timeouts"] == 0
    assert _postings_of(core, "other") == sum(len(row) for rows in other.codes.values() for row in rows)


def test_a_watch_stream_that_does_not_read_delays_ingest_once_and_boundedly(tmp_path: Path) -> None:
    """A client that opens WatchReports and never reads is awaited once, for handoff_s, and never again (its
    queue has a backlog): it cannot slow ingest step after step."""
    rng = np.random.default_rng(15)
    core = SidecarCore(SidecarConfig(evidence_dir=tmp_path), EvidenceStore(tmp_path))
    core.watchers.handoff_s = 0.05
    silent = core.watchers.watch_reports(flagged_only=False)
    codes, control = core.open_stream(manifest()), core.open_stream(CONTROL)
    for step in range(1, 4):
        done = SyntheticRequest.random(rng, f"done-{step}")
        other = SyntheticRequest.random(rng, f"other-{step}")
        core.ingest(control, pb.IngestMessage(finish=done.finish()))
        slices = [r.slice(s, a, b) for r in (other, done) for a, b in r.chunks(1000) for s in (0, 1)]
        core.ingest(codes, pb.IngestMessage(codes=pb.CodeBatch(step=step, slices=slices)))
        assert core.finals.get(f"done-{step}").status == pb.REPORT_STATUS_COMPLETE
        assert core.counters["handoff_timeouts"] == 1
    assert silent.queue.qsize() == 3  # nothing dropped for it either


def test_finish_without_all_codes_is_incomplete_after_grace(tmp_path: Path) -> None:
    request = SyntheticRequest.random(np.random.default_rng(12), "short")
    with running_sidecar(tmp_path, finish_grace_ms=300) as (_, client):
        client.ingest(
            [
                pb.IngestMessage(manifest=manifest()),
                pb.IngestMessage(codes=pb.CodeBatch(step=1, slices=[request.slice(0, 0, 2), request.slice(1, 0, 2)])),
                pb.IngestMessage(finish=request.finish()),
            ]
        )
        report = client.report("short", wait_ms=5000)
        assert report.status == pb.REPORT_STATUS_INCOMPLETE
        assert {(g.slot, g.start, g.end, g.reason) for g in report.coverage.gaps} == {
            (slot, 2, request.num_positions, pb.GAP_REASON_MISSING) for slot in (0, 1)
        }
        never = SyntheticRequest.random(np.random.default_rng(13), "never-coded")
        client.ingest([pb.IngestMessage(manifest=CONTROL), pb.IngestMessage(finish=never.finish())])
        report = client.report("never-coded", wait_ms=5000)
        assert report.status == pb.REPORT_STATUS_INCOMPLETE
        assert [(g.slot, g.start, g.end) for g in report.coverage.gaps] == [(0xFFFFFFFF, 0, never.num_positions)]


def test_declared_gaps_finalise_without_waiting(tmp_path: Path) -> None:
    request = SyntheticRequest(request_id="dropped", num_prompt=8, num_positions=8, tokens=list(range(8)))
    request.codes = {0: [{1: 1.0}] * 8, 1: [{1: 1.0}] * 8}
    with running_sidecar(tmp_path, finish_grace_ms=60_000) as (_, client):
        dropped = [pb.Gap(slot=s, start=4, end=8, reason=pb.GAP_REASON_BACKPRESSURE) for s in (0, 1)]
        client.ingest(
            [
                pb.IngestMessage(manifest=manifest()),
                pb.IngestMessage(start=pb.RequestStart(request_id="dropped", gaps=[pb.Gap(slot=0, start=0, end=0)])),
                pb.IngestMessage(codes=pb.CodeBatch(step=1, slices=[request.slice(0, 0, 4), request.slice(1, 0, 4)])),
                pb.IngestMessage(gaps=pb.RequestGaps(request_id="dropped", gaps=dropped)),
            ]
        )
        client.ingest([pb.IngestMessage(manifest=CONTROL), pb.IngestMessage(finish=request.finish())])
        report = client.report("dropped", wait_ms=0)
        assert report.status == pb.REPORT_STATUS_INCOMPLETE
        assert {(g.slot, g.start, g.end, g.reason) for g in report.coverage.gaps if g.end > g.start} == {
            (0, 4, 8, pb.GAP_REASON_BACKPRESSURE),
            (1, 4, 8, pb.GAP_REASON_BACKPRESSURE),
        }


def test_abort_actions_are_announced_once_for_the_matching_request(tmp_path: Path) -> None:
    circuits = write(
        tmp_path / "c.yaml",
        "circuits:\n"
        "  - {name: stop-f5, action: abort, severity: critical, when: {layer: 1, feature: 5, min_activation: 1.0}}\n",
    )
    hit = SyntheticRequest(request_id="hit", num_prompt=6, num_positions=6, tokens=list(range(6)))
    hit.codes = {0: [{}, {5: 2.0}, {}, {5: 3.0}, {}, {}], 1: [{}] * 6}
    miss = SyntheticRequest(request_id="miss", num_prompt=6, num_positions=6, tokens=list(range(6)))
    miss.codes = {0: [{5: 0.5}] * 6, 1: [{5: 2.0}] * 6}  # below threshold / other layer
    with running_sidecar(tmp_path, circuits=[circuits]) as (_, client):
        call = client.stub.WatchActions(pb.WatchActionsRequest())
        notices: list[pb.ActionNotice] = []

        def collect() -> None:
            try:
                notices.extend(call)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.CANCELLED

        watcher = threading.Thread(target=collect)
        watcher.start()
        time.sleep(0.3)
        client.ingest(
            [
                pb.IngestMessage(manifest=manifest()),
                pb.IngestMessage(
                    codes=pb.CodeBatch(step=1, slices=[r.slice(s, 0, 2) for r in (hit, miss) for s in (0, 1)])
                ),
                pb.IngestMessage(
                    codes=pb.CodeBatch(step=2, slices=[r.slice(s, 2, 6) for r in (hit, miss) for s in (0, 1)])
                ),
            ]
        )
        deadline = time.monotonic() + 5
        while not notices and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        call.cancel()
        watcher.join()
        assert [(n.request_id, n.circuit, n.action, n.matching_tokens) for n in notices] == [
            ("hit", "stop-f5", "abort", 1)
        ]


def test_an_empty_declared_gap_does_not_make_a_report_incomplete(tmp_path: Path) -> None:
    request = SyntheticRequest.random(np.random.default_rng(14), "covered")
    with running_sidecar(tmp_path) as (_, client):
        empty = [pb.Gap(slot=0, start=3, end=3, reason=pb.GAP_REASON_PREFIX_CACHE)]
        client.ingest(
            [
                pb.IngestMessage(manifest=manifest()),
                pb.IngestMessage(start=pb.RequestStart(request_id="covered", gaps=empty)),
                pb.IngestMessage(
                    codes=pb.CodeBatch(
                        step=1, slices=[request.slice(s, a, b) for a, b in request.chunks(5) for s in (0, 1)]
                    )
                ),
                pb.IngestMessage(finish=request.finish()),
            ]
        )
        report = client.report("covered")
        assert report.status == pb.REPORT_STATUS_COMPLETE
        assert list(report.coverage.gaps) == []


def test_one_request_served_by_two_producers(tmp_path: Path) -> None:
    """Under tensor parallelism rank 0 encodes the residual slot and rank 1 the per-head slot of a head it holds
    (plugin/slots.py): two streams, one config's slot numbers, one request. The report waits for both ranks'
    codes and names both SAEs, the per-head one with its head."""
    request = SyntheticRequest.random(np.random.default_rng(12), "two-ranks")
    rank0 = manifest(layers=(1,))
    rank1 = pb.Manifest()
    rank1.CopyFrom(manifest(layers=(1, 1), hash_prefix="head"))
    del rank1.slots[0]  # rank 1 sends slot 1 only
    rank1.slots[0].hook_point, rank1.slots[0].head, rank1.slots[0].name = "attn_z", 2, "sae-l1-h2"
    rank1.instance_id = "rank-1"
    with running_sidecar(tmp_path) as (running, client):

        def codes(slot: int) -> list[pb.IngestMessage]:
            slices = [request.slice(slot, a, b) for a, b in request.chunks(5)]
            return [pb.IngestMessage(codes=pb.CodeBatch(step=1, slices=slices))]

        start = pb.IngestMessage(start=pb.RequestStart(request_id="two-ranks", num_prompt_tokens=request.num_prompt))
        client.ingest([pb.IngestMessage(manifest=rank0), start, *codes(0)])
        # the engine core's finish names every configured slot
        client.ingest([pb.IngestMessage(manifest=CONTROL), pb.IngestMessage(finish=request.finish(slots=[0, 1]))])
        assert client.report("two-ranks", wait_ms=0).status == pb.REPORT_STATUS_PENDING, "rank 1 is still missing"
        client.ingest([pb.IngestMessage(manifest=rank1), start, *codes(1)])
        report = client.report("two-ranks", wait_ms=0)
        assert report.status == pb.REPORT_STATUS_COMPLETE, report.coverage
        named = {(s.slot, s.hook_point, s.head if s.HasField("head") else None) for s in report.saes}
        assert named == {(0, "resid_post", None), (1, "attn_z", 2)}
        stored = codes_in_sidecar(client.stub, "two-ranks")
        for slot in (0, 1):
            assert [stored[(slot, p)][1] for p in range(request.num_positions)] == request.codes[slot]


def test_a_producer_never_heard_from_is_a_gap_over_every_position(tmp_path: Path) -> None:
    request = SyntheticRequest.random(np.random.default_rng(13), "rank-1-down")
    with running_sidecar(tmp_path, finish_grace_ms=50) as (running, client):
        slices = [request.slice(0, a, b) for a, b in request.chunks(5)]
        client.ingest(
            [
                pb.IngestMessage(manifest=manifest(layers=(1,))),
                pb.IngestMessage(codes=pb.CodeBatch(step=1, slices=slices)),
            ]
        )
        client.ingest([pb.IngestMessage(manifest=CONTROL), pb.IngestMessage(finish=request.finish(slots=[0, 1]))])
        report = client.report("rank-1-down", wait_ms=3000)
        while report.status == pb.REPORT_STATUS_PENDING:
            report = client.report("rank-1-down", wait_ms=1000)
        assert report.status == pb.REPORT_STATUS_INCOMPLETE
        assert [(g.slot, g.start, g.end, g.reason) for g in report.coverage.gaps] == [
            (1, 0, request.num_positions, pb.GAP_REASON_MISSING)
        ]


def test_a_head_needs_attn_z(tmp_path: Path) -> None:
    bad = manifest(layers=(1,))
    bad.slots[0].head = 0  # on resid_post
    with running_sidecar(tmp_path) as (running, client):
        with pytest.raises(grpc.RpcError) as info:
            client.ingest([pb.IngestMessage(manifest=bad)])
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "head 0 needs hook_point attn_z" in info.value.details()


def test_a_report_says_when_its_last_input_came_the_later_of_its_last_codes_and_its_finish(tmp_path: Path) -> None:
    """Report.inputs_received_unix_nanos is when the message with the request's last codes, or its finish, came
    off its stream, whichever was later: a later code batch of other requests does not move it."""
    rng = np.random.default_rng(17)
    finish_first = SyntheticRequest.random(rng, "finish-first")
    codes_first = SyntheticRequest.random(rng, "codes-first")
    core = SidecarCore(SidecarConfig(evidence_dir=tmp_path), EvidenceStore(tmp_path))
    codes, control = core.open_stream(manifest()), core.open_stream(CONTROL)

    def batch(step: int, request: SyntheticRequest) -> pb.IngestMessage:
        slices = [request.slice(s, a, b) for a, b in request.chunks(1000) for s in (0, 1)]
        return pb.IngestMessage(codes=pb.CodeBatch(step=step, slices=slices))

    core.ingest(control, pb.IngestMessage(finish=finish_first.finish()), received_ns=1_000)
    core.ingest(codes, batch(1, codes_first), received_ns=2_000)
    core.ingest(codes, batch(2, finish_first), received_ns=3_000)  # its last codes: final now
    core.ingest(control, pb.IngestMessage(finish=codes_first.finish()), received_ns=4_000)  # final now
    assert core.finals.get("finish-first").inputs_received_unix_nanos == 3_000
    assert core.finals.get("codes-first").inputs_received_unix_nanos == 4_000
    for request_id in ("finish-first", "codes-first"):
        assert core.finals.get(request_id).status == pb.REPORT_STATUS_COMPLETE


def test_report_latency_counts_the_wait_for_the_sidecar_from_when_the_codes_came_off_the_stream(
    tmp_path: Path,
) -> None:
    """Through the real server: the arrival is taken as the message comes off its ingest stream, before the
    ingesting thread waits for the core, so a sidecar busy elsewhere (here: its lock held for 0.3 s) shows in
    the report's latency instead of hiding in it."""
    request = SyntheticRequest.random(np.random.default_rng(19), "waited")
    slices = [request.slice(s, a, b) for a, b in request.chunks(1000) for s in (0, 1)]
    batch = pb.CodeBatch(step=1, slices=slices, finishes=[request.finish()])
    locked = threading.Event()

    def stream():
        yield pb.IngestMessage(manifest=manifest())
        locked.wait(30)  # the stream is open; the core is busy from now on
        yield pb.IngestMessage(codes=batch)

    with running_sidecar(tmp_path) as (running, client):
        streams = running.core.counters["streams"]
        sending = threading.Thread(target=client.stub.Ingest, args=(stream(),), kwargs={"timeout": 60})
        sending.start()
        while running.core.counters["streams"] == streams:
            time.sleep(0.01)
        with running.core.lock:
            locked.set()
            sent = time.time_ns()
            time.sleep(0.3)
            released = time.time_ns()
        sending.join(30)
        report = client.report("waited")
    assert report.status == pb.REPORT_STATUS_COMPLETE
    assert sent <= report.inputs_received_unix_nanos < released
    assert report.finalized_unix_nanos >= released > report.inputs_received_unix_nanos
