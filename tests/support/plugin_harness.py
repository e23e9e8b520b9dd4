"""Helpers for plugin tests: plugin configs, an independent ground truth, and reading codes back from the sidecar.

Ground truth = the request's full token sequence run alone through Hugging Face transformers (same weights),
its residual stream encoded by the reference encoder. It shares nothing with vLLM or the plugin's taps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from circuitwatch.fixtures import FixturePaths
from circuitwatch.fixtures.activations import activations_at, residual_stream
from circuitwatch.kernels import Architecture, ReferenceEncoder, load_sae
from circuitwatch.kernels.hook_points import Tap
from circuitwatch.kernels.selection import selection_for
from circuitwatch.plugin.config import PluginConfig

from .numpy_sae import code_mismatches

TOLERANCE = 2e-3  # float-level: vLLM's CPU kernels and transformers' round differently


def slot_specs(fixtures: FixturePaths) -> list[dict]:
    """Three slots, three formats, two selection modes."""
    return [
        {"layer": 1, "sae": str(fixtures.topk_sae(1))},
        {"layer": 2, "sae": str(fixtures.gemmascope_safetensors)},
        {"layer": 3, "sae": str(fixtures.sparsify_sae(3))},
    ]


def write_plugin_config(path: Path, fixtures: FixturePaths, sidecar_port: int, **overrides) -> Path:
    config = {"slots": slot_specs(fixtures), "sidecar": {"address": f"127.0.0.1:{sidecar_port}"}, **overrides}
    PluginConfig.model_validate(config)
    path.write_text(json.dumps(config))
    return path


class GroundTruth:
    """`taps`: where each slot of `specs` reads, stated by the test (not derived from the plugin's resolution);
    default: the three resid_post slots of slot_specs()."""

    def __init__(self, fixtures: FixturePaths, specs: list[dict] | None = None, taps: list[Tap] | None = None) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(fixtures.model, dtype=torch.float32).eval()
        specs = specs or slot_specs(fixtures)
        taps = taps or [Tap(spec["layer"]) for spec in specs]
        config = PluginConfig.model_validate({"slots": specs})
        self.encoders: list[tuple[Tap, ReferenceEncoder]] = []
        for slot, tap in zip(config.slots, taps, strict=True):
            sae = load_sae(slot.sae)
            selection = selection_for(slot.selection, slot.k, sae, config.max_codes_per_token)
            self.encoders.append((tap, ReferenceEncoder(sae, selection)))

    def mismatches(self, tokens: list[int], sidecar: dict[tuple[int, int], tuple[int, dict[int, float]]]) -> list[str]:
        """Problems comparing the sidecar's codes of one request with ground truth (empty: they agree)."""
        processed = len(tokens) - 1  # the last sampled token never goes through the model
        ids = torch.tensor([tokens[:processed]])
        streams = activations_at(self.model, ids, [tap for tap, _ in self.encoders])
        problems = []
        for slot, (tap, encoder) in enumerate(self.encoders):
            x = streams[tap][0]
            acts, margins = _activations_and_margins(encoder, x)
            got = []
            for position in range(processed):
                if (slot, position) not in sidecar:
                    problems.append(f"slot {slot} position {position}: no codes in the sidecar")
                    got.append({})
                    continue
                token, row = sidecar[(slot, position)]
                if token != tokens[position]:
                    problems.append(f"slot {slot} position {position}: token {token} != {tokens[position]}")
                got.append(row)
            extra = sorted(p for (s, p) in sidecar if s == slot and p >= processed)
            if extra:
                problems.append(f"slot {slot}: codes for positions {extra} beyond the {processed} processed")
            problems += [
                f"slot {slot} {p}" for p in code_mismatches(got, acts, margins, encoder.selection.width, tol=TOLERANCE)
            ]
        return problems


def _activations_and_margins(encoder: ReferenceEncoder, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Reference activations, and each feature's distance to the decision that makes it fire or not."""
    with torch.no_grad():
        pre = encoder.pre_activations(x).double()
        acts = encoder.activations(x).double()
        architecture = encoder.sae.spec.architecture
        if architecture is Architecture.TOPK:
            kth = torch.topk(pre, encoder.sae.spec.k, dim=1).values[:, -1:]
            margins = torch.minimum((pre - kth).abs(), pre.abs())
        elif architecture is Architecture.JUMPRELU:
            margins = torch.minimum((pre - encoder.weights["threshold"].double()).abs(), pre.abs())
        else:
            margins = pre.abs()
    return acts.numpy(), margins.numpy()


def prompts(tokenizer, count: int = 18) -> list[list[int]]:
    """Different lengths; six share a long (> 1 block of 128) prefix; token ids, so nothing re-tokenises."""
    from circuitwatch.fixtures.corpus import documents

    docs = documents()
    shared = tokenizer(docs[10])["input_ids"][:170]
    out = []
    for i in range(6):
        suffix = tokenizer(docs[20 + i])["input_ids"][1 : 4 + 7 * i]
        out.append(shared + suffix)
    for i in range(count - 6):
        ids = tokenizer(docs[30 + i])["input_ids"]
        out.append(ids[: 3 + (i * 23) % 150])
    return out


def feature_only_in(fixtures: FixturePaths, present: str, absent: str) -> int:
    """A layer-1 feature (activation >= 1) somewhere in one prompt and nowhere in the other (independent
    ground truth: transformers + the reference encoder), for an abort circuit that must hit one request."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from circuitwatch.kernels import ReferenceEncoder, load_sae

    tokenizer = AutoTokenizer.from_pretrained(fixtures.model)
    model = AutoModelForCausalLM.from_pretrained(fixtures.model, dtype=torch.float32).eval()
    encoder = ReferenceEncoder(load_sae(fixtures.topk_sae(1)))

    def fired(text: str) -> torch.Tensor:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        return (encoder.activations(residual_stream(model, ids, [1])[1][0]) >= 1.0).any(dim=0)

    candidates = torch.nonzero(fired(present) & ~fired(absent)).flatten()
    assert len(candidates), "no feature separates the two prompts"
    return int(candidates[0])


ENGINE = {"dtype": "float32", "max_model_len": 512, "max_num_batched_tokens": 64, "max_num_seqs": 32, "seed": 0}


def generate(fixtures: FixturePaths, token_prompts, enforce_eager: bool, extra_engine: dict | None = None):
    """Greedy generation of each token prompt through a real vLLM engine (shut down after); (request id, prompt,
    generated) per request."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(fixtures.model), enforce_eager=enforce_eager, **ENGINE, **(extra_engine or {}))
    try:
        params = [
            SamplingParams(temperature=0.0, max_tokens=3 + (i * 5) % 19, min_tokens=1)
            for i in range(len(token_prompts))
        ]
        outputs = llm.generate([{"prompt_token_ids": p} for p in token_prompts], params)
    finally:
        llm.llm_engine.engine_core.shutdown() if hasattr(llm.llm_engine, "engine_core") else None
        del llm
    return [(o.request_id, list(o.prompt_token_ids), list(o.outputs[0].token_ids)) for o in outputs]
