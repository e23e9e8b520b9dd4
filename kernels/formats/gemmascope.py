"""Gemma Scope JumpReLU SAEs: `params.npz` (Gemma Scope 1) or `params.safetensors` (Gemma Scope 2).

Formula from the official tutorial: pre = x @ W_enc + b_enc; acts = (pre > threshold) * relu(pre). The input
is not centred by b_dec.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import SaeFormatError
from ..spec import Architecture, EncoderWeights, Sae, SaeSpec
from .common import finish, matrix_shape, read_npz, read_safetensors, require

PARAM_FILES = ("params.npz", "params.safetensors")


def params_file(path: Path) -> Path | None:
    if path.is_file() and path.name in PARAM_FILES:
        return path
    for name in PARAM_FILES:
        if (path / name).is_file():
            return path / name
    return None


def detect(path: Path) -> bool:
    return params_file(path) is not None


def load(path: Path, expected_d_in: int | None = None, name: str | None = None) -> Sae:
    params = params_file(path)
    if params is None:
        raise SaeFormatError(path, None, f"no Gemma Scope parameters file ({' or '.join(PARAM_FILES)})")
    raw = read_npz(params) if params.suffix == ".npz" else read_safetensors(params)
    # Gemma Scope 2 writes lower-case w_enc / w_dec.
    tensors: dict[str, torch.Tensor] = {re.sub(r"^w_", "W_", key): value for key, value in raw.items()}
    d_in, d_sae = matrix_shape(tensors, "W_enc", params)
    weights = EncoderWeights(
        W_enc=require(tensors, "W_enc", (d_in, d_sae), params),
        b_enc=require(tensors, "b_enc", (d_sae,), params),
        b_dec=require(tensors, "b_dec", (d_in,), params),
        threshold=require(tensors, "threshold", (d_sae,), params),
    )
    decoder = require(tensors, "W_dec", (d_sae, d_in), params)
    directory = params.parent
    layer_match = re.search(r"layer_(\d+)", str(directory))
    spec = SaeSpec(
        name=name or "/".join(directory.parts[-3:]),
        architecture=Architecture.JUMPRELU,
        d_in=d_in,
        d_sae=d_sae,
        source_format="gemmascope",
        path=directory,
        apply_b_dec_to_input=False,
        layer=int(layer_match.group(1)) if layer_match else None,
    )
    return finish(spec, weights, expected_d_in, params, decoder)
