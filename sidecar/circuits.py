"""Safety circuits declared in YAML, validated at load with file, path and reason.

circuits:
  - name: credential-leak
    severity: high                 # info | low | medium | high | critical
    scope: generated               # prompt | generated | both (default both)
    window: 8                      # optional: terms co-occur inside 8 consecutive tokens
    min_tokens: 2                  # default 1: tokens that must match
    labels: [exfiltration]         # free-form strings (a mapping becomes key=value)
    action: abort                  # optional; default: record only
    when:
      all:
        - {layer: 2, feature: 17, min_activation: 0.5}
        - any:
            - {layer: 1, feature: 3, sae: "blake2b:4f1c"}
            - not: {slot: 0, feature: 9}
        - at_least: {n: 2, of: [{layer: 3, feature: 1}, {layer: 3, feature: 2}, {layer: 3, feature: 8}]}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from circuitwatch.config_files import read_text, safe_yaml
from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto.names import HOOK_POINT_NAMES, SCOPES, SEVERITIES

from .config import ConfigError
from .expressions import All, AnyOf, AtLeast, Expr, Not, Term, is_monotone, terms_of

ACTIONS = ("", "abort")
MAX_FEATURE = (1 << 28) - 1  # feature ids are 28 bits in the index
MAX_WINDOW = 1 << 16  # hard bound at parse time; limits.max_circuit_window is the configured one
_CIRCUIT_KEYS = {"name", "description", "severity", "scope", "window", "min_tokens", "labels", "action", "when"}
_TERM_KEYS = {"feature", "slot", "layer", "sae", "min_activation", "hook_point", "head"}


@dataclass(frozen=True)
class Circuit:
    name: str
    expression: Expr
    severity: int = pb.SEVERITY_MEDIUM
    scope: int = pb.SCOPE_BOTH
    window: int = 1
    min_tokens: int = 1
    labels: tuple[str, ...] = ()
    action: str = ""
    description: str = ""
    source: str = ""

    @cached_property
    def terms(self) -> tuple[Term, ...]:
        return tuple(terms_of(self.expression))

    @cached_property
    def monotone(self) -> bool:
        """Can match only where one of its terms fired (no `not`)."""
        return is_monotone(self.expression)


@dataclass(frozen=True)
class CircuitSet:
    circuits: tuple[Circuit, ...] = ()
    version: int = 0
    sources: tuple[str, ...] = field(default=())

    def by_name(self, name: str) -> Circuit | None:
        return next((c for c in self.circuits if c.name == name), None)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.circuits]


class _Where:
    """Tracks the file and the path inside it for error messages."""

    def __init__(self, file: str, path: str = "") -> None:
        self.file, self.path = file, path

    def __truediv__(self, part: str | int) -> _Where:
        step = f"[{part}]" if isinstance(part, int) else (f".{part}" if self.path else part)
        return _Where(self.file, self.path + step)

    def error(self, reason: str) -> ConfigError:
        return ConfigError(f"{self.file}: {self.path or '(top level)'}: {reason}")


def load_circuit_files(paths: list[Path], version: int = 0) -> CircuitSet:
    circuits: list[Circuit] = []
    seen: dict[str, str] = {}
    for path in paths:
        for circuit in parse_circuit_file(path):
            if circuit.name in seen:
                raise ConfigError(f"{path}: circuit {circuit.name!r} is already defined in {seen[circuit.name]}")
            seen[circuit.name] = str(path)
            circuits.append(circuit)
    return CircuitSet(tuple(circuits), version, tuple(str(p) for p in paths))


def parse_circuit_file(path: Path) -> list[Circuit]:
    document = safe_yaml(read_text(Path(path), ConfigError), str(path), ConfigError)
    return parse_circuits(document, str(path))


def parse_circuits(document: Any, source: str) -> list[Circuit]:
    where = _Where(source)
    if document is None:
        return []
    if not isinstance(document, dict) or set(document) != {"circuits"}:
        raise where.error("expected a mapping with one key, 'circuits'")
    items = document["circuits"]
    if not isinstance(items, list):
        raise (where / "circuits").error("expected a list of circuits")
    return [_circuit(item, where / "circuits" / i, source) for i, item in enumerate(items)]


def _circuit(item: Any, where: _Where, source: str) -> Circuit:
    if not isinstance(item, dict):
        raise where.error("expected a mapping")
    unknown = set(item) - _CIRCUIT_KEYS
    if unknown:
        raise where.error(f"unknown keys {sorted(unknown)} (allowed: {sorted(_CIRCUIT_KEYS)})")
    name = item.get("name")
    if not isinstance(name, str) or not name.strip():
        raise (where / "name").error("a non-empty string is required")
    if "when" not in item:
        raise (where / "when").error("missing: the circuit's expression")
    return Circuit(
        name=name,
        expression=_expression(item["when"], where / "when"),
        severity=_choice(item.get("severity", "medium"), SEVERITIES, where / "severity"),
        scope=_choice(item.get("scope", "both"), SCOPES, where / "scope"),
        window=_positive_int(item.get("window", 1), where / "window", MAX_WINDOW),
        min_tokens=_positive_int(item.get("min_tokens", 1), where / "min_tokens"),
        labels=_labels(item.get("labels", []), where / "labels"),
        action=_action(item.get("action", ""), where / "action"),
        description=str(item.get("description", "")),
        source=source,
    )


def _expression(node: Any, where: _Where) -> Expr:
    if not isinstance(node, dict) or not node:
        raise where.error("expected a feature term or one of all / any / not / at_least")
    if "feature" in node:
        return _term(node, where)
    if set(node) & (_TERM_KEYS - {"feature"}):
        raise where.error("expected a feature term or one of all / any / not / at_least: the term has no 'feature'")
    if len(node) != 1:
        raise where.error(f"expected exactly one operator, got {sorted(node)}")
    ((op, value),) = node.items()
    if op in ("all", "any"):
        if not isinstance(value, list) or not value:
            raise (where / op).error("expected a non-empty list")
        items = tuple(_expression(v, where / op / i) for i, v in enumerate(value))
        return All(items) if op == "all" else AnyOf(items)
    if op == "not":
        return Not(_expression(value, where / "not"))
    if op == "at_least":
        if not isinstance(value, dict) or set(value) != {"n", "of"}:
            raise (where / "at_least").error("expected {n: N, of: [...]}")
        of = value["of"]
        if not isinstance(of, list) or not of:
            raise (where / "at_least" / "of").error("expected a non-empty list")
        n = _positive_int(value["n"], where / "at_least" / "n")
        if n > len(of):
            raise (where / "at_least" / "n").error(f"n={n} is more than the {len(of)} items")
        return AtLeast(n, tuple(_expression(v, where / "at_least" / "of" / i) for i, v in enumerate(of)))
    raise where.error(f"unknown operator {op!r} (expected all, any, not, at_least or a feature term)")


def _term(node: dict[str, Any], where: _Where) -> Term:
    unknown = set(node) - _TERM_KEYS
    if unknown:
        raise where.error(f"unknown keys {sorted(unknown)} in a feature term (allowed: {sorted(_TERM_KEYS)})")
    if ("slot" in node) == ("layer" in node):
        raise where.error("a feature term needs exactly one of slot or layer")
    feature = node["feature"]
    if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature <= MAX_FEATURE:
        raise (where / "feature").error(f"expected a feature id (int from 0 to {MAX_FEATURE}), got {feature!r}")
    target = "slot" if "slot" in node else "layer"
    value = node[target]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise (where / target).error(f"expected an int >= 0, got {value!r}")
    minimum = node.get("min_activation", 0.0)
    if isinstance(minimum, bool) or not isinstance(minimum, int | float) or minimum < 0:
        raise (where / "min_activation").error(f"expected a number >= 0, got {minimum!r}")
    sae = node.get("sae")
    if sae is not None and (not isinstance(sae, str) or not sae):
        raise (where / "sae").error("expected an SAE name or weights-hash prefix")
    hook_point = node.get("hook_point")
    if hook_point is not None and hook_point not in HOOK_POINT_NAMES:
        raise (where / "hook_point").error(f"expected one of {', '.join(HOOK_POINT_NAMES)}, got {hook_point!r}")
    head = node.get("head")
    if head is not None and (hook_point != "attn_z" or isinstance(head, bool) or not isinstance(head, int) or head < 0):
        raise (where / "head").error(f"expected a head number >= 0 with hook_point attn_z, got {head!r}")
    return Term(
        feature=feature, min_activation=float(minimum), sae=sae, hook_point=hook_point, head=head, **{target: value}
    )


def _choice(value: Any, choices: dict[str, int], where: _Where) -> int:
    if not isinstance(value, str) or value.lower() not in choices:
        raise where.error(f"expected one of {', '.join(choices)}, got {value!r}")
    return choices[value.lower()]


def _positive_int(value: Any, where: _Where, maximum: int = 1 << 31) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise where.error(f"expected an integer from 1 to {maximum}, got {value!r}")
    return value


def _labels(value: Any, where: _Where) -> tuple[str, ...]:
    if isinstance(value, dict):
        return tuple(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        return tuple(str(v) for v in value)
    raise where.error("expected a list of strings or a mapping")


def _action(value: Any, where: _Where) -> str:
    value = "" if value in (None, "none", "record") else value
    if value not in ACTIONS:
        raise where.error(f"expected abort or none, got {value!r}")
    return value


def check_circuits(circuits: CircuitSet, registry, limits, unknown_terms: str) -> list[str]:
    """Circuits checked against the limits and the SAEs registered so far. A term that can never fire (its
    feature is beyond the d_sae of every SAE it names) is an error; a term naming no registered SAE is an error
    or a warning (`unknown_terms`: SAEs connect after start-up). Returns the warnings."""
    warnings = []
    for circuit in circuits.circuits:
        where = f"{circuit.source}: circuit {circuit.name!r}"
        if circuit.window > limits.max_circuit_window:
            raise ConfigError(f"{where}: window {circuit.window} is more than limits.max_circuit_window")
        for term in circuit.terms:
            gslots = registry.resolve(term)
            if not gslots:
                if not registry.live():  # nothing connected yet (start-up): nothing to check against
                    continue
                problem = f"{where}: {term.describe()}: no SAE registered for it yet"
                if unknown_terms == "error":
                    raise ConfigError(problem + " (unknown_circuit_terms: error)")
                warnings.append(problem)
                continue
            largest = max(registry.identities[g].d_sae for g in gslots)
            if term.feature >= largest:
                raise ConfigError(
                    f"{where}: {term.describe()}: can never fire: feature {term.feature} >= d_sae {largest} of every "
                    "SAE it names"
                )
    return warnings
