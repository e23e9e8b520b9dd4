"""The multi-process path: vLLM's OpenAI server (spawned engine core and worker) with the plugin, a sidecar
process, the `openai` client. Codes equal ground truth; killing the sidecar never stops serving; and every
request it cut gets a report, outage or not: what was lost with the sidecar is a SIDECAR_UNAVAILABLE gap, and
the client's trace context and labels survive the restart."""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from circuitwatch.fixtures import FixturePaths
from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto import circuitwatch_pb2_grpc as pb_grpc
from circuitwatch.response import read_monitoring

from support.plugin_harness import GroundTruth, prompts, write_plugin_config
from support.processes import free_port, start_sidecar, start_vllm, stop
from support.sidecar_harness import codes_in_sidecar

pytestmark = pytest.mark.vllm


TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
SIDECAR_CONFIG = "finish_grace_ms: 5000\n"  # a restarted sidecar waits this long for resent starts


def complete(
    client, model: str, request_id: str, prompt: list[int], max_tokens: int, headers=None, **extra
) -> tuple[str, list[int]]:
    """One completion; returns the sidecar's id for it (its unique key, as the response says) and the full token
    sequence (prompt + generated).

    Request gt-0 carries a W3C traceparent header, gt-1 the same context through vllm_xargs."""
    headers = {"X-Request-Id": request_id, **(headers or {})}
    body = {"return_token_ids": True, **extra}
    if request_id == "gt-0":
        headers |= {"traceparent": TRACE, "tracestate": "vendor=a"}
    if request_id == "gt-1":
        body["vllm_xargs"] = {"circuitwatch_traceparent": TRACE}
    response = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0.0,
        extra_body=body,
        extra_headers=headers,
    )
    choice = response.choices[0]
    assert response.id == f"cmpl-{request_id}"
    prompt_ids = choice.model_extra.get("prompt_token_ids") or response.model_extra.get("prompt_token_ids")
    assert list(prompt_ids) == prompt
    key = response.model_extra["circuitwatch"]["request_id"]
    assert key.startswith(response.id + ".")
    return key, list(prompt_ids) + list(choice.model_extra["token_ids"])


def stream_tokens(client, model: str, request_id: str, prompt: list[int], max_tokens: int) -> dict:
    """A streamed completion: how many token chunks arrived, whether the first came before the circuitwatch
    chunk, and that chunk's monitoring as a client reads it (circuitwatch.response)."""
    stream = client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0, stream=True,
        extra_body={"min_tokens": max_tokens, "ignore_eos": True}, extra_headers={"X-Request-Id": request_id},
    )  # fmt: skip
    order, monitoring = [], None
    for chunk in stream:
        if chunk.choices:
            order.append("token")
        if (read := read_monitoring(chunk)) is not None:
            order.append("circuitwatch")
            monitoring = read
    return {
        "tokens": order.count("token"),
        "first_token_before_report_chunk": bool(order) and order[0] == "token" and order[-1] == "circuitwatch",
        "monitoring": monitoring,
    }


def wait_until_open(stub, response_ids: list[str], timeout_s: float = 60) -> None:
    """Until the sidecar holds every one of these requests open (their starts and first codes arrived)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            reports = [stub.GetReport(pb.GetReportRequest(request_id=r), timeout=5) for r in response_ids]
        except grpc.RpcError:
            time.sleep(0.05)
            continue
        if all(r.status == pb.REPORT_STATUS_PENDING for r in reports):
            return
        raise AssertionError("a request finished before the sidecar could be killed under it")
    raise TimeoutError("the requests never reached the sidecar")


def assert_reported_across_outage(stub, key: str, tokens: list[int]) -> int:
    """A request served across a sidecar outage has a report; whatever it lacks is a SIDECAR_UNAVAILABLE gap,
    or a BACKPRESSURE gap (with a 2-batch queue, a step that overflows it right after the reconnect, while the
    emitter replays what the new sidecar lacks, is back-pressure), and it kept its trace context and labels.
    Returns its status."""
    report = stub.GetReport(pb.GetReportRequest(request_id=key, wait_ms=30_000), timeout=60)
    assert report.status in (pb.REPORT_STATUS_COMPLETE, pb.REPORT_STATUS_INCOMPLETE), (key, report)
    assert report.coverage.positions_total == len(tokens) - 1, (key, report.coverage)
    reasons = {g.reason for g in report.coverage.gaps}
    assert reasons <= {pb.GAP_REASON_SIDECAR_UNAVAILABLE, pb.GAP_REASON_BACKPRESSURE}, (key, report.coverage)
    if report.status == pb.REPORT_STATUS_INCOMPLETE:
        assert report.coverage.gaps, report.coverage
    assert report.trace.traceparent == TRACE and list(report.labels) == ["client:kept"], (key, report)
    return report.status


def test_server_ground_truth_and_sidecar_outage(fixtures: FixturePaths, tmp_path: Path) -> None:
    from openai import OpenAI
    from transformers import AutoTokenizer

    sidecar_port, vllm_port = free_port(), free_port()
    sidecar = start_sidecar(tmp_path, sidecar_port, SIDECAR_CONFIG, log_name="sidecar.log")
    plugin_config = write_plugin_config(
        tmp_path / "plugin.json", fixtures, sidecar_port, queue_max_batches=2, client_controls={"labels": True}
    )
    config = json.loads(plugin_config.read_text())
    config["sidecar"]["reconnect_max_s"] = 0.5  # reconnect quickly once the sidecar is back
    plugin_config.write_text(json.dumps(config))
    server = start_vllm(fixtures.model, tmp_path, vllm_port, plugin_config)
    client = OpenAI(base_url=f"http://127.0.0.1:{vllm_port}/v1", api_key="unused", timeout=120)
    model = str(fixtures.model)
    token_prompts = prompts(AutoTokenizer.from_pretrained(fixtures.model), count=16)
    try:
        # 1. 16 concurrent requests: every code equals ground truth
        with ThreadPoolExecutor(16) as pool:
            served = list(
                pool.map(lambda i: complete(client, model, f"gt-{i}", token_prompts[i], 3 + (i * 5) % 19), range(16))
            )
        stub = pb_grpc.MonitorStub(grpc.insecure_channel(f"127.0.0.1:{sidecar_port}"))
        truth = GroundTruth(fixtures)
        for sidecar_id, tokens in served:
            report = stub.GetReport(pb.GetReportRequest(request_id=sidecar_id, wait_ms=30_000), timeout=60)
            assert report.status == pb.REPORT_STATUS_COMPLETE, (sidecar_id, report.coverage)
            assert report.coverage.positions_total == len(tokens) - 1
            problems = truth.mismatches(tokens, codes_in_sidecar(stub, sidecar_id))
            assert not problems, (sidecar_id, problems[:5])
            expected_trace = TRACE if sidecar_id.startswith(("cmpl-gt-0.", "cmpl-gt-1.")) else ""
            assert report.trace.traceparent == expected_trace, sidecar_id
        assert stub.GetReport(pb.GetReportRequest(request_id="cmpl-gt-0")).trace.tracestate == "vendor=a"

        # 2. the sidecar dies (SIGKILL) while requests run: they finish, and once it is back each reports what
        # was lost with it as SIDECAR_UNAVAILABLE (never MISSING), with the client's trace and labels
        traced = {"traceparent": TRACE}
        labels = {"vllm_xargs": {"circuitwatch_labels": ["kept"]}, "ignore_eos": True}
        with ThreadPoolExecutor(4) as pool:
            running = [
                pool.submit(complete, client, model, f"cut-{i}", token_prompts[i], 300, headers=traced, **labels)
                for i in range(4)
            ]
            wait_until_open(stub, [f"cmpl-cut-{i}" for i in range(4)])
            sidecar.send_signal(signal.SIGKILL)
            sidecar.wait(10)
            time.sleep(1)
            sidecar = start_sidecar(tmp_path, sidecar_port, SIDECAR_CONFIG, log_name="sidecar.log")
            cut = [f.result() for f in running]
        stub = pb_grpc.MonitorStub(grpc.insecure_channel(f"127.0.0.1:{sidecar_port}"))
        statuses = [assert_reported_across_outage(stub, key, tokens) for key, tokens in cut]
        assert pb.REPORT_STATUS_INCOMPLETE in statuses, "the kill cut no request: the test did not test"

        # 3. the sidecar freezes, every request finishes, then it is killed before any report is final: after
        # the restart each request still has its report (nothing ends as "never seen")
        sidecar.send_signal(signal.SIGSTOP)
        with ThreadPoolExecutor(8) as pool:
            frozen = list(
                pool.map(
                    lambda i: complete(client, model, f"frozen-{i}", token_prompts[i], 4, headers=traced, **labels),
                    range(8),
                )
            )
            # the first token never waits for the monitor: a stream served while the sidecar cannot answer at
            # all gets every token, and its circuitwatch chunk (after the last token) says pending
            streamed = pool.submit(stream_tokens, client, model, "frozen-stream", token_prompts[8], 12).result()
        assert streamed["tokens"] == 12 and streamed["first_token_before_report_chunk"], streamed
        assert streamed["monitoring"] is not None and streamed["monitoring"].pending, streamed
        sidecar.send_signal(signal.SIGKILL)
        sidecar.wait(10)
        sidecar = start_sidecar(tmp_path, sidecar_port, SIDECAR_CONFIG, log_name="sidecar.log")
        stub = pb_grpc.MonitorStub(grpc.insecure_channel(f"127.0.0.1:{sidecar_port}"))
        statuses = [assert_reported_across_outage(stub, key, tokens) for key, tokens in frozen]
        assert set(statuses) == {pb.REPORT_STATUS_INCOMPLETE}

        # 4. the sidecar is down (SIGKILL): vLLM keeps serving every request
        sidecar.send_signal(signal.SIGKILL)
        sidecar.wait(10)
        with ThreadPoolExecutor(6) as pool:
            during = list(pool.map(lambda i: complete(client, model, f"outage-{i}", token_prompts[i], 16), range(6)))
        assert all(len(tokens) > len(token_prompts[i]) for i, (_, tokens) in enumerate(during))

        # 5. the sidecar comes back: the queued finish markers and gap reports arrive; new requests are complete
        sidecar = start_sidecar(tmp_path, sidecar_port, SIDECAR_CONFIG, log_name="sidecar.log")
        stub = pb_grpc.MonitorStub(grpc.insecure_channel(f"127.0.0.1:{sidecar_port}"))
        for attempt in range(5):  # once the plugin has reconnected (back-off <= 0.5 s), new requests are complete
            time.sleep(1)
            after_id, after_tokens = complete(client, model, f"after-{attempt}", token_prompts[3], 8)
            report = stub.GetReport(pb.GetReportRequest(request_id=after_id, wait_ms=30_000), timeout=60)
            if report.status == pb.REPORT_STATUS_COMPLETE:
                break
        assert report.status == pb.REPORT_STATUS_COMPLETE, report.coverage
        assert not truth.mismatches(after_tokens, codes_in_sidecar(stub, after_id))
        for sidecar_id, tokens in during:
            report = stub.GetReport(pb.GetReportRequest(request_id=sidecar_id, wait_ms=30_000), timeout=60)
            assert report.status == pb.REPORT_STATUS_INCOMPLETE, (sidecar_id, report)
            assert report.coverage.positions_total == len(tokens) - 1
            assert report.coverage.positions_seen < report.coverage.positions_total
            assert {g.reason for g in report.coverage.gaps} == {pb.GAP_REASON_SIDECAR_UNAVAILABLE}, report.coverage
    finally:
        stop(server)
        stop(sidecar)
