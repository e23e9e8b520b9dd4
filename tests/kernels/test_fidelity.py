"""Fidelity in the encoders: every backend's per-token reconstruction error equals the full decoder applied in
numpy to independently computed activations (tests/support/numpy_sae.py), on random SAEs of every architecture
and normalisation and on the fixture SAEs with the fixture model's real activations; rows no SAE can read
(NaN, infinite, all zero, overflowing) get no codes on every backend; the loaders' decoder and archive checks;
where an SAE says it was trained; the calibration baseline file and its pins."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from circuitwatch.fixtures import FixturePaths
from circuitwatch.fixtures.sae_writers import write_gemmascope, write_saelens, write_sparsify
from circuitwatch.kernels import CodeSelection, SaeFormatError, SelectionMode, fidelity, load_sae
from circuitwatch.kernels.baseline import load_baseline, measure, model_fingerprint
from circuitwatch.kernels.encoders import make_encoder
from circuitwatch.kernels.hook_points import HookPoint, Tap

from support.numpy_sae import reconstruction_errors
from support.random_saes import D_IN, D_SAE, fixture_cases, random_tensors
from support.triton_child import assert_passes_under_interpreter

BACKENDS = [b for b in os.environ.get("CIRCUITWATCH_TEST_BACKENDS", "torch,onnx").split(",") if b]
TOLERANCE = 1e-4  # float32 encoders against float64 numpy


def every_active_feature(sae) -> CodeSelection:
    """A selection that keeps every active feature, so the codes' reconstruction is the full decoder's."""
    if sae.spec.k:
        return CodeSelection(SelectionMode.TOPK, sae.spec.k)
    return CodeSelection(SelectionMode.THRESHOLD, sae.spec.d_sae)


def dense(codes, d_sae: int) -> np.ndarray:
    out = np.zeros((codes.num_rows, d_sae))
    for row, features in enumerate(codes.rows()):
        for feature, value in features.items():
            out[row, feature] = value
    return out


def assert_errors_match(path: Path, sae, x: torch.Tensor, backend: str, reference) -> None:
    codes = make_encoder(sae, every_active_feature(sae), backend).encode(x)
    activations, margins = reference(path, x.numpy())
    assert codes.errors is not None and codes.norms is not None
    expected = reconstruction_errors(path, x.numpy(), activations)
    # a feature on its firing boundary may flip in float32; its activation is then ~0 and moves the error by
    # at most its decoder row times that: compare against the codes' own activations for those rows
    flipped = (margins <= 1e-4).any(axis=1)
    from_codes = reconstruction_errors(path, x.numpy(), dense(codes, sae.spec.d_sae))
    got = codes.errors.numpy()
    np.testing.assert_allclose(got[~flipped], expected[~flipped], rtol=1e-3, atol=TOLERANCE)
    np.testing.assert_allclose(got, from_codes, rtol=1e-3, atol=TOLERANCE)
    np.testing.assert_allclose(codes.norms.numpy(), np.linalg.norm(x.numpy().astype(np.float64), axis=1), rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "gated", "topk"])
@pytest.mark.parametrize("normalize", ["none", "constant_norm_rescale", "layer_norm"])
def test_errors_equal_the_full_decoder_in_numpy(
    tmp_path: Path, backend: str, architecture: str, normalize: str
) -> None:
    from support.numpy_sae import saelens_activations

    k = 7 if architecture == "topk" else None
    path = write_saelens(
        tmp_path / "sae", architecture, random_tensors(3, architecture), k=k, normalize_activations=normalize
    )
    rows = 16 if backend == "triton" else 48  # the Triton interpreter is slow: one program's rows
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(rows, D_IN)).astype(np.float32) * 2)
    assert_errors_match(path, load_sae(path), x, backend, saelens_activations)


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors_on_the_fixture_saes_with_real_activations(backend: str, fixtures: FixturePaths, real_residual) -> None:
    """Every fixture SAE (three formats, four architectures), on its own layer's residual stream: a trained SAE
    explains most of it."""
    if backend == "triton":
        pytest.skip("too large for the Triton interpreter; Triton's fidelity is the shared torch gather (above)")
    for path, reference, tap in fixture_cases(fixtures):
        sae = load_sae(path)
        x = real_residual[tap]
        if sae.decoder is None:  # a transcoder reconstructs the MLP's output, not its input: no error to give
            assert make_encoder(sae, None, backend).encode(x).errors is None, path
            continue
        assert_errors_match(path, sae, x, backend, reference)
        if sae.spec.architecture.value == "topk":
            errors = make_encoder(sae, None, backend).encode(x).errors
            assert float(errors.median()) < 0.5, f"{path}: a trained SAE should explain most of its layer"


@pytest.fixture(scope="module")
def real_residual(fixtures: FixturePaths) -> dict[Tap, torch.Tensor]:
    """Each fixture SAE's own tap (residual stream or another hook point), read from transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from circuitwatch.fixtures.activations import activations_at
    from circuitwatch.fixtures.corpus import documents

    tokenizer = AutoTokenizer.from_pretrained(fixtures.model)
    model = AutoModelForCausalLM.from_pretrained(fixtures.model, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer(documents()[12])["input_ids"][:96]])
    taps = sorted({tap for _, _, tap in fixture_cases(fixtures)}, key=lambda t: t.label())
    return {tap: acts[0] for tap, acts in activations_at(model, ids, taps).items()}


@pytest.mark.parametrize("gather_max", [0, 1 << 30], ids=["embedding_bag", "numpy"])
@pytest.mark.parametrize("normalize", ["none", "layer_norm"])
def test_onnx_host_errors_are_the_same_on_either_path(
    tmp_path: Path, monkeypatch, gather_max: int, normalize: str
) -> None:
    """The ONNX backend reconstructs small host batches in numpy and hands large ones to torch's embedding_bag
    (fidelity.HOST_GATHER_MAX_ELEMENTS): both equal the full decoder in float64, with unreadable rows at 0 and
    a constant row, which layer norm makes all zero, at 0 rather than 0/0."""
    monkeypatch.setattr(fidelity, "HOST_GATHER_MAX_ELEMENTS", gather_max)
    path = write_saelens(tmp_path / "sae", "standard", random_tensors(5, "standard"), normalize_activations=normalize)
    sae = load_sae(path)
    x = torch.from_numpy(np.random.default_rng(3).normal(size=(12, D_IN)).astype(np.float32) * 2)
    x[3, 1] = float("nan")
    x[4] = 0.0
    x[5] = 1.5
    codes = make_encoder(sae, every_active_feature(sae), "onnx").encode(x)
    got = codes.errors.numpy()
    zero = [3, 4, 5] if normalize == "layer_norm" else [3, 4]
    assert (got[zero] == 0).all()
    readable = [i for i in range(12) if i not in zero]
    expected = reconstruction_errors(path, x.numpy()[readable], dense(codes, sae.spec.d_sae)[readable])
    np.testing.assert_allclose(got[readable], expected, rtol=1e-3, atol=TOLERANCE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", ["none", "constant_norm_rescale", "layer_norm"])
def test_unreadable_rows_get_no_codes_on_every_backend(tmp_path: Path, backend: str, normalize: str) -> None:
    """NaN, infinite, all-zero and overflowing rows: no codes, error 0, marked invalid; the others unaffected
    (the torch reference used to report 3.4e38 where ONNX and Triton reported inf)."""
    path = write_saelens(tmp_path / "sae", "standard", random_tensors(4, "standard"), normalize_activations=normalize)
    sae = load_sae(path)
    x = torch.from_numpy(np.random.default_rng(2).normal(size=(8, D_IN)).astype(np.float32))
    clean = make_encoder(sae, None, backend).encode(x.clone())
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    x[3] = 0.0
    x[4] = 1e30  # finite, but its squared norm overflows float32: no encoder reads it sensibly
    codes = make_encoder(sae, None, backend).encode(x)
    bad = [1, 2, 3, 4]
    assert codes.valid.tolist() == [i not in bad for i in range(8)]
    assert (codes.ids[bad] == -1).all() and (codes.values[bad] == 0).all()
    # the plugin's sending thread reads them in numpy alone (Codes.on_host): the same rows, codes and fidelity
    host = codes.on_host()
    assert host.valid.tolist() == codes.valid.tolist()
    for got, want in zip((host.row_offsets, host.feature_ids, host.activations), codes.to_csr(), strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(host.errors, codes.errors.numpy())
    np.testing.assert_array_equal(host.norms, codes.norms.numpy())
    assert (codes.errors[bad] == 0).all()
    good = [0, 5, 6, 7]
    assert torch.equal(codes.ids[good], clean.ids[good])
    assert torch.allclose(codes.errors[good], clean.errors[good], atol=1e-6)


def test_triton_fidelity_under_the_interpreter() -> None:
    """The Triton backend's fidelity (a torch gather after the kernel), by the same cases, in a child process."""
    assert_passes_under_interpreter(__file__, "triton and not interpreter")


# --- loading the decoder ---------------------------------------------------------------------------------


@pytest.mark.parametrize("writer", ["saelens", "gemmascope", "sparsify"])
def test_nan_in_the_decoder_fails_at_load(tmp_path: Path, writer: str) -> None:
    """A NaN in a decoder row no code uses was loaded silently; the README promises NaN weights fail at load."""
    tensors = random_tensors(5, "jumprelu" if writer == "gemmascope" else "standard")
    tensors["W_dec"][D_SAE - 1, 0] = float("nan")
    if writer == "saelens":
        path, file = write_saelens(tmp_path / "sae", "standard", tensors), "sae_weights.safetensors"
    elif writer == "gemmascope":
        path, file = write_gemmascope(tmp_path / "layer_1" / "width_1k", tensors), "params.npz"
    else:
        path, file = write_sparsify(tmp_path / "layers.1", tensors, k=4), "sae.safetensors"
    with pytest.raises(SaeFormatError, match=r"W_dec: 1 non-finite values") as info:
        load_sae(path)
    assert file in str(info.value)


def test_rescaled_topk_decodes_through_unit_rows(tmp_path: Path) -> None:
    """rescale_acts_by_decoder_norm: activations come out scaled by each row's norm, so the reconstruction uses
    unit-norm rows (SAELens divides the activations back before W_dec)."""
    from support.numpy_sae import saelens_activations

    tensors = random_tensors(6, "topk")
    tensors["W_dec"] = tensors["W_dec"] * torch.linspace(0.2, 3.0, D_SAE)[:, None]
    path = write_saelens(tmp_path / "sae", "topk", tensors, k=6, extra_cfg={"rescale_acts_by_decoder_norm": True})
    sae = load_sae(path)
    assert torch.allclose(sae.decoder.norm(dim=1), torch.ones(D_SAE), atol=1e-5)
    x = torch.from_numpy(np.random.default_rng(3).normal(size=(32, D_IN)).astype(np.float32))
    assert_errors_match(path, sae, x, "torch", saelens_activations)


def test_transcoders_have_no_decoder_for_fidelity(tmp_path: Path) -> None:
    path = write_sparsify(tmp_path / "layers.2", random_tensors(7, "topk"), k=4, transcode=True)
    sae = load_sae(path)
    assert sae.decoder is None and sae.decoder_hash == ""
    codes = make_encoder(sae, None, "torch").encode(torch.randn(4, D_IN))
    assert codes.errors is None and codes.norms is not None


def test_decoder_is_not_part_of_the_weights_hash(tmp_path: Path) -> None:
    """The weights hash names what changes codes; the decoder has its own hash (a baseline pins both)."""
    tensors = random_tensors(8, "standard")
    a = load_sae(write_saelens(tmp_path / "a", "standard", tensors))
    tensors["W_dec"] = tensors["W_dec"] * 2
    b = load_sae(write_saelens(tmp_path / "b", "standard", tensors))
    assert a.weights_hash == b.weights_hash and a.decoder_hash != b.decoder_hash


# --- Gemma Scope archives that cannot be read ------------------------------------------------------------


def _npz(tmp_path: Path) -> Path:
    """The params.npz of a Gemma Scope SAE."""
    return write_gemmascope(tmp_path / "layer_1" / "width_1k", random_tensors(9, "jumprelu"))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("truncate", r"truncated or damaged"),
        ("empty", r"truncated or damaged"),
        ("garbage", r"pickled data, which is never loaded"),
        ("pickle", r"pickled data, which is never loaded"),
        ("npy", r"a single \.npy array"),
    ],
)
def test_unreadable_npz_names_the_file_and_never_suggests_pickle(tmp_path: Path, damage: str, reason: str) -> None:
    params = _npz(tmp_path)
    raw = params.read_bytes()
    if damage == "truncate":
        params.write_bytes(raw[: len(raw) // 2])
    elif damage == "empty":
        params.write_bytes(b"")
    elif damage == "garbage":
        params.write_bytes(b"\x80\x04\x95 these are not weights" * 10)
    elif damage == "pickle":
        import pickle

        params.write_bytes(pickle.dumps({"W_enc": [1, 2, 3]}))
    else:
        with params.open("wb") as out:
            np.save(out, np.zeros(3))
    with pytest.raises(SaeFormatError) as info:
        load_sae(params.parent)
    message = str(info.value)
    assert "params.npz" in message and "allow_pickle" not in message, message
    assert __import__("re").search(reason, message), message


def test_a_damaged_member_of_an_npz_names_the_file(tmp_path: Path) -> None:
    params = _npz(tmp_path)
    with zipfile.ZipFile(params, "a") as archive:
        archive.writestr("threshold_extra.npy", b"\x93NUMPY broken header")
    with pytest.raises(SaeFormatError, match=r"params\.npz"):
        load_sae(params.parent)


# --- the baseline file -----------------------------------------------------------------------------------


def _baseline(sae, **overrides):
    rng = np.random.default_rng(0)
    identity = {
        "sae_name": sae.name,
        "weights_hash": sae.weights_hash,
        "decoder_hash": sae.decoder_hash,
        "model": "m",
        "model_fingerprint": model_fingerprint({"hidden_size": 24}),
        "layer": 1,
        "hook_point": "resid_post",
        "selection": "threshold:max=64",
        "text": "test",
        "documents": 3,
    } | overrides
    return measure(
        rng.random(100) * 0.3, rng.random(100) + 5, np.full(100, 4), rng.integers(0, D_SAE, 400), D_SAE, **identity
    )


def test_baseline_round_trip_and_pins(tmp_path: Path) -> None:
    sae = load_sae(write_saelens(tmp_path / "sae", "standard", random_tensors(11, "standard")))
    baseline = _baseline(sae)
    assert baseline.tokens == 100 and abs(sum(baseline.firing_frequencies) - 4.0) < 1e-3  # 4 codes per token
    path = tmp_path / "baseline.json"
    path.write_text(baseline.to_json())
    loaded = load_baseline(path, sae, Tap(1), model_fingerprint({"hidden_size": 24}))
    assert loaded.error_threshold == pytest.approx(baseline.error_threshold)
    assert loaded.error.p50 == pytest.approx(baseline.error.p50)
    # the same stream under its other name: resid_pre of layer 2 is resid_post of layer 1
    assert load_baseline(path, sae, Tap(2, HookPoint.RESID_PRE)).layer == 1
    cases = [
        ({"layer": 2}, "layer/hook_point/head"),
        ({"hook_point": "mlp_out"}, "layer/hook_point/head"),
        ({"hook_point": "attn_z", "head": 1}, "layer/hook_point/head"),
        ({"weights_hash": "blake2b:00"}, "weights_hash"),
        ({"decoder_hash": "blake2b:00"}, "decoder_hash"),
        ({"model_fingerprint": "blake2b:00"}, "model_fingerprint"),
    ]
    for overrides, field in cases:
        path.write_text(_baseline(sae, **overrides).to_json())
        with pytest.raises(SaeFormatError, match=rf"baseline.json: {field}:") as info:
            load_baseline(path, sae, Tap(1), model_fingerprint({"hidden_size": 24}))
        assert "calibrate" in str(info.value)
    path.write_text("{not json")
    with pytest.raises(SaeFormatError, match=r"baseline\.json: not valid JSON"):
        load_baseline(path, sae, Tap(1))
    data = json.loads(baseline.to_json())
    data["error"]["p50"] = -1.0
    path.write_text(json.dumps(data))
    with pytest.raises(SaeFormatError, match="negative or non-finite"):
        load_baseline(path, sae, Tap(1))
