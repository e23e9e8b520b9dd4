"""Every supported format loads and encodes to the codes of an independent numpy implementation of its formula."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from circuitwatch.fixtures import FixturePaths
from circuitwatch.fixtures.sae_writers import write_gemmascope, write_saelens, write_sparsify
from circuitwatch.kernels import CodeSelection, ReferenceEncoder, SelectionMode, load_sae
from circuitwatch.kernels.hook_points import Tap, resolve_tap

from support.numpy_sae import code_mismatches, gemmascope_activations, saelens_activations, sparsify_activations
from support.random_saes import D_IN, D_SAE, fixture_cases, random_tensors

ROWS = 96


def inputs(seed: int = 123) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(ROWS, D_IN)).astype(np.float32) * 1.5


def encode_rows(path: Path, x: np.ndarray, selection: CodeSelection) -> list[dict[int, float]]:
    return ReferenceEncoder(load_sae(path), selection).encode(torch.from_numpy(x)).rows()


def check(path: Path, reference, selection: CodeSelection, x: np.ndarray | None = None) -> None:
    x = inputs() if x is None else x
    activations, margins = reference(path, x)
    assert (activations > 0).any(), "test data must make some features fire"
    problems = code_mismatches(encode_rows(path, x, selection), activations, margins, selection.width)
    assert not problems, "\n".join(problems[:10])


ALL_ACTIVE = CodeSelection(SelectionMode.THRESHOLD, D_SAE)


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "gated"])
@pytest.mark.parametrize("normalize", ["none", "constant_norm_rescale", "layer_norm", "expected_average_only_in"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_architectures(tmp_path: Path, architecture: str, normalize: str, apply_b_dec: bool) -> None:
    path = write_saelens(
        tmp_path / "sae",
        architecture,
        random_tensors(1, architecture),
        apply_b_dec_to_input=apply_b_dec,
        normalize_activations=normalize,
    )
    check(path, saelens_activations, ALL_ACTIVE)
    check(path, saelens_activations, CodeSelection(SelectionMode.THRESHOLD, 5))
    check(path, saelens_activations, CodeSelection(SelectionMode.ARGMAX))


@pytest.mark.parametrize("k", [1, 7, 32])
def test_saelens_topk(tmp_path: Path, k: int) -> None:
    path = write_saelens(tmp_path / "sae", "topk", random_tensors(2, "topk"), k=k)
    sae = load_sae(path)
    assert sae.spec.k == k
    check(path, saelens_activations, CodeSelection(SelectionMode.TOPK, k))


def test_saelens_topk_rescaled_by_decoder_norm(tmp_path: Path) -> None:
    path = write_saelens(
        tmp_path / "sae",
        "topk",
        random_tensors(3, "topk"),
        k=8,
        extra_cfg={"rescale_acts_by_decoder_norm": True},
    )
    check(path, saelens_activations, CodeSelection(SelectionMode.TOPK, 8))


def test_saelens_pre_v6_config(tmp_path: Path) -> None:
    """Flat pre-v6 configs: topk through activation_fn_kwargs, hook_point names, boolean normalisation."""
    tensors = random_tensors(4, "topk")
    path = write_saelens(tmp_path / "sae", "standard", tensors)
    cfg = json.loads((path / "cfg.json").read_text())
    del cfg["metadata"]
    cfg |= {
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 6},
        "hook_point": "blocks.3.hook_resid_post",
        "hook_point_layer": 3,
        "normalize_activations": False,
    }
    (path / "cfg.json").write_text(json.dumps(cfg))
    sae = load_sae(path)
    assert (sae.spec.architecture.value, sae.spec.k, sae.spec.layer) == ("topk", 6, 3)
    check(path, saelens_activations, CodeSelection(SelectionMode.TOPK, 6))


def test_saelens_jumprelu_log_threshold(tmp_path: Path) -> None:
    tensors = random_tensors(5, "jumprelu")
    tensors["log_threshold"] = torch.log(tensors.pop("threshold") + 0.01)
    path = write_saelens(tmp_path / "sae", "jumprelu", tensors)
    check(path, saelens_activations, ALL_ACTIVE)


@pytest.mark.parametrize("use_safetensors", [False, True])
def test_gemmascope(tmp_path: Path, use_safetensors: bool) -> None:
    tensors = random_tensors(6, "jumprelu")
    params = write_gemmascope(tmp_path / "layer_7" / "width_16k", tensors, safetensors=use_safetensors)
    sae = load_sae(params.parent)
    assert sae.spec.layer == 7
    assert not sae.spec.apply_b_dec_to_input
    assert load_sae(params).weights_hash == sae.weights_hash  # the params file itself works too
    check(params.parent, gemmascope_activations, ALL_ACTIVE)
    check(params.parent, gemmascope_activations, CodeSelection(SelectionMode.THRESHOLD, 4))


@pytest.mark.parametrize("transcode", [False, True])
def test_sparsify(tmp_path: Path, transcode: bool) -> None:
    path = write_sparsify(tmp_path / "layers.5", random_tensors(7, "topk"), k=9, transcode=transcode)
    sae = load_sae(path)
    assert (sae.spec.layer, sae.spec.k, sae.spec.apply_b_dec_to_input) == (5, 9, not transcode)
    check(path, sparsify_activations, CodeSelection(SelectionMode.TOPK, 9))


def test_weights_hash_identifies_encoding(tmp_path: Path) -> None:
    tensors = random_tensors(8, "standard")
    first = load_sae(write_saelens(tmp_path / "a", "standard", tensors))
    same = load_sae(write_saelens(tmp_path / "b", "standard", tensors))
    tensors["b_enc"] = tensors["b_enc"] + 1e-3
    changed = load_sae(write_saelens(tmp_path / "c", "standard", tensors))
    assert first.weights_hash == same.weights_hash
    assert first.weights_hash != changed.weights_hash


# --- the fixture SAEs, on the fixture model's real activations -------------------------------------------


@pytest.fixture(scope="module")
def real_activations(fixtures: FixturePaths) -> dict[Tap, np.ndarray]:
    """Every fixture SAE's own tap, read from transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from circuitwatch.fixtures.activations import activations_at

    tokenizer = AutoTokenizer.from_pretrained(fixtures.model)
    model = AutoModelForCausalLM.from_pretrained(fixtures.model, dtype=torch.float32).eval()
    text = "The import statement finds a module, loads and initializes it, and defines names in the local namespace."
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    taps = sorted({tap for _, _, tap in fixture_cases(fixtures)}, key=lambda t: t.label())
    return {tap: acts[0].numpy() for tap, acts in activations_at(model, ids, taps).items()}


def test_fixture_saes_match_numpy(fixtures: FixturePaths, real_activations: dict[Tap, np.ndarray]) -> None:
    manifest = json.loads(fixtures.manifest.read_text())
    assert len(manifest["saes"]) == len(fixture_cases(fixtures))
    for path, reference, tap in fixture_cases(fixtures):
        sae = load_sae(path)
        assert sae.spec.layer == tap.layer or sae.spec.layer is None, path
        assert resolve_tap(sae.spec, tap.layer, None, None) == tap, path
        selection = (
            CodeSelection(SelectionMode.TOPK, sae.spec.k) if sae.spec.k else CodeSelection(SelectionMode.THRESHOLD, 64)
        )
        check(path, reference, selection, real_activations[tap])


def test_same_sae_in_two_formats_gives_same_codes(
    fixtures: FixturePaths, real_activations: dict[Tap, np.ndarray]
) -> None:
    """sparsify == SAELens topk (same weights), Gemma Scope == SAELens jumprelu (b_dec folded into b_enc)."""
    pairs = [(fixtures.topk_sae(layer), fixtures.sparsify_sae(layer), layer) for layer in range(4)]
    pairs.append((fixtures.derived_sae("jumprelu"), fixtures.gemmascope_npz, 1))
    for left, right, layer in pairs:
        x = torch.from_numpy(real_activations[Tap(layer)])
        a = ReferenceEncoder(load_sae(left)).encode(x).rows()
        b = ReferenceEncoder(load_sae(right)).encode(x).rows()
        differing = [row for row, (ra, rb) in enumerate(zip(a, b, strict=True)) if ra.keys() != rb.keys()]
        assert len(differing) <= max(1, len(a) // 50), f"{left} vs {right}: rows {differing} differ"
        assert sum(len(r) for r in a) > len(a), f"{left}: features should fire on real text"
