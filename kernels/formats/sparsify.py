"""EleutherAI sparsify SAEs: `<hookpoint>/cfg.json` + `<hookpoint>/sae.safetensors`, TopK.

Formula from sparsify's SparseCoder: pre = relu((x - b_dec) @ encoder.weight.T + encoder.bias), then the k
largest; x_hat = acts @ W_dec + b_dec. Transcoders (`transcode: true`) do not centre the input by b_dec, and
their decoder predicts the MLP's output, so they carry no decoder for fidelity.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import SaeFormatError
from ..spec import Architecture, EncoderWeights, Sae, SaeSpec
from .common import ConfigAndWeights, config_value, finish, require

FILES = ConfigAndWeights("cfg.json", "sae.safetensors")


def detect(directory: Path) -> bool:
    return FILES.detect(directory)


def load(directory: Path, expected_d_in: int | None = None, name: str | None = None) -> Sae:
    cfg_path, cfg, weights_path, tensors = FILES.read(directory)

    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise SaeFormatError(cfg_path, "activation", f"unsupported activation {activation!r} (supported: topk)")
    if cfg.get("signed"):
        raise SaeFormatError(cfg_path, "signed", "signed sparsify SAEs are not supported")
    d_in = config_value(cfg, cfg_path, "d_in", int)
    k = config_value(cfg, cfg_path, "k", int)
    num_latents = cfg.get("num_latents") or 0
    if not isinstance(num_latents, int) or num_latents < 0:
        raise SaeFormatError(cfg_path, "num_latents", f"expected a non-negative int, got {num_latents!r}")
    if num_latents == 0:
        num_latents = d_in * config_value(cfg, cfg_path, "expansion_factor", int)
    transcode = config_value(cfg, cfg_path, "transcode", bool, default=False)

    weights = EncoderWeights(
        W_enc=require(tensors, "encoder.weight", (num_latents, d_in), weights_path).T.contiguous(),
        b_enc=require(tensors, "encoder.bias", (num_latents,), weights_path),
        b_dec=require(tensors, "b_dec", (d_in,), weights_path),
    )
    decoder = require(tensors, "W_dec", (num_latents, d_in), weights_path)
    layer_match = re.search(r"(?:^|\.)layers\.(\d+)(?:\.|$)", directory.name)
    spec = SaeSpec(
        name=name or directory.name,
        architecture=Architecture.TOPK,
        d_in=d_in,
        d_sae=num_latents,
        source_format="sparsify",
        path=directory,
        k=k,
        apply_b_dec_to_input=not transcode,
        layer=int(layer_match.group(1)) if layer_match else None,
        hook_name=directory.name,
        transcoder=transcode,
    )
    # a transcoder's decoder predicts the MLP output, not its input: no reconstruction error to measure
    return finish(spec, weights, expected_d_in, cfg_path, None if transcode else decoder)
