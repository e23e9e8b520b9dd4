"""Planted ground truth through the real path: vLLM engine + plugin + sidecar, then identify -> save -> flag.

Two fixture SAEs (layers 1 and 2) get one feature each replaced by a planted direction that fires exactly on
one token (fitted by least squares on the residual stream of the very prompts we send, run alone through
Hugging Face transformers). Reviewers "label" half of the prompts that contain the token and some that do
not; the contrast query must rank the two planted features first with ROC AUC >= 0.95 against the known
answer, the pair (layer 1 -> layer 2) first among edges, and the circuit saved from it must flag exactly the
new prompts that contain the token. Preconditions (the planted features fire exactly on the token and no
natural feature is as exclusive) are checked on the independent transformers + reference-encoder path.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from circuitwatch.fixtures import FixturePaths
from circuitwatch.fixtures.activations import residual_stream
from circuitwatch.fixtures.corpus import documents
from circuitwatch.fixtures.sae_writers import write_saelens
from circuitwatch.kernels import ReferenceEncoder, load_sae
from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto import circuitwatch_pb2_grpc as pb_grpc
from circuitwatch.sidecar import SidecarConfig
from circuitwatch.sidecar.saved_circuits import circuit_entry, save_circuit
from circuitwatch.sidecar.server import start

pytestmark = pytest.mark.vllm

LAYERS = (1, 2)
PROMPT_TOKENS = 32
PLANTED_ACTIVATION = 50.0  # far above natural activations, so the planted feature is always in the top k


def prompts_from_corpus(tokenizer, count: int) -> list[list[int]]:
    """BOS + 32-token windows of the fixture corpus, deterministic."""
    windows = []
    for text in documents():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        windows += [
            [tokenizer.bos_token_id, *ids[o : o + PROMPT_TOKENS]] for o in range(0, len(ids) - PROMPT_TOKENS, 97)
        ]
        if len(windows) >= count:
            break
    return windows[:count]


def fit_direction(x: torch.Tensor, on_token: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """A separating direction: class-balanced logistic regression (deterministic L-BFGS from zero). Returns
    (w, c, gap) with score = x @ w + c; gap = (min score on the token - max score elsewhere) relative to the
    score range; > 0 means linearly separated."""
    x = x.double()
    mean, std = x.mean(0), x.std(0) + 1e-6
    normal = (x - mean) / std
    sign = on_token.double() * 2 - 1
    weight = torch.where(on_token, (~on_token).sum() / on_token.sum(), torch.tensor(1)).double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        margin = sign * (normal @ w + b)
        value = (weight * torch.nn.functional.softplus(-4 * margin)).mean() + 1e-4 * (w * w).sum()
        value.backward()
        return value

    optimizer.step(loss)
    with torch.no_grad():
        direction = w / std
        bias = float(b - mean @ direction)
        scores = x @ direction + bias
        gap = (scores[on_token].min() - scores[~on_token].max()) / (scores[on_token].min() - scores[~on_token].min())
    return direction, bias, float(gap)


def plant(
    fixtures: FixturePaths, out: Path, streams: dict[int, torch.Tensor], on_token: torch.Tensor
) -> dict[int, tuple[Path, int]]:
    """Per layer, a copy of the fixture TopK SAE whose least used feature fires exactly where on_token is."""
    planted = {}
    for layer in LAYERS:
        x = streams[layer]
        w, c, gap = fit_direction(x, on_token)
        assert gap > 0, f"layer {layer}: the token is not linearly separable here (gap {gap})"
        scores = x.double() @ w + c
        threshold = (float(scores[on_token].min()) + float(scores[~on_token].max())) / 2
        scale = PLANTED_ACTIVATION / (float(scores[on_token].min()) - threshold)
        tensors = load_file(fixtures.topk_sae(layer) / "sae_weights.safetensors")
        usage = (ReferenceEncoder(load_sae(fixtures.topk_sae(layer))).activations(x) > 0).sum(0)
        feature = int(torch.argmin(usage))
        # pre-activation = (x - b_dec) @ W_enc + b_enc = scale * (x @ w + c - threshold)
        w_enc = (w * scale).float()
        tensors["W_enc"][:, feature] = w_enc
        tensors["b_enc"][feature] = float(scale * (c - threshold)) + float(tensors["b_dec"].double() @ w_enc.double())
        directory = write_saelens(out / f"planted_l{layer}", "topk", tensors, k=16, hook_name=f"model.layers.{layer}")
        planted[layer] = (directory, feature)
    return planted


def choose_token(tokens: torch.Tensor, streams: dict[int, torch.Tensor]) -> int:
    """The token separated best at both layers among those in 15-40% of the prompts."""
    share = np.array([(tokens == t).any(1).float().mean().item() for t in range(int(tokens.max()) + 1)])
    candidates = [t for t in np.flatnonzero((share >= 0.15) & (share <= 0.4)).tolist() if t > 3]
    flat = tokens.flatten()
    gaps = {t: min(fit_direction(streams[layer], flat == t)[2] for layer in LAYERS) for t in candidates}
    return max(gaps, key=gaps.get)


def test_planted_features_are_identified_saved_and_then_flag_new_requests(
    fixtures: FixturePaths, tmp_path: Path, monkeypatch
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(fixtures.model)
    model = AutoModelForCausalLM.from_pretrained(fixtures.model, dtype=torch.float32).eval()
    prompts = prompts_from_corpus(tokenizer, 160)
    tokens = torch.tensor(prompts)
    raw = residual_stream(model, tokens, list(LAYERS))
    streams = {layer: raw[layer].reshape(-1, raw[layer].shape[-1]) for layer in LAYERS}
    token = choose_token(tokens, streams)
    planted = plant(fixtures, tmp_path, streams, tokens.flatten() == token)
    has_token = (tokens == token).any(1).numpy()

    # Preconditions on the independent path (transformers + reference encoder), prompt by prompt.
    carried: dict[int, np.ndarray] = {}  # layer -> bool [prompts, d_sae]: feature anywhere in the prompt
    for layer, (directory, feature) in planted.items():
        acts = ReferenceEncoder(load_sae(directory)).activations(streams[layer]).reshape(len(prompts), -1, 1024)
        fires = (acts > 0).numpy()
        assert np.array_equal(fires[:, :, feature], (tokens == token).numpy()), f"layer {layer}: not exact"
        carried[layer] = fires.any(1)
    train, new = np.arange(0, 120), np.arange(120, 160)
    token_rows = [i for i in train if has_token[i]]
    positives = token_rows[::2]  # reviewers flagged half of the prompts with the token...
    negatives = [i for i in train if not has_token[i]][::2]  # ...and cleared half of the others
    for layer, (_, feature) in planted.items():
        exclusivity = carried[layer][positives].mean(0) - carried[layer][negatives].mean(0)
        assert exclusivity[feature] == 1.0
        assert (np.delete(exclusivity, feature) < 1.0).all(), f"layer {layer}: a natural feature is as exclusive"

    circuits_file = tmp_path / "identified.yaml"
    circuits_file.write_text("")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    running = start(SidecarConfig(listen="127.0.0.1:0", evidence_dir=tmp_path / "evidence", circuits=[circuits_file]))
    plugin = {
        "slots": [{"layer": layer, "sae": str(directory)} for layer, (directory, _) in planted.items()],
        "sidecar": {"address": f"127.0.0.1:{running.port}"},
    }
    (tmp_path / "plugin.json").write_text(json.dumps(plugin))
    monkeypatch.setenv("CIRCUITWATCH_CONFIG", str(tmp_path / "plugin.json"))
    llm = LLM(model=str(fixtures.model), dtype="float32", max_model_len=256, enforce_eager=True, seed=0)
    stub = pb_grpc.MonitorStub(grpc.insecure_channel(f"127.0.0.1:{running.port}"))
    try:

        def send(llm, rows) -> list[str]:
            params = SamplingParams(temperature=0, max_tokens=1)
            outputs = llm.generate([{"prompt_token_ids": prompts[i]} for i in rows], params, use_tqdm=False)
            ids = [o.request_id for o in outputs]
            for request_id in ids:
                report = stub.GetReport(pb.GetReportRequest(request_id=request_id, wait_ms=10_000), timeout=30)
                assert report.status == pb.REPORT_STATUS_COMPLETE
            return ids

        sent = dict(zip(train, send(llm, train), strict=True))
        # reviewers label after the fact (Label RPC); the ground truth is a label of its own
        for label, chosen in (
            ("truth:token", [i for i in train if has_token[i]]),
            ("review:bad", [i for i in train if i in positives]),
            ("review:ok", [i for i in train if i in negatives]),
        ):
            request = pb.LabelRequest(request_ids=[sent[i] for i in chosen], add=[label], author="test-reviewer")
            assert stub.Label(request, timeout=30).updated == len(chosen)
        request = pb.ContrastRequest(
            positives=pb.RequestSelector(labels=["review:bad"]),
            negatives=pb.RequestSelector(labels=["review:ok"]),
            cut=2,
            truth=pb.GroundTruth(
                features=[pb.FeatureTerm(layer=layer, feature=f) for layer, (_, f) in planted.items()],
                requests=pb.RequestSelector(labels=["truth:token"]),
            ),
        )
        response = stub.Contrast(request, timeout=30)
        assert (response.positives, response.negatives) == (len(positives), len(negatives))
        expected = {(layer, feature) for layer, (_, feature) in planted.items()}
        assert {(f.layer, f.feature) for f in response.features[:2]} == expected
        assert all(f.exclusivity == 1.0 and f.exclusive for f in response.features[:2])
        assert response.features[2].exclusivity < 1.0
        pair = response.pairs[0]
        assert (pair.upstream.layer, pair.upstream.feature) == (1, planted[1][1])
        assert (pair.downstream.layer, pair.downstream.feature) == (2, planted[2][1])
        evaluation = response.evaluation
        assert evaluation.feature_auc >= 0.95 and evaluation.feature_recall_at_cut == 1.0
        assert evaluation.truth_requests == int(has_token[train].sum())
        assert evaluation.request_auc >= 0.95 and evaluation.request_recall_at_cut == 1.0

        # identify -> save -> flag: the saved circuit flags exactly the new prompts that contain the token
        entry = circuit_entry("planted-token", list(response.features[:2]), request, response, "high", "all")
        save_circuit(circuits_file, entry)
        assert stub.ReloadCircuits(pb.ReloadCircuitsRequest(), timeout=10).circuits == ["planted-token"]
        for i, request_id in zip(new, send(llm, new), strict=True):
            report = stub.GetReport(pb.GetReportRequest(request_id=request_id), timeout=30)
            assert [f.circuit for f in report.flags] == (["planted-token"] if has_token[i] else []), i
    finally:
        del llm
        running.stop(1)


def plant_on_head(
    fixtures: FixturePaths, out: Path, z: torch.Tensor, token_positions: torch.Tensor
) -> tuple[Path, int, torch.Tensor]:
    """A copy of the fixture's per-head SAE (layer 1, head 2) whose least used feature reads the direction that
    best tells `token_positions` apart in that head's output, firing only above a clear gap in the scores (so
    every firing activation is large, and always in the top k). Returns (directory, feature, fires per row)."""
    sae_dir = fixtures.tap_sae("attn_z_head")
    direction, bias, _ = fit_direction(z, token_positions)
    scores = z.double() @ direction + bias
    ranked = torch.sort(scores, descending=True).values
    low, high = int(0.01 * len(ranked)), int(0.06 * len(ranked))  # fire on 1-6% of tokens, cut at the widest gap
    gaps = ranked[low:high] - ranked[low + 1 : high + 1]
    cut = low + int(torch.argmax(gaps))
    threshold = float(ranked[cut] + ranked[cut + 1]) / 2
    scale = PLANTED_ACTIVATION / (float(ranked[cut]) - threshold)
    tensors = load_file(sae_dir / "sae_weights.safetensors")
    usage = (ReferenceEncoder(load_sae(sae_dir)).activations(z) > 0).sum(0)
    feature = int(torch.argmin(usage))
    w_enc = (direction * scale).float()
    tensors["W_enc"][:, feature] = w_enc
    tensors["b_enc"][feature] = float(scale * (bias - threshold)) + float(tensors["b_dec"].double() @ w_enc.double())
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    directory = write_saelens(
        out / "planted_head",
        "topk",
        tensors,
        k=cfg["k"],
        hook_name="blocks.1.attn.hook_z",
        extra_cfg={"hook_head_index": 2, "reshape_activations": "hook_z"},
    )
    fires = ReferenceEncoder(load_sae(directory)).activations(z)[:, feature] > 0
    return directory, feature, fires


def test_a_planted_per_head_feature_is_identified_named_by_its_head_and_flags(
    fixtures: FixturePaths, tmp_path: Path, monkeypatch
) -> None:
    """One planted feature in head 2's attention output (attn_z, before the output projection), beside a natural
    residual SAE on the same layer. The contrast ranks it first and names its hook point and head, the saved
    circuit's term says attn_z head 2, and the circuit flags exactly the new prompts where ground truth
    (transformers' o_proj input, head 2's columns, reference encoder) says it fires."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    from circuitwatch.commands.formatting import format_contrast
    from circuitwatch.fixtures.activations import activations_at
    from circuitwatch.kernels.hook_points import HookPoint, Tap

    tokenizer = AutoTokenizer.from_pretrained(fixtures.model)
    model = AutoModelForCausalLM.from_pretrained(fixtures.model, dtype=torch.float32).eval()
    prompts = prompts_from_corpus(tokenizer, 160)
    tokens = torch.tensor(prompts)
    head, residual = Tap(1, HookPoint.ATTN_Z, 2), Tap(1)
    found = activations_at(model, tokens, [head, residual])
    z = found[head].reshape(-1, found[head].shape[-1])
    flat = tokens.flatten()
    # the feature leans on one token: the most frequent one that is still absent from most prompts
    rare_enough = [t for t in range(4, int(flat.max()) + 1) if (tokens == t).any(1).float().mean() <= 0.4]
    token = max(rare_enough, key=lambda t: int((flat == t).sum()))
    directory, feature, fires = plant_on_head(fixtures, tmp_path, z, flat == token)
    fired = fires.reshape(len(prompts), -1).any(1).numpy()
    train, new = np.arange(0, 120), np.arange(120, 160)
    positives = [i for i in train if fired[i]][::2]
    negatives = [i for i in train if not fired[i]][::2]
    assert len(positives) >= 4 and fired[new].any() and not fired[new].all(), "the planted feature is too rare"
    # preconditions on the independent path: nothing natural, in either SAE, is as exclusive
    natural = {
        "head": ReferenceEncoder(load_sae(directory)).activations(z) > 0,
        "residual": ReferenceEncoder(load_sae(fixtures.topk_sae(1))).activations(found[residual].reshape(-1, 128)) > 0,
    }
    for name, acts in natural.items():
        carried = acts.reshape(len(prompts), -1, acts.shape[-1]).any(1).numpy()
        exclusivity = carried[positives].mean(0) - carried[negatives].mean(0)
        if name == "head":
            assert exclusivity[feature] == 1.0
            exclusivity = np.delete(exclusivity, feature)
        assert (exclusivity < 1.0).all(), f"a natural {name} feature is as exclusive as the planted one"

    circuits_file = tmp_path / "identified.yaml"
    circuits_file.write_text("")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    running = start(SidecarConfig(listen="127.0.0.1:0", evidence_dir=tmp_path / "evidence", circuits=[circuits_file]))
    plugin = {
        "slots": [{"layer": 1, "sae": str(fixtures.topk_sae(1))}, {"layer": 1, "sae": str(directory)}],
        "sidecar": {"address": f"127.0.0.1:{running.port}"},
    }
    (tmp_path / "plugin.json").write_text(json.dumps(plugin))
    monkeypatch.setenv("CIRCUITWATCH_CONFIG", str(tmp_path / "plugin.json"))
    llm = LLM(model=str(fixtures.model), dtype="float32", max_model_len=256, enforce_eager=True, seed=0)
    stub = pb_grpc.MonitorStub(grpc.insecure_channel(f"127.0.0.1:{running.port}"))
    try:

        def send(rows) -> list[str]:
            params = SamplingParams(temperature=0, max_tokens=1)
            outputs = llm.generate([{"prompt_token_ids": prompts[i]} for i in rows], params, use_tqdm=False)
            ids = [o.request_id for o in outputs]
            for request_id in ids:
                report = stub.GetReport(pb.GetReportRequest(request_id=request_id, wait_ms=10_000), timeout=30)
                assert report.status in (pb.REPORT_STATUS_COMPLETE, pb.REPORT_STATUS_LOW_FIDELITY)
            return ids

        sent = dict(zip(train, send(train), strict=True))
        for label, chosen in (("review:bad", positives), ("review:ok", negatives)):
            request = pb.LabelRequest(request_ids=[sent[i] for i in chosen], add=[label], author="test-reviewer")
            assert stub.Label(request, timeout=30).updated == len(chosen)
        request = pb.ContrastRequest(
            positives=pb.RequestSelector(labels=["review:bad"]), negatives=pb.RequestSelector(labels=["review:ok"])
        )
        response = stub.Contrast(request, timeout=30)
        top = response.features[0]
        assert (top.slot, top.layer, top.hook_point, top.head, top.feature) == (1, 1, "attn_z", 2, feature)
        assert top.exclusive and response.features[1].exclusivity < 1.0
        assert " L1.attn_z.h2 " in format_contrast(response, top=3, cut=1).splitlines()[3]

        entry = circuit_entry("planted-head", [top], request, response, "high", "all")
        assert entry["when"]["all"][0] | {"sae": None} == {
            "layer": 1,
            "hook_point": "attn_z",
            "head": 2,
            "feature": feature,
            "sae": None,
        }
        save_circuit(circuits_file, entry)
        assert stub.ReloadCircuits(pb.ReloadCircuitsRequest(), timeout=10).circuits == ["planted-head"]
        for i, request_id in zip(new, send(new), strict=True):
            report = stub.GetReport(pb.GetReportRequest(request_id=request_id), timeout=30)
            assert [f.circuit for f in report.flags] == (["planted-head"] if fired[i] else []), i
    finally:
        llm.llm_engine.engine_core.shutdown()
        running.stop(1)
