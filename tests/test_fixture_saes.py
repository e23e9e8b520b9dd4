"""The trained fixture SAEs learned the model's activations: their features are not random noise."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from circuitwatch.fixtures import FixturePaths
from circuitwatch.fixtures.activations import residual_stream
from circuitwatch.fixtures.corpus import documents
from circuitwatch.kernels import ReferenceEncoder, load_sae


@pytest.fixture(scope="module")
def held_out(fixtures: FixturePaths) -> dict[int, torch.Tensor]:
    """Activations on the corpus's last documents: past the tokens the SAEs were trained on."""
    tokenizer = AutoTokenizer.from_pretrained(fixtures.model)
    model = AutoModelForCausalLM.from_pretrained(fixtures.model, dtype=torch.float32).eval()
    chunks = [tokenizer(text)["input_ids"][:256] for text in documents()[-4:]]
    rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in range(4)}
    for ids in chunks:
        for layer, acts in residual_stream(model, torch.tensor([ids]), range(4)).items():
            rows[layer].append(acts[0])
    return {layer: torch.cat(parts) for layer, parts in rows.items()}


@pytest.mark.parametrize("layer", range(4))
def test_trained_sae_reconstructs_held_out_activations(
    fixtures: FixturePaths, held_out: dict[int, torch.Tensor], layer: int
) -> None:
    path = fixtures.topk_sae(layer)
    sae = load_sae(path)
    x = held_out[layer]
    dense = ReferenceEncoder(sae).activations(x)
    W_dec = load_file(str(path / "sae_weights.safetensors"))["W_dec"]
    reconstruction = dense @ W_dec + sae.weights.b_dec
    fvu = ((reconstruction - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    assert fvu < 0.35, f"layer {layer}: fraction of variance unexplained {fvu:.3f}"

    fired = (dense > 0).any(dim=0)
    assert fired.float().mean() > 0.3, f"layer {layer}: only {int(fired.sum())} of {sae.spec.d_sae} features fire"
    # A random encoder would fire features on tokens regardless of content; trained ones are selective.
    per_token = (dense > 0).float().mean(dim=0)
    assert per_token.max() < 0.9
