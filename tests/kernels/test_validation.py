"""Each way an SAE artifact can be wrong fails at load with the file, the key and the reason."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from circuitwatch.fixtures.sae_writers import write_gemmascope, write_saelens, write_sparsify
from circuitwatch.kernels import SaeFormatError, load_sae

from support.random_saes import random_tensors


def saelens(tmp_path: Path, architecture: str = "standard", **kwargs) -> Path:
    return write_saelens(tmp_path / "sae", architecture, random_tensors(0, architecture), **kwargs)


def edit_cfg(path: Path, **changes) -> None:
    cfg = json.loads((path / "cfg.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (path / "cfg.json").write_text(json.dumps(cfg))


def replace_tensor(path: Path, key: str, value: torch.Tensor | None) -> None:
    tensors = random_tensors(0, json.loads((path / "cfg.json").read_text())["architecture"])
    if value is None:
        del tensors[key]
    else:
        tensors[key] = value
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "sae_weights.safetensors"))


def expect_error(path: Path, file: str, key: str | None, reason: str, **kwargs) -> SaeFormatError:
    with pytest.raises(SaeFormatError) as info:
        load_sae(path, **kwargs)
    message = str(info.value)
    assert file in message, message
    if key:
        assert f": {key}:" in message, message
    assert re.search(reason, message), message
    return info.value


def test_missing_key(tmp_path: Path) -> None:
    path = saelens(tmp_path)
    replace_tensor(path, "b_enc", None)
    expect_error(path, "sae_weights.safetensors", "b_enc", r"missing tensor \(present: W_dec, W_enc, b_dec\)")


def test_wrong_shape(tmp_path: Path) -> None:
    path = saelens(tmp_path)
    replace_tensor(path, "W_enc", torch.zeros(24, 81))
    expect_error(path, "sae_weights.safetensors", "W_enc", r"wrong shape \[24, 81\], expected \[24, 80\]")


def test_d_in_differs_from_model(tmp_path: Path) -> None:
    path = saelens(tmp_path)
    err = expect_error(
        path, "cfg.json", "d_in", "SAE d_in 24 differs from the model's hidden size 128", expected_d_in=128
    )
    assert err.key == "d_in"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(tmp_path: Path, bad: float) -> None:
    path = saelens(tmp_path)
    W = random_tensors(0, "standard")["W_enc"]
    W[3, 5] = bad
    W[7, 1] = bad
    replace_tensor(path, "W_enc", W)
    expect_error(path, "sae_weights.safetensors", "W_enc", r"2 non-finite values \(NaN or Inf\)")


def test_unknown_architecture(tmp_path: Path) -> None:
    path = saelens(tmp_path)
    edit_cfg(path, architecture="matryoshka_matching_pursuit")
    expect_error(
        path,
        "cfg.json",
        "architecture",
        r"unknown architecture 'matryoshka_matching_pursuit' \(supported: standard, jumprelu, topk, gated, "
        r"transcoder, skip_transcoder, jumprelu_transcoder\)",
    )


def test_unsupported_activation_function(tmp_path: Path) -> None:
    path = saelens(tmp_path)
    edit_cfg(path, activation_fn_str="tanh-relu")
    expect_error(path, "cfg.json", "activation_fn_str", "unsupported activation function 'tanh-relu'")


def test_topk_without_k(tmp_path: Path) -> None:
    path = saelens(tmp_path, "topk")
    expect_error(path, "cfg.json", "k", "topk architecture without k")


def test_k_larger_than_d_sae(tmp_path: Path) -> None:
    path = saelens(tmp_path, "topk", k=500)
    expect_error(path, "cfg.json", "k", r"k=500 must be in 1..d_sae \(80\)")


def test_missing_and_mistyped_config_fields(tmp_path: Path) -> None:
    path = saelens(tmp_path)
    edit_cfg(path, d_sae=None)
    expect_error(path, "cfg.json", "d_sae", "missing field")
    edit_cfg(path, d_sae="80")
    expect_error(path, "cfg.json", "d_sae", "expected int, got '80'")


def test_unknown_normalization(tmp_path: Path) -> None:
    path = saelens(tmp_path)
    edit_cfg(path, normalize_activations="whiten")
    expect_error(path, "cfg.json", "normalize_activations", "unknown value 'whiten'")


def test_invalid_json(tmp_path: Path) -> None:
    path = saelens(tmp_path)
    (path / "cfg.json").write_text("{not json")
    expect_error(path, "cfg.json", None, "not valid JSON")


def test_corrupt_weights_file(tmp_path: Path) -> None:
    path = saelens(tmp_path)
    (path / "sae_weights.safetensors").write_bytes(b"\x00" * 16)
    expect_error(path, "sae_weights.safetensors", None, "not a readable safetensors file")


def test_no_sae_in_directory(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    expect_error(tmp_path / "empty", "empty", None, "no SAE found: expected cfg.json")
    expect_error(tmp_path / "absent", "absent", None, "path does not exist")


def test_unknown_format_name(tmp_path: Path) -> None:
    path = saelens(tmp_path)
    expect_error(path, "sae", "format", "unknown SAE format 'onnx'", format="onnx")


def test_gemmascope_errors(tmp_path: Path) -> None:
    tensors = random_tensors(0, "jumprelu")
    tensors.pop("threshold")
    params = write_gemmascope(tmp_path / "gs", tensors)
    expect_error(params.parent, "params.npz", "threshold", "missing tensor")
    np.savez(params, W_enc=np.zeros((4, 4, 4), dtype=np.float32))
    expect_error(params.parent, "params.npz", "W_enc", r"expected a 2-D matrix, got shape \[4, 4, 4\]")


def test_sparsify_errors(tmp_path: Path) -> None:
    path = write_sparsify(tmp_path / "layers.0", random_tensors(0, "topk"), k=4)
    edit_cfg(path, activation="groupmax")
    expect_error(path, "cfg.json", "activation", "unsupported activation 'groupmax'")
    edit_cfg(path, activation="topk", num_latents=64)
    expect_error(path, "sae.safetensors", "encoder.weight", r"wrong shape \[80, 24\], expected \[64, 24\]")
