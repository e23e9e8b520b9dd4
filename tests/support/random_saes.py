"""Random SAE tensors of every architecture, and the fixture SAEs paired with their numpy reference, for the
format and backend equivalence tests."""

from __future__ import annotations

from pathlib import Path

import torch

from circuitwatch.fixtures import FixturePaths
from circuitwatch.fixtures.build import TAP_SAES
from circuitwatch.kernels.hook_points import Tap

from .numpy_sae import gemmascope_activations, saelens_activations, sparsify_activations

D_IN, D_SAE = 24, 80


def random_tensors(seed: int, architecture: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g) / D_IN**0.5,
        "W_dec": torch.randn(D_SAE, D_IN, generator=g),
        "b_dec": torch.randn(D_IN, generator=g) * 0.3,
    }
    if architecture == "gated":
        tensors |= {
            "b_gate": torch.randn(D_SAE, generator=g) * 0.3 - 0.3,
            "b_mag": torch.randn(D_SAE, generator=g) * 0.3,
            "r_mag": torch.randn(D_SAE, generator=g) * 0.2,
        }
    else:
        tensors["b_enc"] = torch.randn(D_SAE, generator=g) * 0.3 - 0.2
    if architecture == "jumprelu":
        tensors["threshold"] = torch.rand(D_SAE, generator=g) * 0.6
    return tensors


def fixture_cases(fixtures: FixturePaths) -> list[tuple[Path, object, Tap]]:
    """(SAE path, numpy reference, the tap it was trained on) for every fixture SAE."""
    cases = []
    for layer in range(4):
        cases.append((fixtures.topk_sae(layer), saelens_activations, Tap(layer)))
        cases.append((fixtures.sparsify_sae(layer), sparsify_activations, Tap(layer)))
    for architecture in ("standard", "jumprelu", "gated"):
        cases.append((fixtures.derived_sae(architecture), saelens_activations, Tap(1)))
    cases.append((fixtures.gemmascope_npz, gemmascope_activations, Tap(1)))
    cases.append((fixtures.gemmascope_safetensors, gemmascope_activations, Tap(2)))
    references = {"saelens": saelens_activations, "gemma": gemmascope_activations, "sparsify": sparsify_activations}
    for name, (tap, directory) in TAP_SAES.items():
        reference = next(r for prefix, r in references.items() if directory.startswith(prefix))
        cases.append((fixtures.tap_sae(name), reference, tap))
    return cases
