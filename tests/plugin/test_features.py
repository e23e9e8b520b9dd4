"""Plugin behaviour through a real vLLM engine: opt-in and labels, prefix-cache policy (bypass vs
accept_gaps, with a real cache hit), parallel sampling, and a bad configuration failing start-up."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from circuitwatch.fixtures import FixturePaths
from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto import circuitwatch_pb2_grpc as pb_grpc
from circuitwatch.sidecar import SidecarConfig
from circuitwatch.sidecar.server import start

from support.plugin_harness import write_plugin_config

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def long_prompt(fixtures: FixturePaths) -> list[int]:
    """300 tokens of help-topic text (two full 128-token blocks can be cached): text the fixture SAEs read
    well, so the status reflects coverage alone (arbitrary token ids would rightly be low_fidelity)."""
    from transformers import AutoTokenizer

    from circuitwatch.fixtures.corpus import documents

    tokenizer = AutoTokenizer.from_pretrained(fixtures.model)
    prompt = next(ids for ids in (tokenizer(text)["input_ids"] for text in documents()) if len(ids) >= 300)
    return prompt[:300]


def engine(fixtures: FixturePaths, tmp_path: Path, monkeypatch, **plugin):
    from vllm import LLM

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    running = start(SidecarConfig(listen="127.0.0.1:0", evidence_dir=tmp_path / "evidence"))
    monkeypatch.setenv(
        "CIRCUITWATCH_CONFIG", str(write_plugin_config(tmp_path / "plugin.json", fixtures, running.port, **plugin))
    )
    llm = LLM(model=str(fixtures.model), dtype="float32", max_model_len=512, enforce_eager=True, seed=0)
    stub = pb_grpc.MonitorStub(grpc.insecure_channel(f"127.0.0.1:{running.port}"))
    return llm, stub, running


def report(stub, request_id: str, wait_ms: int = 10_000) -> pb.Report:
    return stub.GetReport(pb.GetReportRequest(request_id=request_id, wait_ms=wait_ms), timeout=60)


def test_opt_in_labels_and_parallel_sampling(fixtures: FixturePaths, tmp_path: Path, monkeypatch) -> None:
    from vllm import SamplingParams

    llm, stub, running = engine(fixtures, tmp_path, monkeypatch, monitor="opt-in", client_controls={"labels": True})
    try:
        opted_in = SamplingParams(
            temperature=0,
            max_tokens=5,
            extra_args={"circuitwatch_monitor": True, "circuitwatch_labels": ["team-a", "eval"]},
        )
        not_asked = SamplingParams(temperature=0, max_tokens=5)
        siblings = SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=6, extra_args={"circuitwatch_monitor": "1"})
        outputs = llm.generate([{"prompt_token_ids": [1, 40, 50, 60]}] * 3, [opted_in, not_asked, siblings])
        monitored = report(stub, outputs[0].request_id)
        assert monitored.status == pb.REPORT_STATUS_COMPLETE
        assert list(monitored.labels) == ["client:team-a", "client:eval"]  # the caller's, never a reviewer's
        assert monitored.response_id == outputs[0].request_id and monitored.request_id != monitored.response_id
        with pytest.raises(grpc.RpcError) as info:
            report(stub, outputs[1].request_id, wait_ms=500)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        # parallel sampling: vLLM's child naming "<index>_<id>", one report per child
        parent = outputs[2].request_id
        children = [report(stub, f"{i}_{parent}") for i in range(2)]
        assert all(r.status == pb.REPORT_STATUS_COMPLETE for r in children)
        for child, completion in zip(children, outputs[2].outputs, strict=True):
            assert child.coverage.positions_total == 4 + len(completion.token_ids) - 1
    finally:
        del llm
        running.stop(1)


@pytest.mark.parametrize("policy", ["bypass", "accept_gaps"])
def test_prefix_cache_policy(
    fixtures: FixturePaths, tmp_path: Path, monkeypatch, policy: str, long_prompt: list[int]
) -> None:
    from vllm import SamplingParams

    llm, stub, running = engine(fixtures, tmp_path, monkeypatch, prefix_cache=policy)
    try:
        params = SamplingParams(temperature=0, max_tokens=4)
        first = llm.generate([{"prompt_token_ids": long_prompt}], params)[0]
        second = llm.generate([{"prompt_token_ids": long_prompt}], params)[0]  # the same prompt again
        assert report(stub, first.request_id).status == pb.REPORT_STATUS_COMPLETE
        again = report(stub, second.request_id)
        total = len(long_prompt) + len(second.outputs[0].token_ids) - 1
        assert again.coverage.positions_total == total
        if policy == "bypass":  # monitored requests never read the cache: every position computed and encoded
            assert again.status == pb.REPORT_STATUS_COMPLETE
            assert again.coverage.positions_seen == total
        else:  # the cache hit is reported as a gap, never hidden
            assert again.status == pb.REPORT_STATUS_INCOMPLETE
            gaps = {(g.slot, g.start, g.end, g.reason) for g in again.coverage.gaps}
            assert gaps == {(slot, 0, 256, pb.GAP_REASON_PREFIX_CACHE) for slot in range(3)}
            assert again.coverage.positions_seen == total - 256
    finally:
        del llm
        running.stop(1)


def test_bad_configuration_fails_startup_with_the_reason(fixtures: FixturePaths, tmp_path: Path, monkeypatch) -> None:
    from vllm import LLM

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    bad = tmp_path / "plugin.yaml"
    bad.write_text(f"slots:\n  - {{layer: 2, sae: {fixtures.topk_sae(1).parent / 'layer_9'}}}\n")
    monkeypatch.setenv("CIRCUITWATCH_CONFIG", str(bad))
    with pytest.raises(Exception) as info:  # noqa: PT011 - vLLM wraps engine start-up errors; the chain is checked
        LLM(model=str(fixtures.model), dtype="float32", max_model_len=256, enforce_eager=True)
    chain, error = [], info.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    assert any("layer_9: path does not exist" in text for text in chain), chain
