"""SAELens directories: `cfg.json` + `sae_weights.safetensors` (v6 configs and the flat pre-v6 ones)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..errors import SaeFormatError
from ..spec import Architecture, EncoderWeights, Normalization, Sae, SaeSpec
from .common import ConfigAndWeights, config_value, finish, fold_decoder_norm, require

FILES = ConfigAndWeights("cfg.json", "sae_weights.safetensors")

# `expected_average_only_in` is folded into the weights by SAELens before saving or at from_pretrained
# time; at inference the encode path does nothing for it, so it encodes like `none`.
_NORMALIZATIONS = {
    "none": Normalization.NONE,
    "expected_average_only_in": Normalization.NONE,
    "constant_norm_rescale": Normalization.CONSTANT_NORM_RESCALE,
    "layer_norm": Normalization.LAYER_NORM,
}


def detect(directory: Path) -> bool:
    return FILES.detect(directory)


def load(directory: Path, expected_d_in: int | None = None, name: str | None = None) -> Sae:
    cfg_path, cfg, weights_path, tensors = FILES.read(directory)

    architecture, k, transcoder = _architecture(cfg, cfg_path)
    d_in = config_value(cfg, cfg_path, "d_in", int)
    d_sae = config_value(cfg, cfg_path, "d_sae", int)
    # a transcoder's b_dec is the output's bias (d_out): it never centres the input
    d_out = config_value(cfg, cfg_path, "d_out", int, default=d_in) if transcoder else d_in
    apply_b_dec = not transcoder and config_value(cfg, cfg_path, "apply_b_dec_to_input", bool, default=True)
    normalization = _normalization(cfg, cfg_path)
    hook_name = _hook_name(cfg)

    W_enc = require(tensors, "W_enc", (d_in, d_sae), weights_path)
    b_dec = require(tensors, "b_dec", (d_out,), weights_path)
    if transcoder:
        b_dec = torch.zeros(d_in)  # the encoder's view: nothing to centre by
    if architecture is Architecture.GATED:
        b_gate = require(tensors, "b_gate", (d_sae,), weights_path)
        weights = EncoderWeights(
            W_enc=W_enc,
            b_enc=b_gate,
            b_dec=b_dec,
            b_gate=b_gate,
            b_mag=require(tensors, "b_mag", (d_sae,), weights_path),
            r_mag=require(tensors, "r_mag", (d_sae,), weights_path),
        )
    else:
        weights = EncoderWeights(W_enc=W_enc, b_enc=require(tensors, "b_enc", (d_sae,), weights_path), b_dec=b_dec)
    if architecture is Architecture.JUMPRELU:
        weights = EncoderWeights(
            W_enc=weights.W_enc,
            b_enc=weights.b_enc,
            b_dec=b_dec,
            threshold=_threshold(tensors, d_sae, weights_path),
        )
    decoder = require(tensors, "W_dec", (d_sae, d_out), weights_path)  # NaN anywhere fails here, used or not
    if architecture is Architecture.TOPK and config_value(
        cfg, cfg_path, "rescale_acts_by_decoder_norm", bool, default=False
    ):
        weights, decoder = fold_decoder_norm(weights, decoder)

    spec = SaeSpec(
        name=name or directory.name,
        architecture=architecture,
        d_in=d_in,
        d_sae=d_sae,
        source_format="saelens",
        path=directory,
        k=k,
        apply_b_dec_to_input=apply_b_dec,
        normalization=normalization,
        layer=_layer(cfg, hook_name),
        hook_name=hook_name,
        hook_head=_head_index(cfg, cfg_path),
        transcoder=transcoder,
    )
    # a transcoder's decoder predicts another activation (the MLP's output): no reconstruction error to measure
    return finish(spec, weights, expected_d_in, cfg_path, None if transcoder else decoder)


# SAELens transcoders encode like the SAE architecture they build on; their skip connection (skip_transcoder)
# only changes the output
_TRANSCODERS = {"transcoder": "standard", "skip_transcoder": "standard", "jumprelu_transcoder": "jumprelu"}


def _architecture(cfg: dict[str, Any], cfg_path: Path) -> tuple[Architecture, int | None, bool]:
    """(architecture, k, transcoder): the v6 `architecture`, mapping pre-v6 configs the way SAELens itself does."""
    activation_fn = cfg.get("activation_fn_str", cfg.get("activation_fn"))
    kwargs = cfg.get("activation_fn_kwargs") or {}
    raw = cfg.get("architecture", "standard")
    transcoder = raw in _TRANSCODERS
    raw = _TRANSCODERS.get(raw, raw)
    if activation_fn == "topk":
        raw = "topk"
    elif activation_fn not in (None, "relu"):
        key = "activation_fn_str" if "activation_fn_str" in cfg else "activation_fn"
        raise SaeFormatError(
            cfg_path, key, f"unsupported activation function {activation_fn!r} (supported: relu, topk)"
        )
    try:
        architecture = Architecture(raw)
    except ValueError:
        supported = ", ".join([*(a.value for a in Architecture), *_TRANSCODERS])
        raise SaeFormatError(
            cfg_path, "architecture", f"unknown architecture {raw!r} (supported: {supported})"
        ) from None
    if architecture is not Architecture.TOPK:
        return architecture, None, transcoder
    if "k" in cfg:
        return architecture, config_value(cfg, cfg_path, "k", int), transcoder
    if "k" in kwargs:
        return architecture, config_value(kwargs, cfg_path, "k", int), transcoder
    raise SaeFormatError(cfg_path, "k", "topk architecture without k (top-level or activation_fn_kwargs.k)")


def _normalization(cfg: dict[str, Any], cfg_path: Path) -> Normalization:
    raw = cfg.get("normalize_activations")
    if raw is None or raw is False:
        return Normalization.NONE
    if raw is True:
        return Normalization.NONE  # pre-v6 boolean: expected_average_only_in, identity at inference
    if raw not in _NORMALIZATIONS:
        allowed = ", ".join(_NORMALIZATIONS)
        raise SaeFormatError(cfg_path, "normalize_activations", f"unknown value {raw!r} (supported: {allowed})")
    return _NORMALIZATIONS[raw]


def _threshold(tensors: dict[str, torch.Tensor], d_sae: int, weights_path: Path) -> torch.Tensor:
    if "threshold" not in tensors and "log_threshold" in tensors:
        return torch.exp(require(tensors, "log_threshold", (d_sae,), weights_path))
    return require(tensors, "threshold", (d_sae,), weights_path)


def _hook_name(cfg: dict[str, Any]) -> str | None:
    metadata = cfg.get("metadata") or {}
    for source, key in ((cfg, "hook_name"), (metadata, "hook_name"), (cfg, "hook_point")):
        if isinstance(source.get(key), str):
            return source[key]
    return None


def _head_index(cfg: dict[str, Any], cfg_path: Path) -> int | None:
    """`hook_head_index`: the SAE reads one attention head's slice of hook_z."""
    metadata = cfg.get("metadata") or {}
    for source in (cfg, metadata):
        value = source.get("hook_head_index")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SaeFormatError(cfg_path, "hook_head_index", f"expected a head number >= 0, got {value!r}")
        return value
    return None


def _layer(cfg: dict[str, Any], hook_name: str | None) -> int | None:
    for key in ("hook_layer", "hook_point_layer"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    match = re.search(r"(?:blocks|layers)\.(\d+)(?:\.|$)", hook_name or "")
    return int(match.group(1)) if match else None
