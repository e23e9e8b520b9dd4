"""Load an SAE from any supported on-disk format into one `Sae` (spec + canonical encoder weights)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import SaeFormatError
from ..spec import Sae
from . import gemmascope, saelens, sparsify

Loader = Callable[..., Sae]
FORMATS: dict[str, tuple[Callable[[Path], bool], Loader]] = {
    "saelens": (saelens.detect, saelens.load),
    "gemmascope": (gemmascope.detect, gemmascope.load),
    "sparsify": (sparsify.detect, sparsify.load),
}


def detect_format(path: Path) -> str:
    for name, (detect, _) in FORMATS.items():
        if detect(path):
            return name
    raise SaeFormatError(
        path,
        None,
        "no SAE found: expected cfg.json + sae_weights.safetensors (SAELens), params.npz or "
        "params.safetensors (Gemma Scope), or cfg.json + sae.safetensors (sparsify)",
    )


def load_sae(path: str | Path, format: str = "auto", expected_d_in: int | None = None, name: str | None = None) -> Sae:
    """Load and validate an SAE; `expected_d_in` is the model's hidden size when known."""
    path = Path(path)
    if not path.exists():
        raise SaeFormatError(path, None, "path does not exist")
    if format == "auto":
        format = detect_format(path)
    if format not in FORMATS:
        raise SaeFormatError(path, "format", f"unknown SAE format {format!r} (supported: auto, {', '.join(FORMATS)})")
    return FORMATS[format][1](path, expected_d_in=expected_d_in, name=name)


__all__ = ["FORMATS", "detect_format", "load_sae"]
