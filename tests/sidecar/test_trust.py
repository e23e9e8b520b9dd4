"""What the sidecar guarantees whoever calls it: requests are never merged when their response ids collide,
ids resolve to every request they name, a producer that reconnects after an outage gets every request
reported, client labels never pass for a reviewer's, and each RPC needs the right role."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import grpc
import pytest

from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto import circuitwatch_pb2_grpc as pb_grpc

from support.processes import CLI
from support.sidecar_harness import SyntheticRequest, manifest, running_sidecar

TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def request(key: str, codes: int = 3) -> SyntheticRequest:
    r = SyntheticRequest(key, num_prompt=2, num_positions=codes, tokens=list(range(codes)))
    r.codes = {0: [{1: 1.0}] * codes, 1: [{2: 1.0}] * codes}
    return r


def stream(r: SyntheticRequest, response_id: str, **start) -> list[pb.IngestMessage]:
    return [
        pb.IngestMessage(manifest=manifest()),
        pb.IngestMessage(start=pb.RequestStart(request_id=r.request_id, response_id=response_id, **start)),
        pb.IngestMessage(codes=pb.CodeBatch(step=1, slices=[r.slice(s, 0, 2) for s in (0, 1)])),
        pb.IngestMessage(codes=pb.CodeBatch(step=2, slices=[r.slice(s, 2, r.num_positions) for s in (0, 1)])),
        pb.IngestMessage(finish=r.finish()),
    ]


def crash(running) -> None:
    """Stop like a killed process: no drain, open requests are not finalised."""
    running.stopping.set()
    running.server.stop(0).wait()
    running.store.close()


def code(call) -> grpc.StatusCode | None:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return None


def test_requests_sharing_a_response_id_are_never_merged_and_resolve_explicitly(tmp_path: Path) -> None:
    """...and a listing by ids lists what any of them names, request id or response id (`circuitwatch reports
    --id` sends its ids as both: a report had to match both lists before, so a request id listed nothing)."""
    first, second, alone = request("cmpl-a.00000001"), request("cmpl-a.00000002", codes=5), request("cmpl-b.0000000f")
    everyone = [first.request_id, second.request_id, alone.request_id]
    with running_sidecar(tmp_path) as (running, client):
        client.ingest(stream(first, "cmpl-a", notes=["refused the client's request to opt out"]))
        client.ingest(stream(second, "cmpl-a"))

        client.ingest(stream(alone, "cmpl-b"))
        reports = {k: client.report(k) for k in (first.request_id, second.request_id)}
        assert [r.coverage.positions_total for r in reports.values()] == [3, 5]
        assert all(r.status == pb.REPORT_STATUS_COMPLETE and r.response_id == "cmpl-a" for r in reports.values())
        assert list(reports[first.request_id].notes) == ["refused the client's request to opt out"]
        assert code(lambda: client.report("cmpl-a")) == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as info:
            client.report("cmpl-a")
        assert first.request_id in info.value.details() and second.request_id in info.value.details()
        listed = client.stub.ListReports(pb.ListReportsRequest(response_ids=["cmpl-a"]), timeout=10).reports
        assert sorted(r.request_id for r in listed) == [first.request_id, second.request_id]
        assert client.report("cmpl-b").request_id == alone.request_id  # a unique response id resolves
        for given, expected in (([first.request_id], [first.request_id]), (["cmpl-a", alone.request_id], everyone)):
            both = pb.ListReportsRequest(request_ids=given, response_ids=given)  # as `circuitwatch reports --id` asks
            assert sorted(r.request_id for r in client.stub.ListReports(both, timeout=10).reports) == sorted(expected)
        target = ["--target", f"127.0.0.1:{running.port}"]
        listed_by_cli = subprocess.run(
            [*CLI, "reports", *target, "--id", first.request_id, "--id", "cmpl-b", "--json"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert listed_by_cli.returncode == 0, listed_by_cli.stderr
        found = sorted(json.loads(line)["request_id"] for line in listed_by_cli.stdout.splitlines())
        assert found == sorted([first.request_id, alone.request_id])
        label = client.stub.Label(pb.LabelRequest(request_ids=["cmpl-a", "cmpl-b"], add=["reviewed"]), timeout=10)
        assert label.updated == 1 and [u.request_id for u in label.unresolved] == ["cmpl-a"]
        assert "response id of 2 requests" in label.unresolved[0].reason


def test_client_labels_never_pass_for_reviewer_labels(tmp_path: Path) -> None:
    r = request("cmpl-c.00000003")
    with running_sidecar(tmp_path) as (_, client):
        client.ingest(stream(r, "cmpl-c", labels=["client:review:ok"]))
        assert list(client.report(r.request_id).labels) == ["client:review:ok"]
        with pytest.raises(grpc.RpcError) as info:
            client.stub.Label(pb.LabelRequest(request_ids=[r.request_id], add=["client:x"]), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "client:" in info.value.details()
        contrast = pb.ContrastRequest(positives=pb.RequestSelector(labels=["review:ok"]))
        assert code(lambda: client.stub.Contrast(contrast, timeout=10)) == grpc.StatusCode.FAILED_PRECONDITION


def test_a_resumed_start_is_ignored_by_a_sidecar_that_kept_the_request(tmp_path: Path) -> None:
    r = request("cmpl-d.00000004")
    with running_sidecar(tmp_path) as (running, client):
        messages = stream(r, "cmpl-d", labels=["client:first"], trace=pb.TraceContext(traceparent=TRACE))
        client.ingest(messages[:3])  # start + the first codes; the producer then reconnects
        resumed = pb.RequestStart(request_id=r.request_id, response_id="cmpl-d", resumed=True, labels=["client:again"])
        resumed.gaps.add(slot=0, start=0, end=2, reason=pb.GAP_REASON_SIDECAR_UNAVAILABLE)
        client.ingest([pb.IngestMessage(manifest=manifest()), pb.IngestMessage(start=resumed), *messages[3:]])
        report = client.report(r.request_id)
        assert report.status == pb.REPORT_STATUS_COMPLETE and list(report.labels) == ["client:first"]
        assert running.core.counters["resumed_starts_known"] == 1


def test_after_a_sidecar_restart_resumed_starts_and_resent_finishes_report_every_request(tmp_path: Path) -> None:
    """The sidecar died holding a request's start and codes, before its report was final: the producer's
    resumed start (with the positions it had sent as SIDECAR_UNAVAILABLE gaps) and the resent finish give the
    restarted sidecar a report that keeps the trace and labels and never calls the lost tokens clean."""
    r = request("cmpl-e.00000005", codes=6)
    with running_sidecar(tmp_path) as (running, client):
        client.ingest(stream(r, "cmpl-e", labels=["client:x"], trace=pb.TraceContext(traceparent=TRACE))[:3])
        crash(running)  # with the request open: nothing is finalised, the in-memory state is gone
    with running_sidecar(tmp_path) as (running, client):
        resumed = pb.RequestStart(
            request_id=r.request_id, response_id="cmpl-e", resumed=True, labels=["client:x"], num_prompt_tokens=2,
            trace=pb.TraceContext(traceparent=TRACE),
        )  # fmt: skip
        for slot in (0, 1):
            resumed.gaps.add(slot=slot, start=0, end=2, reason=pb.GAP_REASON_SIDECAR_UNAVAILABLE)
        finish_first = [pb.IngestMessage(manifest=pb.Manifest(contract_version=3)), pb.IngestMessage(finish=r.finish())]
        client.ingest(finish_first)  # the engine core's resent finish may come first
        rest = pb.CodeBatch(step=1, slices=[r.slice(s, 2, 6) for s in (0, 1)])
        client.ingest(
            [pb.IngestMessage(manifest=manifest()), pb.IngestMessage(start=resumed), pb.IngestMessage(codes=rest)]
        )
        report = client.report(r.request_id, wait_ms=5000)
        assert report.status == pb.REPORT_STATUS_INCOMPLETE
        assert {(g.slot, g.start, g.end, g.reason) for g in report.coverage.gaps} == {
            (s, 0, 2, pb.GAP_REASON_SIDECAR_UNAVAILABLE) for s in (0, 1)
        }
        assert report.trace.traceparent == TRACE and list(report.labels) == ["client:x"]
        assert running.core.counters["resumed_starts"] == 1


ROLE_CALLS = {
    "Ingest": lambda stub, md: stub.Ingest(iter([pb.IngestMessage(manifest=manifest())]), metadata=md, timeout=10),
    "GetReport": lambda stub, md: stub.GetReport(pb.GetReportRequest(request_id="nope"), metadata=md, timeout=10),
    "ListReports": lambda stub, md: stub.ListReports(pb.ListReportsRequest(), metadata=md, timeout=10),
    "QueryRequests": lambda stub, md: stub.QueryRequests(
        pb.QueryRequestsRequest(expression=pb.Expr(feature=pb.FeatureTerm(layer=1, feature=1))), metadata=md, timeout=10
    ),
    "FeatureStats": lambda stub, md: stub.FeatureStats(pb.FeatureStatsRequest(slot=9), metadata=md, timeout=10),
    "GetCodes": lambda stub, md: stub.GetCodes(pb.GetCodesRequest(request_id="nope"), metadata=md, timeout=10),
    "Contrast": lambda stub, md: stub.Contrast(
        pb.ContrastRequest(positives=pb.RequestSelector(labels=["x"])), metadata=md, timeout=10
    ),
    "WatchReports": lambda stub, md: next(stub.WatchReports(pb.WatchReportsRequest(), metadata=md, timeout=1)),
    "WatchActions": lambda stub, md: next(stub.WatchActions(pb.WatchActionsRequest(), metadata=md, timeout=1)),
    "Label": lambda stub, md: stub.Label(pb.LabelRequest(request_ids=["x"], add=["y"]), metadata=md, timeout=10),
    "ReloadCircuits": lambda stub, md: stub.ReloadCircuits(pb.ReloadCircuitsRequest(), metadata=md, timeout=10),
}
ROLE_OF = {"Ingest": "ingest", "Label": "admin", "ReloadCircuits": "admin"}  # every other RPC: read


def test_every_rpc_needs_its_role(tmp_path: Path) -> None:
    files = {}
    for role in ("ingest", "read", "admin"):
        files[role] = tmp_path / f"{role}.token"
        files[role].write_text(f"{role}-secret\n")
    auth = {f"{role}_token_file": path for role, path in files.items()}
    with running_sidecar(tmp_path, auth=auth) as (_, client):
        stub = pb_grpc.MonitorStub(client.channel)
        for method, call in ROLE_CALLS.items():
            needed = ROLE_OF.get(method, "read")
            for holder in ("ingest", "read", "admin", None, "wrong"):
                metadata = None if holder is None else [("authorization", f"Bearer {holder}-secret")]
                got = code(lambda call=call, metadata=metadata: call(stub, metadata))
                allowed = holder == needed or (needed == "read" and holder == "admin")
                if allowed:
                    assert got not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED), (
                        method, holder, got
                    )  # fmt: skip
                elif holder in (None, "wrong"):
                    assert got == grpc.StatusCode.UNAUTHENTICATED, (method, holder, got)
                else:
                    assert got == grpc.StatusCode.PERMISSION_DENIED, (method, holder, got)


def test_role_tokens_must_differ_and_exist(tmp_path: Path) -> None:
    from circuitwatch.sidecar import ConfigError, SidecarConfig

    same = tmp_path / "same.token"
    same.write_text("x\n")
    config = SidecarConfig(auth={"ingest_token_file": same, "read_token_file": same, "admin_token_file": same})
    with pytest.raises(ConfigError, match="the ingest and read tokens are the same"):
        config.role_tokens()
    missing = SidecarConfig(auth_token_file=tmp_path / "absent.token")
    with pytest.raises(ConfigError, match=r"absent\.token: auth_token_file: cannot read"):
        missing.role_tokens()
    with pytest.raises(ValueError, match="auth and auth_token_file"):
        SidecarConfig(
            auth_token_file=same, auth={"ingest_token_file": same, "read_token_file": same, "admin_token_file": same}
        )
