"""Fleet export and fleet queries on the real ClickHouse engine (chdb: no ClickHouse server release that serves
this SQL installs on these machines; Debian's 18.16 lacks DateTime64, TTL and deduplication tokens).

Three sidecar processes, each fed its own share of the traffic, export into one store; a fourth sidecar gets all
of it and answers contrasts from its own index. The fleet contrast over the store must equal that answer count for
count and rank for rank, in every mode and scope, with every selector the fleet supports.
"""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from google.protobuf import json_format

from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto import circuitwatch_pb2_grpc as pb_grpc
from circuitwatch.sidecar.fleet.connection import open_store
from circuitwatch.sidecar.fleet.queries import ReportFilter, fleet_contrast, fleet_reports
from circuitwatch.sidecar.store import EvidenceStore

from support.fleet import require_fleet
from support.processes import free_port, start_sidecar, stop
from support.sidecar_harness import LAYERS, SyntheticRequest, messages, running_sidecar

require_fleet()

PLANTED = ((0, 5), (1, 11))  # (slot, feature) on every "pos" request, on no other
HOUR_NS = 3600 * 10**9
CIRCUITS = f"circuits:\n  - {{name: planted, when: {{layer: {LAYERS[0]}, feature: 5}}}}\n"


def fleet_traffic(
    rng: np.random.Generator, count: int, start_ns: int
) -> tuple[list[SyntheticRequest], list[pb.RequestStart]]:
    """Random requests, a third carrying the planted features; labels, two models, arrivals a minute apart from
    start_ns (so windows cut through hours)."""
    requests, starts = [], []
    for i in range(count):
        request = SyntheticRequest.random(rng, f"r{i:04d}")
        planted = rng.random() < 0.35
        for slot, feature in PLANTED:
            for row in request.codes[slot]:
                row.pop(feature, None)
            if planted:
                request.codes[slot][int(rng.integers(0, request.num_prompt))][feature] = 3.5
        label = "pos" if planted else ("neg" if rng.random() < 0.6 else "other")
        requests.append(request)
        starts.append(
            pb.RequestStart(
                request_id=request.request_id,
                model="model-a" if i % 3 else "model-b",
                arrival_unix_nanos=start_ns + i * 60 * 10**9,
                labels=[label],
            )
        )
    return requests, starts


def ingest(stub, requests: list[SyntheticRequest], starts: list[pb.RequestStart], rng) -> None:
    out = messages(requests, rng)
    stub.Ingest(iter([out[0], *(pb.IngestMessage(start=s) for s in starts), *out[1:]]), timeout=60)
    for request in requests:
        stub.GetReport(pb.GetReportRequest(request_id=request.request_id, wait_ms=5000), timeout=30)


def comparable(response: pb.ContrastResponse) -> dict:
    answer = json_format.MessageToDict(response, preserving_proto_field_name=True)
    answer.pop("elapsed_ms", None)
    return answer


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Three sidecar processes exporting into one embedded store, and one in-process sidecar with everything."""
    root = tmp_path_factory.mktemp("fleet")
    store_dir = root / "store"
    (root / "circuits.yaml").write_text(CIRCUITS)
    rng = np.random.default_rng(7)
    start_ns = (time.time_ns() // HOUR_NS - 3) * HOUR_NS + 25 * 60 * 10**9  # 2h35m ago: hours are cut
    requests, starts = fleet_traffic(rng, 150, start_ns)
    shares = [list(range(i, len(requests), 3)) for i in range(3)]
    processes = []
    try:
        for n, share in enumerate(shares):
            home = root / f"replica-{n}"
            home.mkdir()
            port = free_port()
            config = (
                f"circuits: [{root / 'circuits.yaml'}]\n"
                f"fleet: {{enabled: true, instance: replica-{n}, embedded_dir: {store_dir}, flush_interval_s: 0.2}}\n"
            )
            processes.append(start_sidecar(home, port, config, log_name="sidecar.log"))
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                ingest(pb_grpc.MonitorStub(channel), [requests[i] for i in share], [starts[i] for i in share], rng)
    finally:
        for process in processes:
            stop(process)  # SIGTERM: drain, spool, deliver
    with running_sidecar(root / "union", circuits=[root / "circuits.yaml"]) as (running, client):
        ingest(client.stub, requests, starts, rng)
        store = open_store(str(store_dir), "circuitwatch")
        yield client.stub, store, requests, starts, root


def test_every_replica_exported_every_request_once(fleet) -> None:
    _, store, requests, _, root = fleet
    with store.held():
        ids = store.column("SELECT request_id FROM circuitwatch.reports")
        instances = store.column("SELECT DISTINCT instance FROM circuitwatch.reports ORDER BY instance")
        features = store.column("SELECT count() FROM circuitwatch.request_features")
    assert sorted(ids) == sorted(r.request_id for r in requests)  # none lost, none twice
    assert instances == ["replica-0", "replica-1", "replica-2"]
    assert features[0] > 0
    for n in range(3):  # every spool drained at the drain on SIGTERM
        assert not list((root / f"replica-{n}" / "evidence" / "fleet-spool").glob("*.arrow"))


@pytest.mark.parametrize("mode", [pb.CODE_MODE_CODES, pb.CODE_MODE_ARGMAX_TOKEN, pb.CODE_MODE_ARGMAX_MEAN])
@pytest.mark.parametrize("scope", [pb.SCOPE_PROMPT, pb.SCOPE_GENERATED, pb.SCOPE_BOTH])
def test_fleet_contrast_equals_the_local_contrast_over_the_union(fleet, mode, scope) -> None:
    stub, store, *_ = fleet
    request = pb.ContrastRequest(
        positives=pb.RequestSelector(labels=["pos"]),
        mode=mode,
        scope=scope,
        top=200,
        top_pairs=50,
        truth=pb.GroundTruth(
            features=[pb.FeatureTerm(layer=LAYERS[s], feature=f) for s, f in PLANTED],
            requests=pb.RequestSelector(circuit="planted"),
        ),
    )
    local = stub.Contrast(request, timeout=30)
    remote = fleet_contrast(store, "circuitwatch", request)
    assert comparable(remote) == comparable(local)
    assert local.positives > 10 and local.negatives > 50 and len(local.features) > 5


@pytest.mark.parametrize(
    "case",
    [
        "explicit negatives",
        "circuit",
        "ids",
        "window cutting hours",
        "window inside an hour",
        "model",
        "min support",
        "over 63 pair candidates",  # pair patterns as arrays rather than 64-bit masks
    ],
)
def test_fleet_selectors_equal_the_local_ones(fleet, case) -> None:
    stub, store, requests, starts, _ = fleet
    first = starts[0].arrival_unix_nanos
    request = pb.ContrastRequest(positives=pb.RequestSelector(labels=["pos"]), top=100, top_pairs=20)
    if case == "explicit negatives":
        request.negatives.labels.append("neg")
    elif case == "circuit":
        request.positives.CopyFrom(pb.RequestSelector(circuit="planted"))
        request.negatives.labels.append("other")
    elif case == "ids":
        request.positives.CopyFrom(pb.RequestSelector(request_ids=[r.request_id for r in requests[:40]]))
    elif case == "window cutting hours":
        request.window.start_unix_nanos = first + 17 * 60 * 10**9 + 1
        request.window.end_unix_nanos = first + 131 * 60 * 10**9 - 1
    elif case == "window inside an hour":
        request.window.start_unix_nanos = first + 40 * 60 * 10**9
        request.window.end_unix_nanos = first + 75 * 60 * 10**9
        request.positives.window.start_unix_nanos = first + 50 * 60 * 10**9
    elif case == "model":
        request.models.append("model-a")
    elif case == "over 63 pair candidates":
        request.pair_candidates, request.top_pairs = 40, 200
    elif case == "min support":
        request.min_support = 3
        request.mode = pb.CODE_MODE_ARGMAX_TOKEN
    local = stub.Contrast(request, timeout=30)
    remote = fleet_contrast(store, "circuitwatch", request)
    assert comparable(remote) == comparable(local)
    assert local.positives and local.negatives


def replicas_listing(root, **selection) -> list[tuple[str, pb.Report]]:
    """What the three replicas' own ListReports list together (read from their evidence stores; the replicas
    have stopped), latest finalised first."""
    listed = []
    for n in range(3):
        store = EvidenceStore(root / f"replica-{n}" / "evidence")
        try:
            listed += [(f"replica-{n}", report) for report in store.list(limit=10_000, **selection)]
        finally:
            store.close()
    return sorted(listed, key=lambda item: (-item[1].finalized_unix_nanos, item[0], item[1].request_id))


@pytest.mark.parametrize(
    "case", ["everything", "limit", "window", "ids", "flagged", "labels", "circuit", "model", "instance", "all at once"]
)
def test_fleet_reports_equal_the_replicas_own_listings(fleet, case) -> None:
    """The fleet listing is what the replicas' ListReports would answer together, report for report and in the
    same order; the selectors only the fleet has (labels, circuit, model, instance) keep exactly the reports that
    carry them."""
    _, store, requests, _, root = fleet
    everything = replicas_listing(root)
    assert len(everything) == len(requests)
    finalized = [report.finalized_unix_nanos for _, report in everything]
    window = {"start_ns": finalized[100], "end_ns": finalized[30]}  # cuts through every replica's reports
    ids = [requests[i].request_id for i in (0, 1, 2, 50, 149)]
    selection, local, keep = {}, {}, None
    if case == "limit":
        selection = {"limit": 7}
    elif case == "window":
        selection = local = window
    elif case == "ids":
        selection, local = {"request_ids": tuple(ids)}, {"request_ids": ids}
    elif case == "flagged":
        selection = local = {"flagged_only": True}
    elif case == "labels":
        selection, keep = {"labels": ("pos",)}, lambda _, r: "pos" in r.labels
    elif case == "circuit":
        selection, keep = {"circuit": "planted"}, lambda _, r: "planted" in [f.circuit for f in r.flags]
    elif case == "model":
        selection, keep = {"models": ("model-b",)}, lambda _, r: r.model == "model-b"
    elif case == "instance":
        selection, keep = {"instances": ("replica-2",)}, lambda instance, _: instance == "replica-2"
    elif case == "all at once":
        selection = {**window, "labels": ("pos",), "models": ("model-a",), "instances": ("replica-0", "replica-1")}
        local = window
        keep = lambda i, r: "pos" in r.labels and r.model == "model-a" and i != "replica-2"  # noqa: E731
    expected = replicas_listing(root, **local)
    if keep is not None:
        expected = [(instance, report) for instance, report in expected if keep(instance, report)]
    limit = selection.pop("limit", 1000)
    expected = expected[:limit]
    listed = fleet_reports(store, "circuitwatch", ReportFilter(**selection, limit=limit))
    assert [(i, r.request_id) for i, r in listed] == [(i, r.request_id) for i, r in expected]
    assert all(mine == theirs for (_, mine), (_, theirs) in zip(listed, expected, strict=True))
    assert 0 < len(listed) < len(requests) or case == "everything"


def test_instances_filter_and_errors(fleet) -> None:
    _, store, requests, _, _ = fleet
    only = pb.ContrastRequest(positives=pb.RequestSelector(labels=["pos"]), instances=["replica-1"], top_pairs=0)
    answer = fleet_contrast(store, "circuitwatch", only)
    assert answer.positives + answer.negatives == len(range(1, len(requests), 3))
    with pytest.raises(Exception, match="expression"):
        fleet_contrast(
            store,
            "circuitwatch",
            pb.ContrastRequest(
                positives=pb.RequestSelector(expression=pb.Expr(feature=pb.FeatureTerm(layer=1, feature=5)))
            ),
        )
    with pytest.raises(Exception, match="flagged no request in the fleet store"):
        fleet_contrast(store, "circuitwatch", pb.ContrastRequest(positives=pb.RequestSelector(circuit="nope")))
