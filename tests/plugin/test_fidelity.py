"""SAE fidelity through real vLLM engines: the per-token reconstruction error and input norm the plugin ships equal
an independent computation (transformers forward + each format's full decoder in numpy), requests the SAEs read
badly are `low_fidelity` in the report and the OpenAI response, and mis-wiring is caught at start-up: an SAE
whose files name another layer, a baseline for another layer, and SAEs served on a model they were not made for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from circuitwatch.cli import main as cli_main
from circuitwatch.fixtures import FixturePaths
from circuitwatch.fixtures.activations import activations_at
from circuitwatch.fixtures.corpus import documents
from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto import circuitwatch_pb2_grpc as pb_grpc
from circuitwatch.proto.codec import unpack_slice
from circuitwatch.sidecar import SidecarConfig
from circuitwatch.sidecar.server import start

from support import numpy_sae
from support.plugin_harness import TOLERANCE, GroundTruth, slot_specs, write_plugin_config
from support.processes import free_port, start_sidecar, start_vllm, stop

pytestmark = pytest.mark.vllm

ENGINE = {"dtype": "float32", "max_model_len": 512, "max_num_batched_tokens": 64, "max_num_seqs": 32, "seed": 0}
# the numpy implementation of each slot's format (slot_specs: SAELens TopK, Gemma Scope, sparsify)
NUMPY_ACTIVATIONS = (numpy_sae.saelens_activations, numpy_sae.gemmascope_activations, numpy_sae.sparsify_activations)


@pytest.fixture(scope="module")
def baselines(fixtures: FixturePaths, tmp_path_factory) -> list[Path]:
    """`circuitwatch calibrate` for each slot, on the built-in sample (the text the fixture model learnt)."""
    out = tmp_path_factory.mktemp("baselines")
    paths = []
    for spec in slot_specs(fixtures):
        path = out / f"layer_{spec['layer']}.json"
        argv = ["calibrate", "--model", str(fixtures.model), "--sae", spec["sae"], "--layer", str(spec["layer"])]
        assert cli_main([*argv, "--max-documents", "40", "--out", str(path)]) == 0
        paths.append(path)
    return paths


def calibrated_slots(fixtures: FixturePaths, baselines: list[Path]) -> list[dict]:
    return [{**spec, "baseline": str(path)} for spec, path in zip(slot_specs(fixtures), baselines, strict=True)]


def byte_soup(seed: int, length: int) -> str:
    """Characters from Latin-1 and beyond: nothing like the English the model and its SAEs were trained on."""
    rng = np.random.default_rng(seed)
    return "".join(chr(c) for c in rng.integers(0x21, 0x2FF, length))


def fidelity_in_sidecar(stub, request_id: str) -> dict[tuple[int, int], tuple[float, float, dict[int, float]]]:
    """{(slot, position): (reconstruction error, input norm, codes)} as GetCodes returns them."""
    out = {}
    for wire in stub.GetCodes(pb.GetCodesRequest(request_id=request_id), timeout=30).slices:
        arrays = unpack_slice(wire)
        assert arrays.errors is not None and arrays.norms is not None, "slices without fidelity"
        offsets = arrays.row_offsets.tolist()
        for i, position in enumerate(arrays.positions.tolist()):
            a, b = offsets[i], offsets[i + 1]
            codes = dict(
                zip(arrays.feature_ids[a:b].tolist(), arrays.activations[a:b].astype(float).tolist(), strict=True)
            )
            out[(arrays.slot, position)] = (float(arrays.errors[i]), float(arrays.norms[i]), codes)
    return out


@dataclass
class IndependentFidelity:
    """One slot's independent reading of a request: per position (error, norm) from the codes numpy selects,
    and what it takes to recompute the error from other codes."""

    fidelity: np.ndarray  # [positions, 2]
    x: np.ndarray  # [positions, d_in] float64 residual stream
    activations: np.ndarray
    margins: np.ndarray
    directory: Path
    width: int

    def matches(self, position: int, error: float, norm: float, shipped: dict[int, float]) -> bool:
        """Equal to the independent error and norm; or, where the plugin's codes differ from numpy's only by a
        float-level near-tie (a feature at its threshold or tied for the last place, which vLLM's CPU kernels
        and transformers may round either way), equal to the independent decoder's error of the shipped codes."""
        want_error, want_norm = self.fidelity[position]
        if not np.isclose(norm, want_norm, rtol=1e-3):
            return False
        if np.isclose(error, want_error, rtol=1e-2, atol=1e-3):
            return True
        row = slice(position, position + 1)
        if numpy_sae.code_mismatches([shipped], self.activations[row], self.margins[row], self.width, TOLERANCE):
            return False
        dense = np.zeros((1, self.activations.shape[1]))
        dense[0, list(shipped)] = list(shipped.values())
        recomputed = numpy_sae.reconstruction_errors(self.directory, self.x[row], dense)[0]
        return bool(np.isclose(error, recomputed, rtol=1e-2, atol=1e-3))


def independent_fidelity(fixtures: FixturePaths, truth: GroundTruth, tokens: list[int]) -> list[IndependentFidelity]:
    """Per slot: transformers' residual stream; each format's numpy encoder, the codes the slot emits (its
    `width` strongest features), and the SAE's full decoder read from the files."""
    processed = tokens[:-1]  # the last sampled token never goes through the model
    streams = activations_at(truth.model, torch.tensor([processed]), [tap for tap, _ in truth.encoders])
    out = []
    for (tap, encoder), spec, activations_of in zip(
        truth.encoders, slot_specs(fixtures), NUMPY_ACTIVATIONS, strict=True
    ):
        x = streams[tap][0].double().numpy()
        directory = Path(spec["sae"])
        activations, margins = activations_of(directory, x)
        width = encoder.selection.width
        dense = np.zeros_like(activations)
        for row, codes in enumerate(numpy_sae.codes(activations, width)):
            dense[row, list(codes)] = list(codes.values())
        errors = numpy_sae.reconstruction_errors(directory, x, dense)
        fidelity = np.stack([errors, np.linalg.norm(x, axis=1)], axis=1)
        out.append(IndependentFidelity(fidelity, x, activations, margins, directory, width))
    return out


def test_fidelity_through_the_server_equals_ground_truth_and_flags_what_the_saes_cannot_read(
    fixtures: FixturePaths, tmp_path: Path, baselines: list[Path]
) -> None:
    from openai import OpenAI
    from transformers import AutoTokenizer

    sidecar_port, vllm_port = free_port(), free_port()
    sidecar = start_sidecar(tmp_path, sidecar_port, log_name="sidecar.log")
    plugin = write_plugin_config(
        tmp_path / "plugin.json",
        fixtures,
        sidecar_port,
        slots=calibrated_slots(fixtures, baselines),
        response_deadline_ms=3000,
        wiring_check={"tokens": 64},
    )
    server = start_vllm(fixtures.model, tmp_path, vllm_port, plugin)
    client = OpenAI(base_url=f"http://127.0.0.1:{vllm_port}/v1", api_key="unused", timeout=120)
    stub = pb_grpc.MonitorStub(grpc.insecure_channel(f"127.0.0.1:{sidecar_port}"))
    tokenizer = AutoTokenizer.from_pretrained(fixtures.model)
    corpus = [tokenizer(text)["input_ids"][: 40 + 9 * i] for i, text in enumerate(documents()[50:56])]
    soup = [byte_soup(seed, 90) for seed in range(2)]
    try:
        served = []
        for prompt in [*corpus, *soup]:
            response = client.completions.create(
                model=str(fixtures.model),
                prompt=prompt,
                max_tokens=4,
                temperature=0.0,
                extra_body={"return_token_ids": True},
            )
            choice = response.choices[0]
            prompt_ids = choice.model_extra.get("prompt_token_ids") or response.model_extra["prompt_token_ids"]
            served.append(
                (response.model_extra["circuitwatch"], list(prompt_ids) + list(choice.model_extra["token_ids"]))
            )

        # in-distribution text reads well; byte soup does not, and says so in the response and the report
        for carried, tokens in served[: len(corpus)]:
            assert carried["status"] == "complete", carried
            assert [f["low_fidelity"] for f in carried["fidelity"]] == [False] * 3, carried
            assert all(f["tokens"] == len(tokens) - 1 for f in carried["fidelity"]), carried
        for carried, _ in served[len(corpus) :]:
            assert carried["status"] == "low_fidelity", carried
            assert any(f["low_fidelity"] for f in carried["fidelity"]), carried
            report = stub.GetReport(pb.GetReportRequest(request_id=carried["request_id"]), timeout=30)
            assert report.status == pb.REPORT_STATUS_LOW_FIDELITY
            low = [f for f in report.fidelity if f.low_fidelity]
            assert all(f.fraction_above_threshold > 0.5 and "from calibration" in f.note for f in low), low

        # every position's error and norm equal the independent computation
        truth = GroundTruth(fixtures)
        problems = []
        for carried, tokens in served:
            shipped = fidelity_in_sidecar(stub, carried["request_id"])
            for slot, expected in enumerate(independent_fidelity(fixtures, truth, tokens)):
                for position, (error, norm) in enumerate(expected.fidelity):
                    got = shipped.get((slot, position))
                    if got is None:
                        problems.append(f"{carried['request_id']} slot {slot} position {position}: not measured")
                    elif not expected.matches(position, *got):
                        problems.append(
                            f"{carried['request_id']} slot {slot} position {position}: {got[:2]} != ({error}, {norm})"
                        )
        assert not problems, problems[:10]

        # the start-up wiring check passed for every slot, against its calibration
        health = stub.GetHealth(pb.GetHealthRequest(), timeout=30)
        assert len(health.slots) == 3
        for slot in health.slots:
            checks = list(slot.wiring.values())
            assert [c.verdict for c in checks] == [pb.WIRING_VERDICT_OK], (slot.sae, checks)
            assert "as calibrated" in checks[0].detail and checks[0].tokens >= 64
            assert slot.baseline.tokens > 0 and slot.state == pb.SLOT_STATE_WARMING_UP, slot
    finally:
        stop(server)
        stop(sidecar)


def test_saes_on_a_model_they_were_not_made_for_are_miswired_and_every_report_is_low_fidelity(
    fixtures: FixturePaths, tmp_path: Path, monkeypatch, baselines: list[Path], caplog
) -> None:
    """The untrained fixture model has the trained one's architecture (the baselines' model fingerprint matches)
    but other weights: its residual norm is ~20x smaller and the SAEs explain none of it."""
    from vllm import LLM, SamplingParams

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    running = start(SidecarConfig(listen="127.0.0.1:0", evidence_dir=tmp_path / "evidence"))
    try:
        config = write_plugin_config(
            tmp_path / "plugin.json",
            fixtures,
            running.port,
            slots=calibrated_slots(fixtures, baselines),
            wiring_check={"tokens": 32},
        )
        monkeypatch.setenv("CIRCUITWATCH_CONFIG", str(config))
        llm = LLM(model=str(fixtures.untrained_model), enforce_eager=True, **ENGINE)
        stub = pb_grpc.MonitorStub(grpc.insecure_channel(f"127.0.0.1:{running.port}"))
        try:
            with caplog.at_level(logging.ERROR, logger="circuitwatch"):
                outputs = llm.generate(
                    [{"prompt_token_ids": list(range(5 + i, 60 + i))} for i in range(4)],
                    SamplingParams(temperature=0.0, max_tokens=4),
                )
                reports = [
                    stub.GetReport(pb.GetReportRequest(request_id=output.request_id, wait_ms=30_000), timeout=60)
                    for output in outputs
                ]
            health = stub.GetHealth(pb.GetHealthRequest(), timeout=30)  # while the producer is connected
        finally:
            llm.llm_engine.engine_core.shutdown() if hasattr(llm.llm_engine, "engine_core") else None
            del llm
        logged = [(r.name, r.getMessage()) for r in caplog.records if "MIS-WIRED" in r.getMessage()]
        for source in ("circuitwatch.plugin.wiring", "circuitwatch.sidecar.core"):  # once per slot, loudly
            messages = [message for name, message in logged if name == source]
            assert len(messages) == 3 and all(f"slot {i} (" in messages[i] for i in range(3)), logged

        assert len(health.slots) == 3
        for slot in health.slots:
            (check,) = slot.wiring.values()
            assert check.verdict == pb.WIRING_VERDICT_MISWIRED, check
            assert "the norm is" in check.detail and "explain almost nothing" in check.detail, check.detail
            assert slot.state == pb.SLOT_STATE_MISWIRED, slot
        for report in reports:
            assert report.status == pb.REPORT_STATUS_LOW_FIDELITY, report
            assert all(f.low_fidelity for f in report.fidelity) and len(report.fidelity) == 3, report.fidelity
            assert all(f.error_mean > 1 for f in report.fidelity), report.fidelity
    finally:
        running.stop(1)


@pytest.mark.parametrize(
    ("slot", "message"),
    [
        # the SAELens file says blocks.1 / model.layers.1: refused on layer 2
        (
            lambda f, b: {"layer": 2, "sae": str(f.topk_sae(1))},
            r"slots\[0\]: SAE .*layer_1 was trained on L1.resid_post \(model.layers.1\), "
            r"but the slot taps L2.resid_post",
        ),
        # right layer, wrong hook point: both named
        (
            lambda f, b: {"layer": 1, "hook_point": "mlp_out", "sae": str(f.tap_sae("attn_out"))},
            r"slots\[0\]: SAE .* was trained on L1.attn_out \(blocks.1.hook_attn_out\), but the slot taps L1.mlp_out",
        ),
        # a per-head SAE on another head
        (
            lambda f, b: {"layer": 1, "hook_point": "attn_z", "head": 0, "sae": str(f.tap_sae("attn_z_head"))},
            r"slots\[0\]: SAE .* was trained on head 2 .*, but the slot taps L1.attn_z.h0",
        ),
        # the operator overrides the metadata check, but the baseline was measured on layer 2
        (
            lambda f, b: {
                "layer": 3,
                "sae": str(f.gemmascope_safetensors),
                "check_sae_metadata": False,
                "baseline": str(b[1]),
            },
            r"slots\[0\]\.baseline: .*layer/hook_point/head: calibrated at L2.resid_post but this slot reads "
            r"L3.resid_post",
        ),
    ],
    ids=["sae-layer", "sae-hook-point", "sae-head", "baseline"],
)
def test_an_sae_for_another_tap_is_refused_at_start_naming_the_slot(
    fixtures: FixturePaths, tmp_path: Path, monkeypatch, baselines: list[Path], slot, message: str
) -> None:
    from vllm import LLM

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    config = write_plugin_config(tmp_path / "plugin.json", fixtures, free_port(), slots=[slot(fixtures, baselines)])
    monkeypatch.setenv("CIRCUITWATCH_CONFIG", str(config))

    def start_engine() -> None:
        llm = LLM(model=str(fixtures.model), enforce_eager=True, **ENGINE)
        llm.llm_engine.engine_core.shutdown()  # only reached if the test fails

    with pytest.raises(Exception, match=message):
        start_engine()
