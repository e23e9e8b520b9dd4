"""Read the `circuitwatch` object of an OpenAI response into typed fields, for client code.

    from openai import OpenAI
    from circuitwatch.response import read_monitoring

    response = client.chat.completions.create(...)
    monitoring = read_monitoring(response)          # None: this request was not monitored
    if monitoring and monitoring.flagged:
        ...  # monitoring.max_severity, monitoring.report.flags, monitoring.aborted_by

Works with the `openai` client's objects (the field is in `model_extra`), with a parsed JSON body (a dict), and
with a stream: pass the chunks (objects or dicts) and it reads the one that carries the object. Imports nothing
beyond the standard library, so client code pays nothing for it.

Status `pending` means the report was not final within the server's deadline: `monitoring.pending` is true and
`request_id` is what to ask the sidecar for later (`GetReport`). Fields this version does not know are kept in
`extra`, so a newer server does not break an older client.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

FIELD = "circuitwatch"
SEVERITIES = ("none", "info", "low", "medium", "high", "critical")  # in increasing order


class MonitoringFieldError(ValueError):
    """The `circuitwatch` object is not what this version understands; the message names the field."""


@dataclass(frozen=True)
class Flag:
    circuit: str
    severity: str
    matching_tokens: int
    positions: tuple[int, ...]  # the first few matching token positions
    labels: tuple[str, ...]
    action: str  # "none" or "abort"


@dataclass(frozen=True)
class Coverage:
    positions_total: int
    positions_seen: int
    gaps: int


@dataclass(frozen=True)
class Fidelity:
    sae: str
    tokens: int
    error_mean: float
    error_max: float
    fraction_above_threshold: float
    error_threshold: float
    low_fidelity: bool


@dataclass(frozen=True)
class Report:
    """One engine request's report (a choice's, for n > 1)."""

    request_id: str
    status: str  # complete | partial | low_fidelity | pending | ...
    max_severity: str = "none"
    flags: tuple[Flag, ...] = ()
    coverage: Coverage | None = None  # None while pending
    fidelity: tuple[Fidelity, ...] = ()
    notes: tuple[str, ...] = ()
    reason: str | None = None  # why it is pending
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def pending(self) -> bool:
        return self.status == "pending"

    @property
    def flagged(self) -> bool:
        return bool(self.flags)


@dataclass(frozen=True)
class Monitoring:
    """The response's monitoring: one report per choice, and the circuit that aborted it, if one did."""

    reports: tuple[Report, ...]
    aborted_by: str | None = None

    @property
    def report(self) -> Report:
        """The first choice's report (the only one unless n > 1)."""
        return self.reports[0]

    @property
    def flagged(self) -> bool:
        return any(r.flagged for r in self.reports)

    @property
    def pending(self) -> bool:
        return any(r.pending for r in self.reports)

    @property
    def max_severity(self) -> str:
        known = [r.max_severity for r in self.reports if r.max_severity in SEVERITIES]
        return max(known, key=SEVERITIES.index, default="none")


def read_monitoring(response: Any) -> Monitoring | None:
    """The response's monitoring, or None when it carries no `circuitwatch` object (not monitored, or the
    server's `responses: false`). `response`: an `openai` response or chunk, a dict, or an iterable of chunks."""
    raw = _find_field(response)
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise MonitoringFieldError(f"{FIELD}: expected an object, got {type(raw).__name__}")
    if raw.get("status") == "per_choice":
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            raise MonitoringFieldError(f"{FIELD}.choices: expected a non-empty list for status per_choice")
        reports = tuple(_report(c, f"{FIELD}.choices[{i}]") for i, c in enumerate(choices))
    else:
        reports = (_report(raw, FIELD),)
    aborted_by = raw.get("aborted_by")
    return Monitoring(reports, _typed(aborted_by, str, f"{FIELD}.aborted_by") if aborted_by is not None else None)


def _find_field(response: Any) -> Any:
    if isinstance(response, Mapping):
        return response.get(FIELD)
    extra = getattr(response, "model_extra", None)  # an openai (pydantic) object
    if extra is not None or hasattr(response, "choices"):
        return (extra or {}).get(FIELD)
    if isinstance(response, Iterable) and not isinstance(response, (str, bytes)):
        for chunk in response:  # a stream: the object is on its last chunk (the usage chunk, when asked for)
            found = _find_field(chunk)
            if found is not None:
                return found
        return None
    raise MonitoringFieldError(f"cannot read a {FIELD} object from a {type(response).__name__}")


_REPORT_KEYS = {"request_id", "status", "max_severity", "flags", "coverage", "fidelity", "notes", "reason"}


def _report(raw: Any, where: str) -> Report:
    if not isinstance(raw, Mapping):
        raise MonitoringFieldError(f"{where}: expected an object")
    coverage = raw.get("coverage")
    return Report(
        request_id=_typed(raw.get("request_id"), str, f"{where}.request_id"),
        status=_typed(raw.get("status"), str, f"{where}.status"),
        max_severity=_typed(raw.get("max_severity", "none"), str, f"{where}.max_severity"),
        flags=tuple(_flag(f, f"{where}.flags[{i}]") for i, f in enumerate(_list(raw, "flags", where))),
        coverage=_coverage(coverage, f"{where}.coverage") if coverage is not None else None,
        fidelity=tuple(_fidelity(f, f"{where}.fidelity[{i}]") for i, f in enumerate(_list(raw, "fidelity", where))),
        notes=tuple(_typed(n, str, f"{where}.notes") for n in _list(raw, "notes", where)),
        reason=raw.get("reason"),
        extra={k: v for k, v in raw.items() if k not in _REPORT_KEYS and k != "aborted_by"},
    )


def _flag(raw: Any, where: str) -> Flag:
    raw = _mapping(raw, where)
    return Flag(
        circuit=_typed(raw.get("circuit"), str, f"{where}.circuit"),
        severity=_typed(raw.get("severity"), str, f"{where}.severity"),
        matching_tokens=_typed(raw.get("matching_tokens", 0), int, f"{where}.matching_tokens"),
        positions=tuple(_typed(p, int, f"{where}.positions") for p in _list(raw, "positions", where)),
        labels=tuple(_typed(label, str, f"{where}.labels") for label in _list(raw, "labels", where)),
        action=_typed(raw.get("action", "none"), str, f"{where}.action"),
    )


def _coverage(raw: Any, where: str) -> Coverage:
    raw = _mapping(raw, where)
    return Coverage(
        *(_typed(raw.get(name, 0), int, f"{where}.{name}") for name in ("positions_total", "positions_seen", "gaps"))
    )


def _fidelity(raw: Any, where: str) -> Fidelity:
    raw = _mapping(raw, where)
    numbers = ("error_mean", "error_max", "fraction_above_threshold", "error_threshold")
    return Fidelity(
        sae=str(raw.get("sae", "")),
        tokens=_typed(raw.get("tokens", 0), int, f"{where}.tokens"),
        **{name: float(_typed(raw.get(name, 0.0), (int, float), f"{where}.{name}")) for name in numbers},
        low_fidelity=_typed(raw.get("low_fidelity", False), bool, f"{where}.low_fidelity"),
    )


def _mapping(raw: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise MonitoringFieldError(f"{where}: expected an object, got {type(raw).__name__}")
    return raw


def _list(raw: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = raw.get(key, [])
    if not isinstance(value, list):
        raise MonitoringFieldError(f"{where}.{key}: expected a list, got {type(value).__name__}")
    return value


def _typed(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MonitoringFieldError(f"{where}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
    return value
