"""The drift alarm on real activations: the fixture model's residual stream encoded by its calibrated layer-1 SAE
(the baseline `make fixtures` wrote), streamed into a real sidecar on 127.0.0.1 with per-token errors and norms.
Help-topic text keeps the SAE `ok`; byte soup raises the alarm with the default rule. The rates behind the
defaults (false alarms over 8M tokens, detection delays) are measured by bench/drift_bench.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from circuitwatch.fixtures import FixturePaths
from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto.codec import pack_slice

from support.sidecar_harness import manifest, running_sidecar

torch = pytest.importorskip("torch")  # the sidecar needs no torch; this test needs the model


def requests_from(fixtures: FixturePaths, token_lists: list[list[int]], first: int) -> list[pb.IngestMessage]:
    """Each token list run through the fixture model; its layer-1 residual encoded with fidelity, one request
    per list, as a producer would send it."""
    from transformers import AutoModelForCausalLM

    from circuitwatch.fixtures.activations import residual_stream
    from circuitwatch.kernels import ReferenceEncoder, load_sae
    from circuitwatch.kernels.selection import selection_for

    model = AutoModelForCausalLM.from_pretrained(fixtures.model, dtype=torch.float32).eval()
    sae = load_sae(fixtures.topk_sae(1))
    encoder = ReferenceEncoder(sae, selection_for("default", None, sae, 64))
    messages = []
    for i, ids in enumerate(token_lists):
        codes = encoder.encode(residual_stream(model, torch.tensor([ids]), [1])[1][0])
        offsets, features, activations = codes.to_csr()
        request_id = f"r{first + i}"
        batch = pack_slice(
            request_id, 0, 0, pb.PHASE_PROMPT, np.asarray(ids), offsets, features, activations,
            codes.errors.numpy(), codes.norms.numpy(),
        )  # fmt: skip
        finish = pb.RequestFinish(
            request_id=request_id, num_prompt_tokens=len(ids), num_generated_tokens=1, num_positions=len(ids)
        )
        messages += [
            pb.IngestMessage(codes=pb.CodeBatch(step=first + i, slices=[batch])),
            pb.IngestMessage(finish=finish),
        ]
    return messages


def test_help_topics_stay_ok_and_byte_soup_raises_the_alarm(fixtures: FixturePaths, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from circuitwatch.fixtures.corpus import documents
    from circuitwatch.kernels import load_sae
    from circuitwatch.kernels.baseline import default_path, load_baseline
    from circuitwatch.kernels.hook_points import Tap
    from circuitwatch.plugin.config import SlotConfig
    from circuitwatch.plugin.slots import baseline_proto

    tokenizer = AutoTokenizer.from_pretrained(fixtures.model)
    sae = load_sae(fixtures.topk_sae(1))
    slot = SlotConfig(layer=1, sae=fixtures.topk_sae(1))
    calibrated = manifest(layers=(1,), d_sae=sae.spec.d_sae)
    calibrated.slots[0].baseline.CopyFrom(baseline_proto(load_baseline(default_path(sae), sae, Tap(1)), slot))

    rng = np.random.default_rng(0)
    prose = [ids[:200] for ids in (tokenizer(text)["input_ids"] for text in documents()[1::2]) if len(ids) >= 64]
    soup_texts = ["".join(chr(c) for c in rng.integers(0x21, 0x2FF, 120)) for _ in range(60)]
    soup = [tokenizer(text)["input_ids"][:200] for text in soup_texts]
    in_distribution = requests_from(fixtures, prose, 0)
    shifted = requests_from(fixtures, soup, 1000)

    with running_sidecar(tmp_path) as (_, client):
        client.ingest([pb.IngestMessage(manifest=calibrated), *in_distribution])
        quiet = client.stub.GetHealth(pb.GetHealthRequest(), timeout=10).slots[0]
        client.ingest([pb.IngestMessage(manifest=calibrated), *shifted])
        alarm = client.stub.GetHealth(pb.GetHealthRequest(), timeout=10).slots[0]
    assert quiet.tokens >= 5000, quiet  # past the default min_tokens: judged, not warming up
    assert quiet.state == pb.SLOT_STATE_OK, quiet
    assert quiet.error_ratio < 1.3 and quiet.js_divergence < 0.1, quiet
    assert alarm.state == pb.SLOT_STATE_DRIFT, alarm
    assert alarm.error_ratio >= 1.3 and any("reconstruction error" in r for r in alarm.reasons), alarm
