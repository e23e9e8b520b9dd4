"""Circuit identification through a real sidecar over gRPC: contrast counts, ranks, pairs and evaluation checked
against a brute-force recount over the synthetic requests' codes (plain Python sets, no index involved)."""

from __future__ import annotations

import itertools
import subprocess
from collections import defaultdict
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.sidecar import SidecarConfig
from circuitwatch.sidecar.circuits import load_circuit_files
from circuitwatch.sidecar.config import MaintenanceConfig
from circuitwatch.sidecar.core import SidecarCore
from circuitwatch.sidecar.identify import roc_auc
from circuitwatch.sidecar.request_index import SEGMENT_REQUESTS
from circuitwatch.sidecar.store import EvidenceStore

from support.processes import CLI
from support.sidecar_harness import LAYERS, SyntheticRequest, manifest, messages, running_sidecar

MODES = {
    "codes": pb.CODE_MODE_CODES,
    "argmax_token": pb.CODE_MODE_ARGMAX_TOKEN,
    "argmax_mean": pb.CODE_MODE_ARGMAX_MEAN,
}
SCOPES = {"prompt": pb.SCOPE_PROMPT, "generated": pb.SCOPE_GENERATED, "both": pb.SCOPE_BOTH}
PLANTED = ((0, 5), (1, 11))  # (slot, feature) present on every positive, on no negative


# --- brute force -------------------------------------------------------------------------------------------


def expected_set(request: SyntheticRequest, mode: str, scope: str) -> set[tuple[int, int]]:
    """The (slot, feature) set a request carries, recomputed position by position from its codes."""
    positions = [
        p for p in range(request.num_positions) if scope == "both" or (p < request.num_prompt) == (scope == "prompt")
    ]
    found = set()
    for slot, rows in request.codes.items():
        if mode == "codes":
            found |= {(slot, f) for p in positions for f in rows[p]}
        elif mode == "argmax_token":
            found |= {(slot, min(rows[p], key=lambda f, p=p: (-rows[p][f], f))) for p in positions if rows[p]}
        else:
            sums: dict[int, float] = defaultdict(float)
            for p in positions:
                for f, a in rows[p].items():
                    sums[f] += a
            if sums:
                found.add((slot, min(sums, key=lambda f: (-sums[f], f))))
    return found


def with_labels(requests: list[SyntheticRequest], labels: dict[str, list[str]], rng) -> list[pb.IngestMessage]:
    """Ingest messages with a RequestStart (labels) before each request's codes."""
    out = messages(requests, rng)
    starts = [
        pb.IngestMessage(start=pb.RequestStart(request_id=r.request_id, labels=labels.get(r.request_id, [])))
        for r in requests
    ]
    return [out[0], *starts, *out[1:]]


def traffic(rng: np.random.Generator, count: int, planted_share: float = 0.3):
    """Random requests; a share of them ("pos") carry the planted features, which no other request carries."""
    requests = [SyntheticRequest.random(rng, f"r{i}") for i in range(count)]
    labels: dict[str, list[str]] = {}
    for request in requests:
        planted = rng.random() < planted_share
        for slot, feature in PLANTED:
            for row in request.codes[slot]:
                row.pop(feature, None)
            if planted:
                position = int(rng.integers(0, request.num_prompt))
                request.codes[slot][position][feature] = 3.5
        labels[request.request_id] = ["pos"] if planted else (["neg"] if rng.random() < 0.6 else ["other"])
    return requests, labels


def contrast(stub, **kwargs) -> pb.ContrastResponse:
    return stub.Contrast(pb.ContrastRequest(**kwargs), timeout=30)


def by_label(label: str) -> pb.RequestSelector:
    return pb.RequestSelector(labels=[label])


# --- tests ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduced_by", ["query", "worker"])
def test_counts_ranks_and_pairs_match_brute_force_in_every_mode_and_scope(tmp_path: Path, reduced_by: str) -> None:
    """`worker`: every request reduced, and every request segment built, by the maintenance worker process
    (forced: no minimum size) before the first query; `query`: the first query reduces them in process."""
    rng = np.random.default_rng(7)
    count = 2 * SEGMENT_REQUESTS + 90  # two sealed segments and a pending tail
    requests, labels = traffic(rng, count)
    maintenance = MaintenanceConfig(worker_min_postings=0 if reduced_by == "worker" else 1 << 40)
    with running_sidecar(tmp_path, maintenance=maintenance) as (running, client):
        client.ingest(with_labels(requests, labels, rng))
        for request in requests:
            assert client.report(request.request_id).status == pb.REPORT_STATUS_COMPLETE
        if reduced_by == "worker":
            running.core.maintain_request_index()
            assert running.core.counters["maintenance_worker_reductions"] == count
            assert running.core.counters["maintenance_worker_failures"] == 0
        before_seal = contrast(client.stub, positives=by_label("pos"), negatives=by_label("neg"), top=10_000)
        running.core.tick()  # seals full segments
        assert len(running.core.request_index.channels[pb.CODE_MODE_CODES].segments) == 2
        if reduced_by == "worker":  # their words built there too: two segments in each code mode
            assert running.core.counters["maintenance_worker_segments"] == 2 * len(MODES)
        positives = [r for r in requests if labels[r.request_id] == ["pos"]]
        negatives = [r for r in requests if labels[r.request_id] == ["neg"]]
        rest = [r for r in requests if labels[r.request_id] != ["pos"]]
        for (mode, mode_value), (scope, scope_value) in itertools.product(MODES.items(), SCOPES.items()):
            for negative_side, selector in ((negatives, by_label("neg")), (rest, pb.RequestSelector(rest=True))):
                response = contrast(
                    client.stub,
                    positives=by_label("pos"),
                    negatives=selector,
                    mode=mode_value,
                    scope=scope_value,
                    top=10_000,
                    top_pairs=10_000,
                    pair_candidates=64,
                )
                sets_p = [expected_set(r, mode, scope) for r in positives]
                sets_n = [expected_set(r, mode, scope) for r in negative_side]
                support_p = {t: sum(t in s for s in sets_p) for t in set().union(*sets_p)}
                support_n = {t: sum(t in s for s in sets_n) for t in set().union(*sets_n)}
                got = {(f.slot, f.feature): (f.positives, f.negatives) for f in response.features}
                assert got == {t: (a, support_n.get(t, 0)) for t, a in support_p.items()}, (mode, scope)
                assert (response.positives, response.negatives) == (len(positives), len(negative_side))
                scores = [f.exclusivity for f in response.features]
                assert scores == sorted(scores, reverse=True)
                assert [f.rank for f in response.features] == list(range(1, len(response.features) + 1))
                for f in response.features:
                    assert f.exclusivity == pytest.approx(f.positives / len(positives) - f.negatives / len(sets_n))
                    assert f.exclusive == (f.negatives == 0)
                    assert f.layer == LAYERS[f.slot]
                # pairs: every cross-layer pair of listed features that co-occurs on a positive, counted exactly
                listed = {(f.slot, f.feature) for f in response.features}
                expected_pairs = {}
                for up, down in itertools.product(
                    sorted(t for t in listed if t[0] == 0), sorted(t for t in listed if t[0] == 1)
                ):
                    both_p = sum(up in s and down in s for s in sets_p)
                    if both_p:
                        expected_pairs[(up, down)] = (both_p, sum(up in s and down in s for s in sets_n))
                got_pairs = {
                    ((p.upstream.slot, p.upstream.feature), (p.downstream.slot, p.downstream.feature)): (
                        p.positives,
                        p.negatives,
                    )
                    for p in response.pairs
                }
                assert got_pairs == expected_pairs, (mode, scope)
                edges = [p.edge_score for p in response.pairs]
                assert edges == sorted(edges, reverse=True)
        # the pending tail and sealed segments answer alike
        after_seal = contrast(client.stub, positives=by_label("pos"), negatives=by_label("neg"), top=10_000)
        assert [(f.slot, f.feature, f.positives, f.negatives) for f in after_seal.features] == [
            (f.slot, f.feature, f.positives, f.negatives) for f in before_seal.features
        ]


def test_planted_features_rank_first_and_evaluate_perfectly(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    requests, labels = traffic(rng, 300)
    with running_sidecar(tmp_path) as (running, client):
        client.ingest(with_labels(requests, labels, rng))
        for request in requests:
            client.report(request.request_id)
        running.core.tick()
        response = contrast(
            client.stub,
            positives=by_label("pos"),
            cut=2,
            truth=pb.GroundTruth(
                features=[pb.FeatureTerm(layer=LAYERS[s], feature=f) for s, f in PLANTED],
                requests=by_label("pos"),
            ),
        )
    top = [(f.slot, f.feature) for f in response.features[:2]]
    assert sorted(top) == sorted(PLANTED)
    assert all(f.exclusive and f.exclusivity == 1.0 and f.precision == 1.0 for f in response.features[:2])
    assert response.features[2].exclusivity < 1.0
    first_pair = response.pairs[0]
    assert (
        (first_pair.upstream.slot, first_pair.upstream.feature),
        (first_pair.downstream.slot, first_pair.downstream.feature),
    ) == PLANTED
    assert first_pair.edge_score == 1.0
    e = response.evaluation
    assert (e.truth_features, e.features_ranked) == (2, 2 * 64)
    assert e.feature_auc == 1.0 and e.feature_precision_at_cut == 1.0 and e.feature_recall_at_cut == 1.0
    assert e.truth_requests == sum(v == ["pos"] for v in labels.values())
    assert e.requests_evaluated == len(requests)
    assert e.request_auc == 1.0 and e.request_precision_at_cut == 1.0 and e.request_recall_at_cut == 1.0


def test_roc_auc_equals_the_pairwise_definition() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        scores = rng.integers(0, 5, 40).astype(float)  # many ties
        labels = rng.random(40) < 0.3
        pos, neg = scores[labels], scores[~labels]
        pairwise = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
        assert roc_auc(scores, labels) == pytest.approx(pairwise)
    assert np.isnan(roc_auc(np.ones(3), np.ones(3, bool)))


def test_selectors_labels_feedback_and_errors(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    requests, labels = traffic(rng, 120)
    circuit_file = tmp_path / "circuits.yaml"
    circuit_file.write_text("circuits:\n  - {name: planted, when: {layer: 1, feature: 5}}\n")
    planted_ids = {r.request_id for r in requests if labels[r.request_id] == ["pos"]}
    with running_sidecar(tmp_path, circuits=[circuit_file]) as (running, client):
        client.ingest(with_labels(requests, labels, rng))
        for request in requests:
            client.report(request.request_id)
        stub = client.stub

        def positives_of(**selector) -> int:
            return contrast(stub, positives=pb.RequestSelector(**selector), top=1).positives

        assert positives_of(labels=["pos"]) == len(planted_ids)
        assert positives_of(circuit="planted") == len(planted_ids)
        expression = pb.Expr(feature=pb.FeatureTerm(layer=2, feature=11))
        assert positives_of(expression=expression) == len(planted_ids)
        assert positives_of(labels=["pos"], circuit="planted") == len(planted_ids)

        # explicit ids: unknown ones are reported, not silently dropped
        ids = [*sorted(planted_ids)[:3], "no-such-request"]
        response = contrast(stub, positives=pb.RequestSelector(request_ids=ids), top=1)
        assert response.positives == 3
        assert [(u.request_id, u.reason) for u in response.unresolved] == [
            ("no-such-request", "positives: unknown to this sidecar")
        ]

        # feedback: relabel two negatives as positives; the audit trail keeps who and why
        moved = sorted(r.request_id for r in requests if labels[r.request_id] == ["neg"])[:2]
        answer = stub.Label(
            pb.LabelRequest(request_ids=[*moved, "ghost"], add=["pos"], remove=["neg"], author="rev", note="checked"),
            timeout=10,
        )
        assert answer.updated == 2 and [u.request_id for u in answer.unresolved] == ["ghost"]
        after = contrast(stub, positives=by_label("pos"), negatives=by_label("neg"), top=2)
        assert after.positives == len(planted_ids) + 2
        assert after.negatives == sum(v == ["neg"] for v in labels.values()) - 2
        assert after.features[0].positives == len(planted_ids)  # the planted feature is not on the moved two
        report = client.report(moved[0])  # the audit trail comes with the report; its evidence is unchanged
        assert [(c.operation, c.label, c.author, c.note) for c in report.feedback] == [
            ("add", "pos", "rev", "checked"),
            ("remove", "neg", "rev", "checked"),
        ]
        assert list(report.labels) == ["neg"]
        listed = stub.ListReports(pb.ListReportsRequest(request_ids=[moved[0]]), timeout=10).reports
        assert [c.label for c in listed[0].feedback] == ["pos", "neg"]

        def error(**kwargs) -> grpc.RpcError:
            with pytest.raises(grpc.RpcError) as caught:
                contrast(stub, **kwargs)
            return caught.value

        e = error(positives=pb.RequestSelector())
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "positives: give request ids" in e.details()
        e = error(positives=pb.RequestSelector(rest=True))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "rest applies to negatives only" in e.details()
        e = error(positives=by_label("pos"), negatives=pb.RequestSelector(circuit="planted"))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "both positive and negative" in e.details()
        e = error(positives=by_label("pos"), negatives=pb.RequestSelector(rest=True, labels=["neg"]))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "rest means every other request" in e.details()
        e = error(positives=pb.RequestSelector(circuit="nonexistent"))
        assert e.code() == grpc.StatusCode.NOT_FOUND and "'nonexistent' is not loaded" in e.details()
        e = error(positives=by_label("nobody-has-this"))
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "labels ['nobody-has-this']" in e.details()
        e = error(positives=by_label("pos"), slots=[9])
        assert e.code() == grpc.StatusCode.NOT_FOUND and "slot 9" in e.details()
        e = error(positives=by_label("pos"), top=10**6)
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "top:" in e.details()
        e = error(positives=by_label("pos"), truth=pb.GroundTruth(features=[pb.FeatureTerm(layer=7, feature=1)]))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "truth.features[0]" in e.details()
        with pytest.raises(grpc.RpcError) as caught:
            stub.Label(pb.LabelRequest(request_ids=["r1"]), timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_time_window_selects_by_arrival(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    requests, labels = traffic(rng, 40)
    out = with_labels(requests, labels, rng)
    arrival = {r.request_id: (1_000 if i < 20 else 2_000) for i, r in enumerate(requests)}
    for message in out:
        if message.WhichOneof("kind") == "finish":
            message.finish.arrival_unix_nanos = arrival[message.finish.request_id]
    with running_sidecar(tmp_path) as (_, client):
        client.ingest(out)
        for request in requests:
            client.report(request.request_id)
        early = pb.RequestSelector(window=pb.TimeRange(start_unix_nanos=0, end_unix_nanos=1_500))
        response = contrast(client.stub, positives=early, top=1)
        assert (response.positives, response.negatives) == (20, 20)
        response = contrast(
            client.stub, positives=by_label("pos"), window=pb.TimeRange(start_unix_nanos=1_500, end_unix_nanos=2_500)
        )
        assert response.positives + response.negatives == 20
        assert response.positives == sum(labels[r.request_id] == ["pos"] for r in requests[20:])


def test_superseded_codes_do_not_count(tmp_path: Path) -> None:
    """A position encoded twice (vLLM recomputes after preemption) counts with its latest codes only."""
    request = SyntheticRequest("re", num_prompt=3, num_positions=3, tokens=[1, 2, 3])
    request.codes = {0: [{60: 1.0}, {1: 1.0}, {2: 1.0}], 1: [{3: 1.0}, {4: 1.0}, {5: 1.0}]}
    other = SyntheticRequest("other", num_prompt=2, num_positions=2, tokens=[1, 2])
    other.codes = {0: [{1: 1.0}, {2: 1.0}], 1: [{3: 1.0}, {4: 1.0}]}
    recomputed = SyntheticRequest("re", num_prompt=3, num_positions=1, tokens=[1])
    recomputed.codes = {0: [{61: 1.0}], 1: [{3: 1.0}]}
    items = [
        pb.IngestMessage(manifest=manifest()),
        pb.IngestMessage(codes=pb.CodeBatch(step=1, slices=[request.slice(s, 0, 3) for s in (0, 1)])),
        pb.IngestMessage(codes=pb.CodeBatch(step=2, slices=[recomputed.slice(s, 0, 1) for s in (0, 1)])),
        pb.IngestMessage(codes=pb.CodeBatch(step=3, slices=[other.slice(s, 0, 2) for s in (0, 1)])),
        pb.IngestMessage(finish=request.finish()),
        pb.IngestMessage(finish=other.finish()),
    ]
    with running_sidecar(tmp_path) as (_, client):
        client.ingest(items)
        client.report("re"), client.report("other")
        response = contrast(client.stub, positives=pb.RequestSelector(request_ids=["re"]), top=100)
    features = {(f.slot, f.feature) for f in response.features}
    assert (0, 61) in features and (0, 60) not in features


class Clock:
    def __init__(self) -> None:
        self.now = 10**18

    def __call__(self) -> int:
        return self.now


def test_requests_leave_the_identification_window(tmp_path: Path) -> None:
    clock = Clock()
    config = SidecarConfig(evidence_dir=tmp_path / "evidence", index={"window_s": 10, "segment_s": 1})
    core = SidecarCore(config, EvidenceStore(config.evidence_dir), clock=clock)
    rng = np.random.default_rng(2)
    old, old_labels = traffic(rng, SEGMENT_REQUESTS + 10)
    new, new_labels = traffic(rng, 30)
    for i, r in enumerate(new):
        r.request_id = f"new{i}"
    new_labels = {f"new{i}": new_labels[f"r{i}"] for i in range(30)}
    stream = core.open_stream(manifest())
    for message in with_labels(old, old_labels, rng)[1:]:
        core.ingest(stream, message)
    core.tick()
    clock.now += 11 * 10**9
    core.tick()  # the maintenance thread runs every 0.5 s: it seals and evicts the old codes
    for message in with_labels(new, new_labels, np.random.default_rng(3))[1:]:
        if message.WhichOneof("kind") == "codes":
            message.codes.step += 10_000
        core.ingest(stream, message)
    core.tick()
    assert len(core.request_index.channels[pb.CODE_MODE_CODES].segments) == 0  # the old segment is gone
    response = core.contrast(pb.ContrastRequest(positives=pb.RequestSelector(request_ids=["r0", "new0"])))
    assert response.positives + response.negatives == 30
    assert [u.request_id for u in response.unresolved] == ["r0"]
    assert "left the index window" in response.unresolved[0].reason or "outside" in response.unresolved[0].reason


def test_identify_cli_saves_a_circuit_that_flags_new_requests(tmp_path: Path) -> None:
    rng = np.random.default_rng(13)
    requests, labels = traffic(rng, 150)
    identified = tmp_path / "identified.yaml"
    identified.write_text("")
    with running_sidecar(tmp_path, circuits=[identified]) as (running, client):
        client.ingest(with_labels(requests, labels, rng))
        for request in requests:
            client.report(request.request_id)
        target = ["--target", f"127.0.0.1:{running.port}"]
        done = subprocess.run(
            [*CLI, "identify", *target, "--positive-label", "pos", "--cut", "2", "--truth-feature", "1:5",
             "--truth-feature", "2:11", "--save-circuit", "found", "--circuits-file", str(identified), "--reload"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "ROC AUC 1.000" in done.stdout and "saved circuit 'found'" in done.stdout, done.stdout
        (circuit,) = load_circuit_files([identified]).circuits
        assert sorted((t.layer, t.feature) for t in circuit.terms) == [(1, 5), (2, 11)]
        labels_saved = dict(label.split("=", 1) for label in circuit.labels)
        assert '"labels": ["pos"]' in labels_saved["query"] and labels_saved["positives"] == str(
            sum(v == ["pos"] for v in labels.values())
        )
        assert running.core.circuits.names == ["found"]
        # new traffic: the saved circuit flags exactly the requests that carry a planted feature
        fresh, fresh_labels = traffic(np.random.default_rng(14), 30)
        for r in fresh:
            r.request_id = "fresh-" + r.request_id
        client.ingest(messages(fresh, np.random.default_rng(15)))
        for r in fresh:
            flagged = [f.circuit for f in client.report(r.request_id).flags]
            assert flagged == (["found"] if fresh_labels[r.request_id.removeprefix("fresh-")] == ["pos"] else [])
        # saving again under the same name needs --replace; errors are one line naming the cause
        again = subprocess.run(
            [*CLI, "identify", *target, "--positive-label", "pos", "--save-circuit", "found",
             "--circuits-file", str(identified)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert again.returncode == 1 and "'found' already exists" in again.stderr
        missing = subprocess.run(
            [*CLI, "identify", *target, "--positive-label", "nobody"], capture_output=True, text=True, timeout=60
        )
        assert missing.returncode == 1 and "FAILED_PRECONDITION" in missing.stderr
        labelled = subprocess.run(
            [*CLI, "label", *target, "--id", requests[0].request_id, "--add", "reviewed", "--author", "ci"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert labelled.returncode == 0 and "labelled 1 requests" in labelled.stdout
        assert contrast(client.stub, positives=by_label("reviewed")).positives == 1
        assert yaml.safe_load(identified.read_text())["circuits"][0]["name"] == "found"


def test_request_index_memory_budget_evicts_oldest_segments_early(tmp_path: Path) -> None:
    config = SidecarConfig(evidence_dir=tmp_path / "evidence", index={"request_index_budget_mb": 0.01})
    core = SidecarCore(config, EvidenceStore(config.evidence_dir))
    rng = np.random.default_rng(4)
    requests, labels = traffic(rng, 2 * SEGMENT_REQUESTS + 5)
    stream = core.open_stream(manifest())
    for message in with_labels(requests, labels, rng)[1:]:
        core.ingest(stream, message)
    core.tick()  # seals two segments, then the budget (10 kB) evicts all but the newest
    segments = core.request_index.channels[pb.CODE_MODE_CODES].segments
    assert [s.first_ridx for s in segments] == [SEGMENT_REQUESTS]
    assert core.counters["requests_evicted_for_budget"] == SEGMENT_REQUESTS
    ids = {side: [r.request_id for r in requests if (labels[r.request_id] == ["pos"]) == side] for side in (1, 0)}
    response = core.contrast(
        pb.ContrastRequest(
            positives=pb.RequestSelector(request_ids=ids[1]), negatives=pb.RequestSelector(request_ids=ids[0])
        )
    )
    assert response.positives + response.negatives == SEGMENT_REQUESTS + 5
    assert len(response.unresolved) == SEGMENT_REQUESTS
    assert all("request_index_budget_mb" in u.reason for u in response.unresolved)


def test_saved_circuit_entries_validate_and_summarise_long_id_lists(tmp_path: Path) -> None:
    from circuitwatch.sidecar import ConfigError
    from circuitwatch.sidecar.saved_circuits import circuit_entry, save_circuit

    features = [
        pb.FeatureScore(layer=1, feature=5, weights_hash="blake2b:h01", exclusivity=1.0),
        pb.FeatureScore(layer=2, feature=11, weights_hash="blake2b:h02", exclusivity=0.5),
    ]
    request = pb.ContrastRequest(positives=pb.RequestSelector(request_ids=[f"r{i}" for i in range(60)]))
    response = pb.ContrastResponse(positives=60, negatives=7, scope=pb.SCOPE_PROMPT, mode=pb.CODE_MODE_CODES)
    target = tmp_path / "saved.yaml"
    save_circuit(target, circuit_entry("found", features, request, response, "high", "at_least:2"))
    (circuit,) = load_circuit_files([target]).circuits
    assert circuit.scope == pb.SCOPE_PROMPT and circuit.severity == pb.SEVERITY_HIGH
    assert type(circuit.expression).__name__ == "AtLeast" and circuit.expression.n == 2
    assert [(t.layer, t.feature, t.sae) for t in circuit.terms] == [(1, 5, "blake2b:h01"), (2, 11, "blake2b:h02")]
    labels = dict(label.split("=", 1) for label in circuit.labels)
    assert labels["positives_ids"].startswith("60 ids, sha256 ") and "request_ids" not in labels["query"]
    with pytest.raises(ConfigError, match="'found' already exists"):
        save_circuit(target, circuit_entry("found", features, request, response, "high", "any"))
    assert save_circuit(target, circuit_entry("found", features[:1], request, response, "low", "any"), replace=True)
    assert len(load_circuit_files([target]).circuits[0].terms) == 1
    broken = tmp_path / "broken.yaml"
    broken.write_text("circuits: [ {name: x, when: {layer: 1}} ]\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: circuits\[0\].when"):
        save_circuit(broken, circuit_entry("found", features, request, response, "high", "any"))
    assert "layer: 1" in broken.read_text()  # a broken file is never overwritten
    bad_match = subprocess.run(
        [*CLI, "identify", "--positive-label", "x", "--match", "most"], capture_output=True, text=True, timeout=60
    )
    assert bad_match.returncode == 2 and "--match 'most'" in bad_match.stderr


def test_labels_attached_while_a_request_runs_reach_its_report(tmp_path: Path) -> None:
    request = SyntheticRequest("live", num_prompt=2, num_positions=3, tokens=[1, 2, 3])
    request.codes = {0: [{1: 1.0}, {2: 1.0}, {3: 1.0}], 1: [{4: 1.0}, {5: 1.0}, {6: 1.0}]}
    with running_sidecar(tmp_path) as (_, client):
        first = [
            pb.IngestMessage(manifest=manifest()),
            pb.IngestMessage(start=pb.RequestStart(request_id="live", labels=["from-xargs"])),
            pb.IngestMessage(codes=pb.CodeBatch(step=1, slices=[request.slice(s, 0, 2) for s in (0, 1)])),
        ]
        client.ingest(first)
        answer = client.stub.Label(
            pb.LabelRequest(request_ids=["live"], add=["late"], remove=["from-xargs"], author="a"), timeout=10
        )
        assert answer.updated == 1
        rest = [
            pb.IngestMessage(manifest=manifest()),
            pb.IngestMessage(codes=pb.CodeBatch(step=1, slices=[request.slice(s, 2, 3) for s in (0, 1)])),
            pb.IngestMessage(finish=request.finish()),
        ]
        client.ingest(rest)
        assert list(client.report("live").labels) == ["late"]


def test_client_commands_send_the_bearer_token(tmp_path: Path) -> None:
    token = tmp_path / "token.txt"
    token.write_text("s3cret\n")
    rng = np.random.default_rng(21)
    requests, labels = traffic(rng, 20)
    with running_sidecar(tmp_path, auth_token_file=token) as (running, client):
        metadata = [("authorization", "Bearer s3cret")]
        client.ingest(with_labels(requests, labels, rng), metadata=metadata)
        target = ["--target", f"127.0.0.1:{running.port}"]
        command = [*CLI, "label", *target, "--id", requests[0].request_id, "--add", "x"]
        refused = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
        accepted = subprocess.run([*command, "--token-file", str(token)], capture_output=True, text=True, timeout=60)
        assert accepted.returncode == 0, accepted.stderr


def test_truth_features_name_a_layer_or_one_of_its_taps() -> None:
    from circuitwatch.commands.connection import UsageError
    from circuitwatch.commands.identify import _truth_features

    plain, head = _truth_features(["3:814", "L1.attn_z.h2:17"])
    assert (plain.layer, plain.hook_point, plain.HasField("head"), plain.feature) == (3, "", False, 814)
    assert (head.layer, head.hook_point, head.head, head.feature) == (1, "attn_z", 2, 17)
    for bad in ("L1.hook_z:3", "1.attn_z:3", "3"):
        with pytest.raises(UsageError, match="expected LAYER:FEATURE"):
            _truth_features([bad])


@pytest.mark.parametrize("d_sae", [64, 1 << 20])
def test_feature_sets_are_the_same_counted_by_id_or_by_rank(monkeypatch, d_sae: int) -> None:
    """request_feature_sets counts features by id when their ids span little more than the codes, else by
    np.unique's ranks: forced either way, every mode's terms and scopes are identical (activations drawn from a
    few values, so argmax ties and equal sums occur)."""
    from circuitwatch.sidecar import request_sets

    rng = np.random.default_rng(21)
    codes = {}
    for gslot in (0, 1):
        counts = rng.integers(0, 12, 200)
        offsets = np.concatenate(([0], np.cumsum(counts)))
        features = np.concatenate([np.sort(rng.choice(d_sae, size=int(n), replace=False)) for n in counts]).astype(
            np.uint32
        )
        acts = rng.choice([0.5, 1.0, 2.0], size=len(features)).astype(np.float32)
        codes[gslot] = request_sets.SlotCodes(np.arange(200, dtype=np.int64), offsets, features, acts)
    answers = []
    for span in (0, 1 << 30):  # by rank always, by id always
        monkeypatch.setattr(request_sets, "DENSE_SPAN", span)
        answers.append(request_sets.request_feature_sets(codes, 80, [0, d_sae]))
    for mode in request_sets.MODES:
        by_rank, by_id = answers[0][mode], answers[1][mode]
        assert by_rank.terms.dtype == by_id.terms.dtype and by_rank.scopes.dtype == by_id.scopes.dtype
        assert np.array_equal(by_rank.terms, by_id.terms) and np.array_equal(by_rank.scopes, by_id.scopes)
        assert len(by_rank.terms) > 0
