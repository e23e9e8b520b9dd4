"""Reading configuration files the same way everywhere (plugin, sidecar): a YAML (or .json) file that must hold
a mapping, and pydantic validation errors as 'field.path: reason', so every bad file fails with its name, the
field and the reason."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError


def read_mapping(path: Path, error: type[Exception]) -> dict[str, Any]:
    """The mapping in a YAML file (JSON when the name ends in .json); an empty file is an empty mapping."""
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        text = path.read_text()
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        data = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise error(f"{path}: not valid {kind} ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def format_validation_error(exc: ValidationError) -> str:
    """'field.path: reason' for every problem, e.g. 'index.window_s: Input should be greater than 0'."""
    parts = []
    for problem in exc.errors():
        where = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        parts.append(f"{where}: {problem['msg']}")
    return "; ".join(parts)
