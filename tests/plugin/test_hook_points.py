"""Every hook point through a real vLLM engine: codes at resid_pre (layer 0: the embeddings), attn_out, attn_z (all
heads, and one head), mlp_in (a transcoder) and mlp_out equal the independent ground truth (transformers' own
modules hooked: the decoder layer's input, `self_attn`'s output, `o_proj`'s input, `mlp`'s input and output, then
the reference encoder), for concurrent requests with chunked prefill, in eager and compiled mode.

The slots take their hook point from the SAEs' own files (SAELens hook names and hook_head_index, Gemma Scope's
"-att" release path, sparsify's `layers.2.mlp` with and without `transcode`), except one that states it: the
layer-1 residual SAE read as layer 2's resid_pre, the same stream under its other name."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from circuitwatch.fixtures import FixturePaths
from circuitwatch.kernels.hook_points import HookPoint, Tap
from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto import circuitwatch_pb2_grpc as pb_grpc
from circuitwatch.sidecar import SidecarConfig
from circuitwatch.sidecar.server import start

from support.plugin_harness import GroundTruth, generate, prompts, write_plugin_config
from support.sidecar_harness import codes_in_sidecar

pytestmark = pytest.mark.vllm

# (slot config, where the test says it reads, the hook point label the manifest must carry)
SLOTS = [
    ("resid_pre", {"layer": 0}, Tap(0, HookPoint.RESID_PRE)),
    ("attn_out", {"layer": 1}, Tap(1, HookPoint.ATTN_OUT)),
    ("attn_z", {"layer": 1}, Tap(1, HookPoint.ATTN_Z)),
    ("attn_z_head", {"layer": 1}, Tap(1, HookPoint.ATTN_Z, 2)),
    ("mlp_out", {"layer": 2}, Tap(2, HookPoint.MLP_OUT)),
    ("transcoder", {"layer": 2}, Tap(2, HookPoint.MLP_IN)),
    (None, {"layer": 2, "hook_point": "resid_pre"}, Tap(1, HookPoint.RESID_POST)),
]


def slot_specs(fixtures: FixturePaths) -> list[dict]:
    return [{**spec, "sae": str(fixtures.tap_sae(name) if name else fixtures.topk_sae(1))} for name, spec, _ in SLOTS]


@pytest.fixture(scope="module")
def token_prompts(fixtures: FixturePaths):
    from transformers import AutoTokenizer

    return prompts(AutoTokenizer.from_pretrained(fixtures.model), count=12)


@pytest.fixture(scope="module")
def ground_truth(fixtures: FixturePaths) -> GroundTruth:
    return GroundTruth(fixtures, slot_specs(fixtures), [tap for _, _, tap in SLOTS])


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "compiled"])
def test_codes_at_every_hook_point_equal_ground_truth(
    fixtures: FixturePaths, tmp_path: Path, monkeypatch, token_prompts, ground_truth: GroundTruth, enforce_eager
) -> None:
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    running = start(SidecarConfig(listen="127.0.0.1:0", evidence_dir=tmp_path / "evidence"))
    try:
        config = write_plugin_config(tmp_path / "plugin.json", fixtures, running.port, slots=slot_specs(fixtures))
        monkeypatch.setenv("CIRCUITWATCH_CONFIG", str(config))
        outputs = generate(fixtures, token_prompts, enforce_eager)
        stub = pb_grpc.MonitorStub(grpc.insecure_channel(f"127.0.0.1:{running.port}"))
        problems = {}
        for request_id, prompt, generated in outputs:
            report = stub.GetReport(pb.GetReportRequest(request_id=request_id, wait_ms=30_000), timeout=60)
            tokens = prompt + generated
            assert report.status in (pb.REPORT_STATUS_COMPLETE, pb.REPORT_STATUS_LOW_FIDELITY), report.coverage
            assert report.coverage.positions_seen == len(tokens) - 1
            described = [(s.layer, s.hook_point, s.head if s.HasField("head") else None) for s in report.saes]
            assert described == [
                (0, "resid_pre", None),
                (1, "attn_out", None),
                (1, "attn_z", None),
                (1, "attn_z", 2),
                (2, "mlp_out", None),
                (2, "mlp_in", None),
                (2, "resid_pre", None),
            ]
            found = ground_truth.mismatches(tokens, codes_in_sidecar(stub, request_id))
            if found:
                problems[request_id] = found[:5]
        assert not problems, problems
        assert any(len(p) > 64 for _, p, _ in outputs), "some prompts span several prefill chunks"
    finally:
        running.stop(1)
