"""SAE artifacts (load, validate, identify) and encoders that turn residual rows into integer codes."""

from .codes import EMPTY_ID, Codes
from .errors import SaeFormatError
from .formats import detect_format, load_sae
from .reference import ReferenceEncoder, default_selection
from .selection import CodeSelection, SelectionMode, select_codes, top_k_lowest_id
from .spec import Architecture, EncoderWeights, Normalization, Sae, SaeSpec, weights_hash

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
