"""SAE artifacts (load, validate, identify) and encoders that turn residual rows into integer codes.

Names are imported on first use: `circuitwatch.kernels.hook_points` is read by the sidecar and the CLI, which
install without torch (`pip install circuitwatch`), and importing this package must not pull torch in for them.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EMPTY_ID": ".codes",
    "Codes": ".codes",
    "SaeFormatError": ".errors",
    "detect_format": ".formats",
    "load_sae": ".formats",
    "ReferenceEncoder": ".reference",
    "default_selection": ".reference",
    "CodeSelection": ".selection",
    "SelectionMode": ".selection",
    "select_codes": ".selection",
    "top_k_lowest_id": ".selection",
    "Architecture": ".spec",
    "EncoderWeights": ".spec",
    "Normalization": ".spec",
    "Sae": ".spec",
    "SaeSpec": ".spec",
    "weights_hash": ".spec",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)


__all__ = [
    "EMPTY_ID",
    "Architecture",
    "CodeSelection",
    "Codes",
    "EncoderWeights",
    "Normalization",
    "ReferenceEncoder",
    "Sae",
    "SaeFormatError",
    "SaeSpec",
    "SelectionMode",
    "default_selection",
    "detect_format",
    "load_sae",
    "select_codes",
    "top_k_lowest_id",
    "weights_hash",
]
