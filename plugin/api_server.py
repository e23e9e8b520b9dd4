"""The plugin in vLLM's API-server process: around the OpenAI completion and chat handlers.

- The client's W3C `traceparent` / `tracestate` headers are copied into `vllm_xargs`, so the trace context
  reaches the workers (and the sidecar) whether or not vLLM's own --otlp-traces-endpoint is set.
- The final report goes into the response (`circuitwatch`; the last SSE chunk when streaming).
- Circuit actions (abort) reach the request while it runs: the request is registered with the action
  listener for as long as it is in flight.
"""

from __future__ import annotations

import functools

from .config import XARG_TRACEPARENT, XARG_TRACESTATE, PluginConfig, load_plugin_config, wants_monitoring
from .process import PROCESS
from .request_ids import CHAT, COMPLETION, choice_request_ids, engine_request_ids, response_id

CHUNK_OBJECTS = {COMPLETION: "text_completion", CHAT: "chat.completion.chunk"}


def _carry_trace_context(request, headers) -> None:
    if headers is not None and headers.get("traceparent"):
        xargs = dict(request.vllm_xargs or {})
        xargs.setdefault(XARG_TRACEPARENT, headers["traceparent"])
        if headers.get("tracestate"):
            xargs.setdefault(XARG_TRACESTATE, headers["tracestate"])
        request.vllm_xargs = xargs


def _services(config: PluginConfig):
    """This process's report fetcher and action listener, (re)made when the configuration changes."""
    from .responses import ActionListener, ReportFetcher

    if PROCESS.report_fetcher is None or PROCESS.report_fetcher.config != config:
        PROCESS.report_fetcher = ReportFetcher(config)
        PROCESS.action_listener = ActionListener(PROCESS.report_fetcher)
    PROCESS.action_listener.ensure_running()
    return PROCESS.report_fetcher, PROCESS.action_listener


def monitored_handler(handler, kind: str):
    """Wrap an OpenAI handler (`kind` is COMPLETION or CHAT)."""
    chunk_object = CHUNK_OBJECTS[kind]

    @functools.wraps(handler)
    async def wrapper(self, request, raw_request=None, *args, **kwargs):
        headers = getattr(raw_request, "headers", None)
        _carry_trace_context(request, headers)
        vllm_config = getattr(self.engine_client, "vllm_config", None)
        config = load_plugin_config(getattr(vllm_config, "additional_config", None))
        if config is None or not wants_monitoring(request.vllm_xargs, config):
            return await handler(self, request, raw_request, *args, **kwargs)
        from .responses import attach, with_final_chunk

        fetcher, actions = _services(config)
        # the response id as vLLM's OpenAI layer builds it, from X-Request-Id or the body request_id
        client_id = (headers.get("X-Request-Id") if headers is not None else None) or getattr(
            request, "request_id", None
        )
        sidecar_id = response_id(kind, client_id) if client_id else None
        if sidecar_id is not None:
            actions.inflight[sidecar_id] = (self.engine_client, engine_request_ids(kind, sidecar_id))
        try:
            result = await handler(self, request, raw_request, *args, **kwargs)
        except BaseException:
            actions.inflight.pop(sidecar_id, None)
            raise
        n = getattr(request, "n", 1) or 1
        if hasattr(result, "__aiter__"):
            return with_final_chunk(result, fetcher, n, chunk_object, actions, enabled=config.responses)
        actions.inflight.pop(sidecar_id, None)
        result_id = getattr(result, "id", None)
        if not config.responses or result_id is None or not hasattr(result, "choices"):  # an error response
            return result
        summaries = await fetcher.summaries(choice_request_ids(result_id, n))
        result.circuitwatch = attach(summaries, actions.aborted.pop(result_id, None))
        return result

    return wrapper
