"""The API client is the monitored party: through vLLM's real OpenAI server, with the official `openai` client
and only documented request fields, it can neither switch the monitor off, nor write into another request's
evidence, nor plant labels that pass for a reviewer's; every string it sends is bounded.

One sidecar process and one vLLM server (multi-process) serve every test here. The operator allows opt-out
and labels, and joins client traces, only for requests carrying the gateway's token, so each rule is checked
both ways: a client without the token, and the operator's gateway with it.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from circuitwatch.fixtures import FixturePaths
from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto import circuitwatch_pb2_grpc as pb_grpc

from support.plugin_harness import feature_only_in, write_plugin_config
from support.processes import free_port, start_sidecar, start_vllm, stop

pytestmark = pytest.mark.vllm

ALWAYS = "  - {name: always, severity: low, when: {not: {layer: 1, feature: 7, min_activation: 1000000}}}\n"
PROMPT_TO_STOP = "Keyword arguments and lambda forms can be combined in a call"
PROMPT_TO_KEEP = "The import statement finds a module and loads it"
GATEWAY = {"x-circuitwatch-gateway": "gateway-s3cret"}
TENANT_TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class Stack:
    def __init__(self, model: str, port: int, sidecar_port: int) -> None:
        from openai import OpenAI

        self.model = model
        self.client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120, max_retries=0)
        self.stub = pb_grpc.MonitorStub(grpc.insecure_channel(f"127.0.0.1:{sidecar_port}"))

    def complete(self, prompt: str = "The import statement", max_tokens: int = 4, headers=None, **body):
        return self.client.completions.create(
            model=self.model,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
            extra_headers=headers or {},
            extra_body=body,
        )

    def report(self, request_id: str) -> pb.Report:
        return self.stub.GetReport(pb.GetReportRequest(request_id=request_id, wait_ms=10_000), timeout=30)


@pytest.fixture(scope="module")
def stack(fixtures: FixturePaths, tmp_path_factory):
    tmp_path: Path = tmp_path_factory.mktemp("hostile")
    stop_feature = feature_only_in(fixtures, PROMPT_TO_STOP, PROMPT_TO_KEEP)
    (tmp_path / "circuits.yaml").write_text(
        "circuits:\n" + ALWAYS + f"  - {{name: stop-it, action: abort, severity: critical, scope: prompt,"
        f" when: {{layer: 1, feature: {stop_feature}, min_activation: 1.0}}}}\n"
    )
    (tmp_path / "gateway.token").write_text("gateway-s3cret\n")
    sidecar_port, vllm_port = free_port(), free_port()
    sidecar = start_sidecar(tmp_path, sidecar_port, "circuits: [circuits.yaml]\n", log_name="sidecar.log")
    plugin = write_plugin_config(
        tmp_path / "plugin.json",
        fixtures,
        sidecar_port,
        response_deadline_ms=3000,
        client_controls={
            "opt_out": True,
            "labels": True,
            "max_labels": 4,
            "max_label_chars": 32,
            "trace_context": "gateway",
            "gateway_token_file": str(tmp_path / "gateway.token"),
        },
    )
    server = start_vllm(fixtures.model, tmp_path, vllm_port, plugin)
    try:
        yield Stack(str(fixtures.model), vllm_port, sidecar_port)
    finally:
        stop(server)
        stop(sidecar)


def field(response) -> dict:
    return response.model_extra["circuitwatch"]


@pytest.mark.parametrize("value", [False, "false", 0])
def test_a_client_cannot_opt_out(stack: Stack, value) -> None:
    response = stack.complete(vllm_xargs={"circuitwatch_monitor": value})
    carried = field(response)
    assert carried["status"] == "complete" and [f["circuit"] for f in carried["flags"]] == ["always"]
    report = stack.report(carried["request_id"])
    assert report.flags and any("refused the client's request to opt out" in n for n in report.notes)
    assert any("refused" in n for n in carried["notes"])


def test_the_operators_gateway_can_opt_out(stack: Stack) -> None:
    response = stack.complete(headers=GATEWAY, vllm_xargs={"circuitwatch_monitor": False})
    assert "circuitwatch" not in (response.model_extra or {})
    with pytest.raises(grpc.RpcError) as info:
        stack.report(response.id)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_spoofed_request_id_reaches_no_other_request(stack: Stack) -> None:
    victim = stack.complete(max_tokens=6)
    victim_key = field(victim)["request_id"]
    before = stack.report(victim_key)
    spoofed = {"circuitwatch_request_id": victim.id, "circuitwatch_admission": "monitored=false"}
    attacker = stack.complete(prompt="A class definition defines", max_tokens=3, vllm_xargs=spoofed)
    attacker_key = field(attacker)["request_id"]
    assert attacker_key != victim_key and attacker_key.startswith(attacker.id + ".")
    after = stack.report(victim_key)
    assert after.SerializeToString() == before.SerializeToString()  # the victim's evidence is untouched
    own = stack.report(attacker_key)
    assert own.status == pb.REPORT_STATUS_COMPLETE and own.flags  # monitored: the forged record was removed
    assert own.coverage.positions_total == attacker.usage.prompt_tokens + attacker.usage.completion_tokens - 1


def test_spoofing_a_running_requests_id_does_not_evade_an_abort(stack: Stack) -> None:
    def long_completion(prompt: str, xargs: dict):
        return stack.complete(prompt, max_tokens=200, vllm_xargs=xargs, ignore_eos=True)

    with ThreadPoolExecutor(2) as pool:
        victim_future = pool.submit(long_completion, PROMPT_TO_KEEP, {})
        attacker_future = pool.submit(
            long_completion, PROMPT_TO_STOP, {"circuitwatch_request_id": "cmpl-victim-of-the-abort"}
        )
        victim, attacker = victim_future.result(), attacker_future.result()
    assert attacker.choices[0].finish_reason == "content_filter" and field(attacker)["aborted_by"] == "stop-it"
    assert attacker.usage.completion_tokens < 200
    assert victim.choices[0].finish_reason == "length" and victim.usage.completion_tokens == 200
    assert "aborted_by" not in field(victim)


def test_client_labels_never_pass_for_a_reviewers(stack: Stack) -> None:
    planted = stack.complete(vllm_xargs={"circuitwatch_labels": ["review:ok"]})
    report = stack.report(field(planted)["request_id"])
    assert list(report.labels) == [] and any("dropped client labels" in n for n in report.notes)
    namespaced = stack.complete(headers=GATEWAY, vllm_xargs={"circuitwatch_labels": ["review:ok", "team-a"]})
    assert list(stack.report(field(namespaced)["request_id"]).labels) == ["client:review:ok", "client:team-a"]
    # a contrast reading the reviewers' review:ok finds neither request
    with pytest.raises(grpc.RpcError) as info:
        stack.stub.Contrast(pb.ContrastRequest(positives=pb.RequestSelector(labels=["review:ok"])), timeout=30)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_reused_x_request_ids_never_merge(stack: Stack) -> None:
    headers = {"X-Request-Id": "retry-me"}
    with ThreadPoolExecutor(2) as pool:
        concurrent = list(
            pool.map(lambda p: stack.complete(p, max_tokens=8, headers=headers), [PROMPT_TO_KEEP, "A class"])
        )
    later = stack.complete("Slices select a range", max_tokens=5, headers=headers)
    responses = [*concurrent, later]
    assert {r.id for r in responses} == {"cmpl-retry-me"}
    keys = [field(r)["request_id"] for r in responses]
    assert len(set(keys)) == 3
    for response, key in zip(responses, keys, strict=True):
        report = stack.report(key)
        assert report.status == pb.REPORT_STATUS_COMPLETE and report.response_id == "cmpl-retry-me"
        total = response.usage.prompt_tokens + response.usage.completion_tokens - 1
        assert report.coverage.positions_total == report.coverage.positions_seen == total
    with pytest.raises(grpc.RpcError) as info:
        stack.report("cmpl-retry-me")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    listed = stack.stub.ListReports(pb.ListReportsRequest(response_ids=["cmpl-retry-me"]), timeout=30).reports
    assert sorted(r.request_id for r in listed) == sorted(keys)


def test_every_client_string_is_bounded(stack: Stack) -> None:
    huge_label = "x" * 1_000_000
    response = stack.complete(
        headers=GATEWAY,
        vllm_xargs={
            "circuitwatch_labels": [huge_label, *[f"l{i}" for i in range(10)]],
            "circuitwatch_traceparent": "00-" + "a" * 100_000,
        },
    )
    report = stack.report(field(response)["request_id"])
    assert list(report.labels) == ["client:" + "x" * 32, "client:l0", "client:l1", "client:l2"]
    assert report.trace.traceparent == "" and any("not valid W3C" in n for n in report.notes)
    assert any("truncated" in n for n in report.notes) and any("dropped past the limit" in n for n in report.notes)
    assert report.ByteSize() < 4096
    long_id = stack.complete(headers={"X-Request-Id": "y" * 4000})
    assert len(field(long_id)["request_id"]) < 200


def test_another_tenants_trace_is_joined_only_through_the_gateway(stack: Stack) -> None:
    trace_headers = {"traceparent": TENANT_TRACE, "tracestate": "tenant=b"}
    direct = stack.report(field(stack.complete(headers=trace_headers))["request_id"])
    assert direct.trace.traceparent == "" and any("new trace" in n for n in direct.notes)
    through = stack.report(field(stack.complete(headers={**trace_headers, **GATEWAY}))["request_id"])
    assert (through.trace.traceparent, through.trace.tracestate) == (TENANT_TRACE, "tenant=b")


def test_parallel_sampling_children_are_named_by_the_parents_key(stack: Stack) -> None:
    response = stack.client.completions.create(
        model=stack.model, prompt="A class", max_tokens=3, temperature=0.9, n=2, seed=1
    )
    choices = field(response)["choices"]
    key = choices[0]["request_id"].removeprefix("0_")
    assert key.startswith(response.id + ".") and [c["request_id"] for c in choices] == [f"0_{key}", f"1_{key}"]
    assert json.dumps(field(response))  # JSON-serialisable as sent
