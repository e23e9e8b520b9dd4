"""Reading configuration files the same way everywhere (plugin, sidecar): a YAML (or .json) file that must hold
a mapping, and pydantic validation errors as 'field.path: reason', so every bad file fails with its name, the
field and the reason."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

MAX_NODES = 100_000  # YAML nodes after expanding aliases: far above any real file, far below an alias bomb
MAX_DEPTH = 64


def read_text(path: Path, error: type[Exception]) -> str:
    """A config file's text; unreadable or not UTF-8 is `error` naming the file."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from exc


def safe_yaml(text: str, source: str, error: type[Exception]) -> Any:
    """yaml.safe_load with bounds: at most MAX_NODES nodes once aliases are expanded (an alias bomb or a
    recursive alias is refused, not expanded) and at most MAX_DEPTH levels of nesting."""
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _check_size(node, source, error)
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise error(f"{source}: not valid YAML ({exc})") from exc
    except RecursionError:
        raise error(f"{source}: nested deeper than {MAX_DEPTH} levels") from None


def _check_size(root: yaml.Node, source: str, error: type[Exception]) -> None:
    count = 0
    stack = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise error(f"{source}: more than {MAX_NODES} YAML nodes once aliases are expanded (an alias bomb?)")
        if depth > MAX_DEPTH:
            raise error(f"{source}: nested deeper than {MAX_DEPTH} levels (or a recursive alias)")
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                stack.extend(((key, depth + 1), (value, depth + 1)))


def read_mapping(path: Path, error: type[Exception]) -> dict[str, Any]:
    """The mapping in a YAML file (JSON when the name ends in .json); an empty file is an empty mapping."""
    kind = "JSON" if path.suffix == ".json" else "YAML"
    text = read_text(path, error)
    try:
        data = json.loads(text) if kind == "JSON" else safe_yaml(text, str(path), error)
    except (json.JSONDecodeError, RecursionError) as exc:
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
