"""Admission: the one place that decides how a request is monitored, before it reaches the engine.

The API client is the monitored party, so nothing it sends is trusted as such. Every request passes vLLM's
`InputProcessor.assign_request_id` in the process that accepted it (API server or offline `LLM`); the plugin
decides there, once:

- whether the request is monitored: the operator's policy (`monitor`, `client_controls`) decides; a client's
  opt-out is honoured only where the policy allows it, and a refused attempt is noted in the report;
- which labels it carries: only where allowed, bounded, and namespaced `client:` so they never pass for a
  reviewer's label;
- which trace it joins: a valid W3C `traceparent` within bounds, and only where the policy allows it;
- which id the sidecar knows it by: derived from vLLM's own unique internal id (request_ids.py), never from a
  client-chosen field.

Every `circuitwatch_*` key the client put in `vllm_xargs` is removed and the decision is written in their
place as one internal record (`circuitwatch_admission`). Workers and the engine core read only that record.

HTTP requests are recognised by a context variable that the API-server side sets for each request (an ASGI
middleware, and the OpenAI handler wrappers): it carries the headers the policy reads (the operator gateway's
token, `traceparent`). Requests without it come from code running in the same process (offline `LLM`), which
is the operator's own.
"""

from __future__ import annotations

import contextvars
import hmac
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .config import PluginConfig
from .request_ids import choice_request_ids, request_key

log = logging.getLogger(__name__)

XARG_PREFIX = "circuitwatch_"
XARG_ADMISSION = "circuitwatch_admission"  # the internal record, written here and nowhere else
# What clients may ask for in vllm_xargs (honoured only where the policy allows it)
XARG_MONITOR = "circuitwatch_monitor"
XARG_LABELS = "circuitwatch_labels"
XARG_TRACEPARENT = "circuitwatch_traceparent"
XARG_TRACESTATE = "circuitwatch_tracestate"

CLIENT_LABEL_PREFIX = "client:"
MAX_NOTES = 16
MAX_NOTE_CHARS = 200
MAX_TRACESTATE_CHARS = 512  # W3C: vendors may drop tracestate longer than this
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_TRACESTATE_MEMBER = re.compile(
    r"^[a-z0-9][a-z0-9_\-*/@]{0,255}=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]$"
)


@dataclass
class ClientContext:
    """The HTTP request being served, as the API-server side saw it; `admitted` collects what admission
    decided for each engine request it spawned (a completion with several prompts spawns several)."""

    headers: Mapping[str, str]
    admitted: list[Admitted] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        value = self.headers.get(name.lower())
        return value if value is None or isinstance(value, str) else str(value)


CLIENT_CONTEXT: contextvars.ContextVar[ClientContext | None] = contextvars.ContextVar(
    "circuitwatch_client_context", default=None
)


@dataclass(frozen=True)
class Admission:
    """The decision for one request, carried to the engine core and workers in extra_args."""

    monitored: bool
    labels: tuple[str, ...] = ()
    traceparent: str = ""
    tracestate: str = ""
    notes: tuple[str, ...] = ()

    def to_xarg(self) -> dict[str, Any]:
        return {
            "monitored": self.monitored,
            "labels": list(self.labels),
            "traceparent": self.traceparent,
            "tracestate": self.tracestate,
            "notes": list(self.notes),
        }

    @classmethod
    def from_extra_args(cls, extra_args: Mapping[str, Any] | None, config: PluginConfig) -> Admission:
        """The record admission wrote; without one (admission did not run in the accepting process), the
        operator's default: monitored under `monitor: all`, nothing from the client."""
        record = (extra_args or {}).get(XARG_ADMISSION)
        if not isinstance(record, Mapping):
            return cls(monitored=config.monitor == "all")
        return cls(
            monitored=bool(record.get("monitored")),
            labels=tuple(str(v) for v in record.get("labels") or ()),
            traceparent=str(record.get("traceparent") or ""),
            tracestate=str(record.get("tracestate") or ""),
            notes=tuple(str(v) for v in record.get("notes") or ()),
        )


@dataclass(frozen=True)
class Admitted:
    """One engine request as admitted: vLLM's internal id, the decision, and its parallel-sampling n."""

    internal_id: str
    admission: Admission
    n: int = 1

    @property
    def key(self) -> str:
        return request_key(self.internal_id)

    def engine_ids(self) -> list[str]:
        """The internal ids an abort must name: the request, or each of its parallel-sampling children."""
        return choice_request_ids(self.internal_id, self.n)


class Inflight:
    """Monitored requests admitted in this process and not yet finished, by sidecar key: what a circuit's
    abort resolves to (exact internal ids, so a client reusing another request's id cannot redirect it).
    Bounded; the oldest entries go first (a request that never reports its end cannot grow it)."""

    def __init__(self, limit: int = 65_536) -> None:
        self.limit = limit
        self._by_key: OrderedDict[str, Admitted] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, admitted: Admitted) -> None:
        with self._lock:
            self._by_key[admitted.key] = admitted
            while len(self._by_key) > self.limit:
                self._by_key.popitem(last=False)

    def get(self, key: str) -> Admitted | None:
        with self._lock:
            return self._by_key.get(key)

    def discard(self, keys: list[str]) -> None:
        with self._lock:
            for key in keys:
                self._by_key.pop(key, None)


INFLIGHT = Inflight()


class ClientContextMiddleware:
    """ASGI middleware of the API server: every HTTP request runs with its ClientContext, so admission knows
    it serves a client (and which headers came with it), whatever endpoint the request reaches."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope.get("type") == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
            CLIENT_CONTEXT.set(ClientContext(headers))
        await self.app(scope, receive, send)


def admit(
    extra_args: Mapping[str, Any] | None, config: PluginConfig, client: ClientContext | None
) -> tuple[dict[str, Any], Admission]:
    """The request's extra_args with every client `circuitwatch_*` key replaced by the admission record."""
    cleaned = {k: v for k, v in (extra_args or {}).items() if not k.startswith(XARG_PREFIX)}
    asked = {k: v for k, v in (extra_args or {}).items() if k.startswith(XARG_PREFIX)}
    controls = config.client_controls
    notes: list[str] = []
    gateway = client is None or _gateway_ok(config, client)  # in-process callers are the operator's code
    unknown = sorted(set(asked) - {XARG_MONITOR, XARG_LABELS, XARG_TRACEPARENT, XARG_TRACESTATE})
    if unknown:
        notes.append(f"ignored unknown or internal vllm_xargs keys: {_quote_list(unknown)}")

    monitored = config.monitor == "all"
    if XARG_MONITOR in asked:
        wants = _truthy(asked[XARG_MONITOR])
        allowed = controls.opt_out if not wants else controls.opt_in
        if wants != monitored:
            if allowed and gateway:
                monitored = wants
            else:
                why = "client_controls.opt_out is false" if not wants else "client_controls.opt_in is false"
                if allowed and not gateway:
                    why = "the request did not carry the operator gateway's token"
                notes.append(f"refused the client's request to {'opt in' if wants else 'opt out'} ({why})")

    labels: tuple[str, ...] = ()
    if XARG_LABELS in asked:
        if controls.labels and gateway:
            labels, dropped = bound_labels(
                _label_list(asked[XARG_LABELS]), controls.max_labels, controls.max_label_chars
            )
            if dropped:
                notes.append(dropped)
        else:
            why = "client_controls.labels is false" if not controls.labels else "no operator gateway token"
            notes.append(f"dropped client labels ({why})")

    traceparent, tracestate = "", ""
    given_parent = (client.header("traceparent") if client else None) or asked.get(XARG_TRACEPARENT)
    given_state = (client.header("tracestate") if client else None) or asked.get(XARG_TRACESTATE)
    if given_parent:
        join = controls.trace_context == "always" or (controls.trace_context == "gateway" and gateway)
        if not join:
            notes.append(f"started a new trace (client_controls.trace_context is {controls.trace_context})")
        elif (parent := valid_traceparent(given_parent)) is None:
            notes.append("started a new trace (the client's traceparent is not valid W3C trace context)")
        else:
            traceparent = parent
            tracestate, problem = valid_tracestate(given_state)
            if problem:
                notes.append(problem)
    admission = Admission(
        monitored, labels, traceparent, tracestate, tuple(n[:MAX_NOTE_CHARS] for n in notes[:MAX_NOTES])
    )
    cleaned[XARG_ADMISSION] = admission.to_xarg()
    return cleaned, admission


def admit_request(request, config: PluginConfig) -> Admission | None:
    """Admission for one EngineCoreRequest, in place (called right after vLLM assigned its internal id).
    Never raises into vLLM: a failure falls back to the operator's default, without any client control."""
    params = getattr(request, "sampling_params", None)
    if params is None:  # pooling requests produce no tokens to monitor
        return None
    client = CLIENT_CONTEXT.get()
    try:
        params.extra_args, admission = admit(params.extra_args, config, client)
    except Exception:
        log.exception("circuitwatch: admission failed for %s; monitoring it by the default policy", request.request_id)
        extra = {k: v for k, v in (params.extra_args or {}).items() if not k.startswith(XARG_PREFIX)}
        admission = Admission(monitored=config.monitor == "all", notes=("admission failed: default policy applied",))
        extra[XARG_ADMISSION] = admission.to_xarg()
        params.extra_args = extra
    admitted = Admitted(request.request_id, admission, max(1, getattr(params, "n", 1) or 1))
    if client is not None:
        client.admitted.append(admitted)
    if admission.monitored:
        INFLIGHT.add(admitted)
    return admission


def _gateway_ok(config: PluginConfig, client: ClientContext) -> bool:
    """Controls are honoured for HTTP clients only with the gateway's token, when one is configured."""
    expected = config.client_controls.gateway_token()
    if expected is None:
        return True
    given = client.header(config.client_controls.gateway_header) or ""
    return hmac.compare_digest(given.encode(), expected.encode())


def bound_labels(labels: list[str], max_labels: int, max_chars: int) -> tuple[tuple[str, ...], str]:
    """Client labels, namespaced and bounded; the second value says what was cut (empty when nothing)."""
    kept: list[str] = []
    cut = too_long = 0
    for label in labels:
        text = "".join(ch for ch in label.strip() if ch.isprintable())
        if not text:
            continue
        if len(text) > max_chars:
            text, too_long = text[:max_chars], too_long + 1
        namespaced = CLIENT_LABEL_PREFIX + text
        if namespaced in kept:
            continue
        if len(kept) == max_labels:
            cut += 1
            continue
        kept.append(namespaced)
    problems = []
    if too_long:
        problems.append(f"{too_long} client labels truncated to {max_chars} characters")
    if cut:
        problems.append(f"{cut} client labels dropped past the limit of {max_labels}")
    return tuple(kept), "; ".join(problems)


def valid_traceparent(value: Any) -> str | None:
    """A W3C traceparent (version 00, or a later version read as 00 as the spec says), or None."""
    if not isinstance(value, str) or len(value) > 512:
        return None
    match = _TRACEPARENT.match(value.strip().lower())
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    return f"00-{trace_id}-{span_id}-{flags}"


def valid_tracestate(value: Any) -> tuple[str, str]:
    """(tracestate to keep, a note when some or all of it was dropped). Kept only when every list member is
    well-formed and the whole fits MAX_TRACESTATE_CHARS (W3C allows dropping it then)."""
    if not value:
        return "", ""
    if not isinstance(value, str) or len(value) > MAX_TRACESTATE_CHARS:
        return "", f"dropped the client's tracestate (longer than {MAX_TRACESTATE_CHARS} characters)"
    members = [m.strip() for m in value.split(",") if m.strip()]
    if len(members) > 32 or not all(_TRACESTATE_MEMBER.match(m) for m in members):
        return "", "dropped the client's tracestate (not valid W3C trace context)"
    return ",".join(members), ""


def _label_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [part for part in value.split(",")]
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    return [str(value)]


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _quote_list(names: list[str]) -> str:
    shown = ", ".join(repr(n[:40]) for n in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")
