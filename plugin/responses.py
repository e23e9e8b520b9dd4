"""The `circuitwatch` object in OpenAI responses: the request's report, fetched from the sidecar at finish.

Waits at most the configured deadline (default 50 ms), then answers `pending` with the request id to fetch the
report later (GetReport); a down sidecar gives `pending` too. Never an error, never a longer wait. Streaming
responses carry it on the usage chunk when the client asked for usage, else in one extra SSE chunk just before
`data: [DONE]`. A request a circuit aborted finishes with `content_filter` (OpenAI's reason for filtered output)
and `circuitwatch.aborted_by` names the circuit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator

import grpc

from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto import circuitwatch_pb2_grpc as pb_grpc
from circuitwatch.proto.client import Backoff, bearer_metadata, open_channel, read_token
from circuitwatch.proto.names import severity_name, status_name

from .admission import INFLIGHT, Admitted, ClientContext
from .config import PluginConfig
from .process import PROCESS
from .request_ids import bounded, choice_request_ids, client_request_id, parent_request_id

log = logging.getLogger(__name__)
EVIDENCE_POSITIONS = 8
ABORTED_KEPT = 10_000  # aborted keys whose response has not picked up the reason yet


def summarize(report: pb.Report) -> dict:
    coverage = report.coverage
    return {
        "request_id": report.request_id,
        "status": status_name(report.status),
        "max_severity": severity_name(report.max_severity) if report.flags else "none",
        "flags": [
            {
                "circuit": flag.circuit,
                "severity": severity_name(flag.severity),
                "matching_tokens": flag.matching_tokens,
                "positions": [e.position for e in flag.evidence][:EVIDENCE_POSITIONS],
                "labels": list(flag.labels),
                "action": flag.action or "none",
            }
            for flag in report.flags
        ],
        "coverage": {
            "positions_total": coverage.positions_total,
            "positions_seen": coverage.positions_seen,
            "gaps": len(coverage.gaps),
        },
        **({"fidelity": _fidelity(report)} if report.fidelity else {}),
        **({"notes": list(report.notes)} if report.notes else {}),
    }


def _fidelity(report: pb.Report) -> list[dict]:
    """Per slot, how well its SAE read the request (the status is low_fidelity when one read it badly)."""
    names = {s.slot: s.name for s in report.saes}
    return [
        {
            "sae": names.get(f.slot, str(f.slot)),
            "tokens": f.tokens,
            "error_mean": round(f.error_mean, 4),
            "error_max": round(f.error_max, 4),
            "fraction_above_threshold": round(f.fraction_above_threshold, 4),
            "error_threshold": round(f.error_threshold, 4),
            "low_fidelity": f.low_fidelity,
        }
        for f in report.fidelity
    ]


def pending(request_id: str, reason: str) -> dict:
    return {"request_id": request_id, "status": "pending", "reason": reason, "flags": []}


class ReportFetcher:
    """Per API-server process; its async channel is created on the server's event loop at first use."""

    def __init__(self, config: PluginConfig) -> None:
        self.config = config
        self._stub: pb_grpc.MonitorStub | None = None

    def _client(self) -> pb_grpc.MonitorStub:
        if self._stub is None:
            target = self.config.sidecar
            self._stub = pb_grpc.MonitorStub(open_channel(target.address, target.tls_ca_file, aio=True))
        return self._stub

    def _metadata(self):
        return bearer_metadata(read_token(self.config.sidecar.read_token))

    async def _one(self, request_id: str, deadline_s: float) -> dict:
        try:
            request = pb.GetReportRequest(request_id=request_id, wait_ms=int(deadline_s * 1000))
            report = await self._client().GetReport(request, timeout=deadline_s, metadata=self._metadata())
        except grpc.aio.AioRpcError as exc:
            reason = (
                "not yet known to the sidecar" if exc.code() == grpc.StatusCode.NOT_FOUND else "sidecar unavailable"
            )
            return pending(request_id, reason)
        return summarize(report) if report.status != pb.REPORT_STATUS_PENDING else pending(request_id, "not final yet")

    async def summaries(self, request_ids: list[str]) -> list[dict]:
        """One summary per id, all within one deadline."""
        deadline_s = self.config.response_deadline_ms / 1000
        try:
            return await asyncio.wait_for(
                asyncio.gather(*(self._one(i, deadline_s) for i in request_ids)), timeout=deadline_s
            )
        except TimeoutError:
            return [pending(i, "not final within the deadline") for i in request_ids]
        except Exception:  # the response must never fail because of monitoring
            log.exception("circuitwatch: fetching reports failed")
            return [pending(i, "error fetching the report") for i in request_ids]


def attach(summaries: list[dict], aborted_by: str | None = None) -> dict:
    """The `circuitwatch` field: one request's summary, or per-choice summaries for n > 1; `aborted_by`
    names the circuit whose action stopped the request."""
    field = summaries[0] if len(summaries) == 1 else {"status": "per_choice", "choices": summaries}
    if aborted_by:
        field["aborted_by"] = aborted_by
    return field


def first_prompt(client: ClientContext | None, response_id: str | None) -> Admitted | None:
    """The admitted engine request a response reports on: its first prompt (a completion request may carry
    several; the others are in the sidecar under their own ids). No response id yet: the first admitted."""
    admitted = client.admitted if client is not None else []
    wanted = bounded(response_id) if response_id is not None else None
    chosen = next((a for a in admitted if client_request_id(a.internal_id) == wanted), None)
    return chosen or (admitted[0] if admitted else None)


async def report_field(
    fetcher: ReportFetcher, actions: ActionListener, client: ClientContext | None, response_id: str, n: int
) -> dict | None:
    """The `circuitwatch` object for a finished response; None when the request was not monitored."""
    admitted = first_prompt(client, response_id)
    if admitted is not None and not admitted.admission.monitored:
        return None
    key = admitted.key if admitted is not None else response_id  # not admitted here: the sidecar resolves it
    summaries = await fetcher.summaries(choice_request_ids(key, n))
    return attach(summaries, actions.aborted.pop(key, None))


# A filtered response ends the way OpenAI ends one: clients already handle this finish reason.
CONTENT_FILTER = "content_filter"
_FINISH_REASON = '"finish_reason":"'  # vLLM writes compact JSON; a null reason is `"finish_reason":null`


def filtered_reason(finish_reason: str | None, aborted_by: str | None) -> str | None:
    """vLLM's `abort` becomes `content_filter` when a circuit's action stopped the request; any other abort (a
    client that went away) stays `abort`."""
    return CONTENT_FILTER if aborted_by and finish_reason == "abort" else finish_reason


def _finish_choice(index: int, chunk_object: str) -> dict:
    """A choice that only carries its finish reason, in the shape of the response's other chunks."""
    if chunk_object == "chat.completion.chunk":
        return {"index": index, "delta": {}, "logprobs": None, "finish_reason": CONTENT_FILTER}
    return {"index": index, "text": "", "logprobs": None, "finish_reason": CONTENT_FILTER}


def _is_usage_chunk(body: dict) -> bool:
    """The `stream_options.include_usage` chunk: OpenAI promises it is the last one before `[DONE]`."""
    return body.get("choices") == [] and body.get("usage") is not None


def _body(chunk: str) -> dict:
    """A `data: {...}` chunk's JSON; a chunk that is not valid JSON reads as empty and passes through as sent."""
    try:
        body = json.loads(chunk[len("data: ") :])
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _data(body: dict) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


async def with_final_chunk(
    stream: AsyncIterator[str],
    fetcher: ReportFetcher,
    n: int,
    chunk_object: str,
    client: ClientContext | None,
    actions: ActionListener,
    enabled: bool = True,
    model: str | None = None,
) -> AsyncIterator[str]:
    """Pass a response's SSE chunks through, and end the stream the way clients expect:

    - a choice stopped by a circuit's abort finishes with `content_filter`, in its own chunk when vLLM sent it no
      finish reason (an abort before the first token leaves vLLM with nothing to send);
    - the `circuitwatch` object rides on the usage chunk when the client asked for usage (that chunk must stay
      last), else on one extra chunk with no choices just before `data: [DONE]`.

    Only chunks that carry a finish reason or usage are parsed; token chunks pass through untouched and unheld.
    """
    response_id = None
    created = int(time.time())
    finished: set[int] = set()
    usage: dict | None = None  # held back until [DONE], so the object can join it
    try:
        async for chunk in stream:
            if chunk.strip() == "data: [DONE]":
                admitted = first_prompt(client, response_id)
                if response_id is None and admitted is not None:  # no chunk at all: name it as vLLM would have
                    response_id = client_request_id(admitted.internal_id)
                aborted_by = actions.aborted_by(admitted)
                unfinished = [i for i in range(n) if i not in finished]
                if aborted_by and unfinished and response_id is not None:
                    choices = [_finish_choice(i, chunk_object) for i in unfinished]
                    yield _data(_chunk(response_id, chunk_object, created, model, choices))
                field = None
                if enabled and response_id is not None:
                    field = await report_field(fetcher, actions, client, response_id, n)
                else:
                    actions.forget(admitted)
                if usage is not None:
                    yield _data(usage | ({"circuitwatch": field} if field is not None else {}))
                elif field is not None:
                    yield _data(_chunk(response_id, chunk_object, created, model, []) | {"circuitwatch": field})
                yield chunk
                continue
            if not chunk.startswith("data: {"):
                yield chunk
                continue
            if response_id is None:
                first = _body(chunk)
                response_id, model, created = first.get("id"), first.get("model", model), first.get("created", created)
            if _FINISH_REASON in chunk:
                chunk = _note_finish(chunk, finished, actions, first_prompt(client, response_id))
            elif '"usage"' in chunk:
                body = _body(chunk)
                if _is_usage_chunk(body):
                    usage = body
                    continue
            yield chunk
    finally:
        if client is not None:
            INFLIGHT.discard([a.key for a in client.admitted])


def _chunk(response_id: str, chunk_object: str, created: int, model: str | None, choices: list[dict]) -> dict:
    return {"id": response_id, "object": chunk_object, "created": created, "model": model, "choices": choices}


def _note_finish(chunk: str, finished: set[int], actions: ActionListener, admitted: Admitted | None) -> str:
    """Record which choices got their finish reason; an abort by a circuit is rewritten to `content_filter`."""
    body = _body(chunk)
    aborted_by = actions.aborted_by(admitted)
    rewritten = False
    for choice in body.get("choices") or []:
        reason = choice.get("finish_reason")
        if reason is not None:
            finished.add(choice.get("index", 0))
            if filtered_reason(reason, aborted_by) != reason:
                choice["finish_reason"] = CONTENT_FILTER
                rewritten = True
    return _data(body) if rewritten else chunk


class ActionListener:
    """API-server side of circuit actions: follows the sidecar's WatchActions stream and aborts the request a
    notice names (by its unique key, resolved to vLLM's exact internal ids at admission) through vLLM's normal
    abort path. One per process, started at the first monitored request, on the server's event loop; it
    reconnects with back-off while the sidecar is away."""

    def __init__(self, fetcher: ReportFetcher) -> None:
        self.fetcher = fetcher
        self.aborted: OrderedDict[str, str] = OrderedDict()  # key -> circuit that asked for it
        self._task: asyncio.Task | None = None

    def aborted_by(self, admitted: Admitted | None) -> str | None:
        """The circuit whose action aborted this request, if one did."""
        return self.aborted.get(admitted.key) if admitted is not None else None

    def forget(self, admitted: Admitted | None) -> None:
        """The response is out without the object (responses: false): the reason is not needed any more."""
        if admitted is not None:
            self.aborted.pop(admitted.key, None)

    def ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self) -> None:
        target = self.fetcher.config.sidecar
        backoff = Backoff(target.reconnect_min_s, target.reconnect_max_s)
        while True:
            try:
                stream = self.fetcher._client().WatchActions(
                    pb.WatchActionsRequest(), metadata=self.fetcher._metadata()
                )
                async for notice in stream:
                    backoff.reset()
                    await self._act(notice)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the sidecar is away: try again later, never disturb serving
                log.debug("circuitwatch: action stream interrupted (%s)", exc)
            await asyncio.sleep(backoff.next())

    async def _act(self, notice: pb.ActionNotice) -> None:
        if notice.action != "abort":
            return
        key = parent_request_id(notice.request_id)  # a parallel-sampling child stops its whole request
        admitted = INFLIGHT.get(key) or INFLIGHT.get(notice.request_id)
        engine_client = PROCESS.engine_client
        if admitted is None or engine_client is None:
            return
        self.aborted[admitted.key] = notice.circuit
        while len(self.aborted) > ABORTED_KEPT:
            self.aborted.popitem(last=False)
        log.warning("circuitwatch: aborting %s: circuit %s matched", admitted.key, notice.circuit)
        try:
            await engine_client.abort(admitted.engine_ids(), internal=True)
        except Exception:
            log.exception("circuitwatch: could not abort %s", admitted.key)
