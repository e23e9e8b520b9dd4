"""Hook points as each SAE family names them, read into the plugin's terms; SAELens hook_z, per-head and transcoder
files loaded and validated; a slot's tap resolved from the SAE's files, with mismatches named on both sides."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from circuitwatch.fixtures.sae_writers import write_gemmascope, write_saelens, write_sparsify
from circuitwatch.kernels import ReferenceEncoder, SaeFormatError, load_sae
from circuitwatch.kernels.hook_points import (
    HookPoint,
    ModelShape,
    Tap,
    TapMismatchError,
    TrainedTap,
    UnknownHookPointError,
    parse_hook_name,
    resolve_tap,
    trained_tap,
)

from support.numpy_sae import saelens_activations, sparsify_activations
from support.random_saes import D_IN, D_SAE, random_tensors


@pytest.mark.parametrize(
    ("name", "transcoder", "expected"),
    [
        ("blocks.2.hook_resid_post", False, (2, "resid_post", None)),
        ("blocks.3.hook_resid_pre", False, (3, "resid_pre", None)),
        ("blocks.0.hook_resid_pre", False, (0, "resid_pre", None)),
        ("blocks.2.hook_attn_out", False, (2, "attn_out", None)),
        ("blocks.2.attn.hook_z", False, (2, "attn_z", None)),
        ("blocks.2.attn.hook_z.h5", False, (2, "attn_z", 5)),  # SAELens get_hook_name with a head index
        ("blocks.2.hook_mlp_out", False, (2, "mlp_out", None)),
        ("blocks.2.ln2.hook_normalized", False, (2, "mlp_in", None)),  # SAELens transcoders' input
        ("model.layers.5", False, (5, "resid_post", None)),
        ("layers.4", False, (4, "resid_post", None)),
        ("layers.4.mlp", False, (4, "mlp_out", None)),  # sparsify: the module's output
        ("layers.4.mlp", True, (4, "mlp_in", None)),  # a sparsify transcoder reads the module's input
        ("layers.4.self_attn", False, (4, "attn_out", None)),
        ("model.layers.4.post_attention_layernorm", False, (4, "mlp_in", None)),
        ("something.else", False, (None, None, None)),
    ],
)
def test_hook_names_of_every_family(name: str, transcoder: bool, expected: tuple) -> None:
    found = parse_hook_name(name, transcoder)
    assert (found.layer, found.hook_point, found.head) == expected


@pytest.mark.parametrize("name", ["blocks.2.hook_resid_mid", "blocks.2.attn.hook_pattern", "layers.2.mlp.act_fn"])
def test_a_hook_point_without_a_tap_is_named(name: str) -> None:
    with pytest.raises(UnknownHookPointError, match=r"circuitwatch has no tap for"):
        parse_hook_name(name)


def test_the_residual_stream_has_two_names() -> None:
    assert Tap(3, HookPoint.RESID_PRE).canonical() == Tap(2, HookPoint.RESID_POST)
    assert Tap(0, HookPoint.RESID_PRE).canonical() == Tap(0, HookPoint.RESID_PRE)  # the embeddings
    assert TrainedTap(2, HookPoint.RESID_POST).conflicts(Tap(3, HookPoint.RESID_PRE)) == []
    assert TrainedTap(2, HookPoint.RESID_POST).conflicts(Tap(2, HookPoint.RESID_PRE)) == ["L2.resid_post"]
    with pytest.raises(ValueError, match="only attn_z taps have heads"):
        Tap(1, HookPoint.MLP_OUT, head=0)


def test_widths_per_tap() -> None:
    shape = ModelShape(hidden_size=2304, num_heads=8, head_dim=256)  # Gemma 2 2B
    assert shape.width(Tap(3, HookPoint.ATTN_Z)) == 2048
    assert shape.width(Tap(3, HookPoint.ATTN_Z, 1)) == 256
    assert shape.width(Tap(3, HookPoint.MLP_OUT)) == 2304


def _saelens(tmp_path: Path, name: str, **cfg) -> Path:
    path = write_saelens(tmp_path / name, "standard", random_tensors(3, "standard"))
    data = json.loads((path / "cfg.json").read_text())
    data["metadata"].update(cfg.pop("metadata", {}))
    data.update(cfg)
    (path / "cfg.json").write_text(json.dumps(data))
    return path


def test_saelens_per_head_sae(tmp_path: Path) -> None:
    path = _saelens(tmp_path, "head", metadata={"hook_name": "blocks.4.attn.hook_z"}, hook_head_index=1)
    spec = load_sae(path).spec
    assert spec.hook_head == 1
    assert trained_tap(spec) == TrainedTap(4, HookPoint.ATTN_Z, 1, "blocks.4.attn.hook_z")
    # unset in the slot: hook point and head come from the SAE
    assert resolve_tap(spec, 4, None, None) == Tap(4, HookPoint.ATTN_Z, 1)
    with pytest.raises(
        TapMismatchError,
        match=r"was trained on head 1 \(blocks.4.attn.hook_z\), but the slot taps "
        r"L4.attn_z.h0",
    ):
        resolve_tap(spec, 4, "attn_z", 0)
    with pytest.raises(TapMismatchError, match=r"was trained on L4.attn_z.h1 .*but the slot taps L4.resid_post"):
        resolve_tap(spec, 4, "resid_post", None)
    assert resolve_tap(spec, 4, "resid_post", None, check=False) == Tap(4, HookPoint.RESID_POST)


@pytest.mark.parametrize("value", [-1, "2", True])
def test_a_bad_head_index_names_the_file_and_field(tmp_path: Path, value) -> None:
    path = _saelens(tmp_path, "bad", hook_head_index=value)
    with pytest.raises(SaeFormatError, match=r"cfg\.json: hook_head_index: expected a head number"):
        load_sae(path)


def test_an_sae_naming_an_untappable_hook_point_is_refused_unless_told(tmp_path: Path) -> None:
    spec = load_sae(_saelens(tmp_path, "mid", metadata={"hook_name": "blocks.2.hook_resid_mid"})).spec
    with pytest.raises(TapMismatchError, match=r"hook_resid_mid"):
        resolve_tap(spec, 2, None, None)
    assert resolve_tap(spec, 2, "attn_out", None, check=False) == Tap(2, HookPoint.ATTN_OUT)


@pytest.mark.parametrize(
    ("release", "expected"),
    [
        ("gemma-scope-2b-pt-att", HookPoint.ATTN_Z),
        ("gemma-scope-2b-pt-att-canonical", HookPoint.ATTN_Z),
        ("gemma-scope-9b-pt-res", HookPoint.RESID_POST),
        ("gemma-scope-2b-pt-mlp-canonical", HookPoint.MLP_OUT),
        ("gemma-scope-2b-pt-transcoders", HookPoint.MLP_IN),
        ("my-attic", None),  # "-att" must be the release's kind, not any substring
    ],
)
def test_gemma_scope_hook_point_from_the_release_path(tmp_path: Path, release: str, expected) -> None:
    tensors = random_tensors(4, "jumprelu")
    directory = tmp_path / release / "layer_3" / "width_16k" / "average_l0_50"
    write_gemmascope(directory, tensors)
    assert trained_tap(load_sae(directory).spec) == TrainedTap(3, expected, None, str(directory))


@pytest.mark.parametrize("architecture", ["transcoder", "skip_transcoder", "jumprelu_transcoder"])
def test_saelens_transcoders(tmp_path: Path, architecture: str) -> None:
    """Input d_in, output d_out: b_dec and W_dec are the output's, never applied to the input; codes equal
    relu(x @ W_enc + b_enc) (with the threshold for JumpReLU), and there is no reconstruction of the input."""
    d_out = 16
    g = torch.Generator().manual_seed(9)
    tensors = {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g) / D_IN**0.5,
        "b_enc": torch.randn(D_SAE, generator=g) * 0.3,
        "W_dec": torch.randn(D_SAE, d_out, generator=g),
        "b_dec": torch.randn(d_out, generator=g),
    }
    if architecture == "jumprelu_transcoder":
        tensors["threshold"] = torch.rand(D_SAE, generator=g) * 0.5
    if architecture == "skip_transcoder":
        tensors["W_skip"] = torch.randn(d_out, D_IN, generator=g)
    path = write_saelens(
        tmp_path / "tc",
        architecture,
        tensors,
        hook_name="blocks.2.ln2.hook_normalized",
        extra_cfg={"d_out": d_out, "hook_name_out": "blocks.2.hook_mlp_out", "apply_b_dec_to_input": False},
    )
    sae = load_sae(path)
    assert sae.spec.transcoder and sae.decoder is None and not sae.spec.apply_b_dec_to_input
    assert resolve_tap(sae.spec, 2, None, None) == Tap(2, HookPoint.MLP_IN)
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(12, D_IN)).astype(np.float32))
    pre = x.double() @ tensors["W_enc"].double() + tensors["b_enc"].double()
    expected = torch.relu(pre)
    if architecture == "jumprelu_transcoder":
        expected = expected * (pre > tensors["threshold"].double())
    got = ReferenceEncoder(sae).activations(x).double()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the wrong output width is named
    data = json.loads((path / "cfg.json").read_text())
    data["d_out"] = d_out + 1
    (path / "cfg.json").write_text(json.dumps(data))
    with pytest.raises(SaeFormatError, match=r"b_dec: wrong shape \[16\], expected \[17\]"):
        load_sae(path)


def test_sparsify_transcoder_and_module_hookpoints(tmp_path: Path) -> None:
    tensors = random_tensors(5, "standard")
    transcoder = write_sparsify(tmp_path / "tc" / "layers.3.mlp", tensors, k=4, transcode=True)
    sae_out = write_sparsify(tmp_path / "sae" / "layers.3.mlp", tensors, k=4)
    assert resolve_tap(load_sae(transcoder).spec, 3, None, None) == Tap(3, HookPoint.MLP_IN)
    assert resolve_tap(load_sae(sae_out).spec, 3, None, None) == Tap(3, HookPoint.MLP_OUT)
    assert load_sae(transcoder).spec.layer == 3
    x = np.random.default_rng(1).normal(size=(10, D_IN)).astype(np.float32)
    for path in (transcoder, sae_out):  # the transcoder does not centre by b_dec; the SAE does
        expected, _ = sparsify_activations(path, x)
        got = ReferenceEncoder(load_sae(path)).activations(torch.from_numpy(x)).double().numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert load_sae(transcoder).decoder is None and load_sae(sae_out).decoder is not None


def test_saelens_hook_z_all_heads(tmp_path: Path) -> None:
    """Gemma Scope attention SAEs through SAELens: hook_z flattened (reshape_activations: hook_z), d_in = heads x
    head_dim; the tap's width is checked against the model, not the hidden size."""
    path = _saelens(tmp_path, "z", metadata={"hook_name": "blocks.6.attn.hook_z"}, reshape_activations="hook_z")
    spec = load_sae(path).spec
    tap = resolve_tap(spec, 6, None, None)
    assert tap == Tap(6, HookPoint.ATTN_Z)
    assert ModelShape(hidden_size=64, num_heads=4, head_dim=6).width(tap) == spec.d_in == D_IN
    x = np.random.default_rng(2).normal(size=(5, D_IN)).astype(np.float32)
    expected, _ = saelens_activations(path, x)
    got = ReferenceEncoder(load_sae(path)).activations(torch.from_numpy(x)).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
