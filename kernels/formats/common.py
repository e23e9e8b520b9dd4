"""Shared pieces of the format loaders: reading files and checking tensors, with errors that name both."""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import SaeFormatError
from ..spec import EncoderWeights, Sae, SaeSpec, decoder_hash, weights_hash


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SaeFormatError(path, None, "file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SaeFormatError(path, None, f"not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise SaeFormatError(path, None, f"expected a JSON object, got {type(data).__name__}")
    return data


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise SaeFormatError(path, None, "file not found")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise SaeFormatError(path, None, f"not a readable safetensors file ({exc})") from exc


@dataclass(frozen=True)
class ConfigAndWeights:
    """A format whose directory holds a JSON config next to one safetensors file (SAELens, sparsify)."""

    config_file: str
    weights_file: str

    def detect(self, directory: Path) -> bool:
        return (directory / self.config_file).is_file() and (directory / self.weights_file).is_file()

    def read(self, directory: Path) -> tuple[Path, dict[str, Any], Path, dict[str, torch.Tensor]]:
        """(config path, config, weights path, tensors), each read with the file named on error."""
        cfg_path, weights_path = directory / self.config_file, directory / self.weights_file
        return cfg_path, read_json(cfg_path), weights_path, read_safetensors(weights_path)


def read_npz(path: Path) -> dict[str, torch.Tensor]:
    """The arrays of an .npz archive. Pickled or object data is never loaded (weights are plain arrays), and a
    truncated, empty or foreign file is an error naming the file, never numpy's bare exception."""
    if not path.is_file():
        raise SaeFormatError(path, None, "file not found")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise SaeFormatError(path, None, f"not a readable .npz archive: truncated or damaged ({exc})") from None
    except ValueError as exc:
        if "pickle" in str(exc):
            reason = "not an .npz archive of arrays (it holds pickled data, which is never loaded for weights)"
        else:
            reason = f"not a readable .npz archive ({exc})"
        raise SaeFormatError(path, None, reason) from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise SaeFormatError(path, None, "a single .npy array, not an .npz archive of named arrays")
    try:
        with archive:
            return {key: torch.from_numpy(np.array(archive[key])) for key in archive.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise SaeFormatError(
            path, None, f"an array of the .npz archive cannot be read: truncated or damaged ({exc})"
        ) from None


def config_value(cfg: dict[str, Any], path: Path, key: str, kind: type, default: Any = ...) -> Any:
    """A typed field of a JSON config; a missing or mistyped field names the file and the key."""
    if key not in cfg or cfg[key] is None:
        if default is ...:
            raise SaeFormatError(path, key, "missing field")
        return default
    value = cfg[key]
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise SaeFormatError(path, key, f"expected {kind.__name__}, got {value!r}")
    if kind is int and value <= 0:
        raise SaeFormatError(path, key, f"must be positive, got {value}")
    return value


def require(tensors: dict[str, torch.Tensor], key: str, shape: tuple[int, ...], path: Path) -> torch.Tensor:
    """A float tensor of the given shape, converted to float32."""
    if key not in tensors:
        present = ", ".join(sorted(tensors)) or "none"
        raise SaeFormatError(path, key, f"missing tensor (present: {present})")
    tensor = tensors[key]
    if tuple(tensor.shape) != shape:
        raise SaeFormatError(path, key, f"wrong shape {list(tensor.shape)}, expected {list(shape)}")
    if not tensor.is_floating_point():
        raise SaeFormatError(path, key, f"expected a floating-point tensor, got {tensor.dtype}")
    tensor = tensor.to(torch.float32)
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise SaeFormatError(path, key, f"{bad} non-finite values (NaN or Inf)")
    return tensor.contiguous()


def matrix_shape(tensors: dict[str, torch.Tensor], key: str, path: Path) -> tuple[int, int]:
    if key not in tensors:
        present = ", ".join(sorted(tensors)) or "none"
        raise SaeFormatError(path, key, f"missing tensor (present: {present})")
    shape = tuple(tensors[key].shape)
    if len(shape) != 2:
        raise SaeFormatError(path, key, f"expected a 2-D matrix, got shape {list(shape)}")
    return int(shape[0]), int(shape[1])


def finish(
    spec: SaeSpec,
    weights: EncoderWeights,
    expected_d_in: int | None,
    cfg_path: Path,
    decoder: torch.Tensor | None = None,
) -> Sae:
    if expected_d_in is not None and spec.d_in != expected_d_in:
        raise SaeFormatError(
            cfg_path, "d_in", f"SAE d_in {spec.d_in} differs from the model's hidden size {expected_d_in}"
        )
    if spec.k is not None and not 0 < spec.k <= spec.d_sae:
        raise SaeFormatError(cfg_path, "k", f"k={spec.k} must be in 1..d_sae ({spec.d_sae})")
    return Sae(
        spec=spec,
        weights=weights,
        weights_hash=weights_hash(spec, weights),
        decoder=decoder,
        decoder_hash=decoder_hash(decoder) if decoder is not None else "",
    )


def fold_decoder_norm(weights: EncoderWeights, W_dec: torch.Tensor) -> tuple[EncoderWeights, torch.Tensor]:
    """SAELens `rescale_acts_by_decoder_norm`: pre-activations scaled by each decoder row's norm, so the emitted
    activations are in that scale and reconstruct through unit-norm decoder rows. (encoder, decoder)."""
    norms = W_dec.norm(dim=1)
    folded = EncoderWeights(W_enc=weights.W_enc * norms, b_enc=weights.b_enc * norms, b_dec=weights.b_dec)
    return folded, W_dec / norms.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
