"""What an SAE is, independent of the file format it came from."""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch


class Architecture(enum.StrEnum):
    STANDARD = "standard"  # relu(pre)
    JUMPRELU = "jumprelu"  # relu(pre) where pre > threshold
    TOPK = "topk"  # the k largest pre-activations, then relu
    GATED = "gated"  # (gate pre > 0) * relu(magnitude pre)


class Normalization(enum.StrEnum):
    """SAELens `normalize_activations` modes that change the encoding at inference time."""

    NONE = "none"
    CONSTANT_NORM_RESCALE = "constant_norm_rescale"  # x * sqrt(d_in) / ||x||
    LAYER_NORM = "layer_norm"  # (x - mean) / (std + 1e-5)


@dataclass(frozen=True)
class SaeSpec:
    """Everything about an SAE that changes its codes, plus where it came from."""

    name: str
    architecture: Architecture
    d_in: int
    d_sae: int
    source_format: str  # saelens | gemmascope | sparsify
    path: Path
    k: int | None = None  # TopK architectures: features kept per token
    apply_b_dec_to_input: bool = False
    normalization: Normalization = Normalization.NONE
    layer: int | None = None  # from the file's metadata when it says
    hook_name: str | None = None  # as the file writes it; kernels/hook_points.py reads it
    hook_head: int | None = None  # SAELens `hook_head_index`: a single attention head's slice of hook_z
    transcoder: bool = False  # reads one place (the MLP input) and predicts another: codes, no reconstruction


@dataclass(frozen=True)
class EncoderWeights:
    """Encoder tensors in one canonical layout: W_enc is [d_in, d_sae], float32, on CPU."""

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    b_dec: torch.Tensor
    threshold: torch.Tensor | None = None  # jumprelu
    b_gate: torch.Tensor | None = None  # gated (b_enc holds b_gate there too)
    b_mag: torch.Tensor | None = None  # gated
    r_mag: torch.Tensor | None = None  # gated

    def named(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class Sae:
    spec: SaeSpec
    weights: EncoderWeights
    weights_hash: str = field(default="")
    # W_dec [d_sae, d_in] float32 in the scale of the activations the encoder emits: the reconstruction behind
    # fidelity (kernels/fidelity.py). None where the SAE reconstructs something other than its input
    # (transcoders). Kept out of weights_hash, which names what changes codes.
    decoder: torch.Tensor | None = field(default=None, repr=False)
    decoder_hash: str = field(default="")

    @property
    def name(self) -> str:
        return self.spec.name


def weights_hash(spec: SaeSpec, weights: EncoderWeights) -> str:
    """blake2b over the encoding-relevant settings and the canonical encoder tensors.

    Two SAEs with the same hash produce the same codes, whatever file format or path they came from.
    """
    digest = hashlib.blake2b(digest_size=16)
    settings = f"{spec.architecture}|{spec.d_in}|{spec.d_sae}|{spec.k}|{spec.apply_b_dec_to_input}|{spec.normalization}"
    digest.update(settings.encode())
    for name, tensor in sorted(weights.named().items()):
        array = tensor.detach().to(torch.float32).contiguous().numpy()
        digest.update(f"|{name}:{list(array.shape)}|".encode())
        digest.update(array.tobytes())
    return f"blake2b:{digest.hexdigest()}"


def decoder_hash(decoder: torch.Tensor) -> str:
    """blake2b over the decoder matrix: a baseline is pinned to it as well as to the encoder."""
    digest = hashlib.blake2b(digest_size=16)
    array = decoder.detach().to(torch.float32).contiguous().numpy()
    digest.update(f"W_dec:{list(array.shape)}|".encode())
    digest.update(array.tobytes())
    return f"blake2b:{digest.hexdigest()}"
