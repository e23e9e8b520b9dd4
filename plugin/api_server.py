"""The plugin in vLLM's API-server process: around the OpenAI completion and chat handlers.

- Each request runs with its client context (headers), which admission (admission.py) reads: set by the
  plugin's ASGI middleware for every endpoint, and here too in case the middleware is missing.
- The final report goes into the response (`circuitwatch`; the last SSE chunk when streaming), fetched by the
  request's unique key from admission, never by the client-chosen response id alone. A request a circuit
  aborted finishes with `content_filter`, with `circuitwatch.aborted_by` saying which circuit.
- The action listener, which aborts requests whose circuits ask for it, runs from the first monitored request.
"""

from __future__ import annotations

import functools

from .admission import CLIENT_CONTEXT, INFLIGHT, ClientContext
from .config import PluginConfig, load_plugin_config
from .process import PROCESS
from .request_ids import CHAT, COMPLETION

CHUNK_OBJECTS = {COMPLETION: "text_completion", CHAT: "chat.completion.chunk"}


def services(config: PluginConfig):
    """This process's report fetcher and action listener, (re)made when the configuration changes; call it on
    the server's event loop."""
    from .responses import ActionListener, ReportFetcher

    if PROCESS.report_fetcher is None or PROCESS.report_fetcher.config != config:
        PROCESS.report_fetcher = ReportFetcher(config)
        PROCESS.action_listener = ActionListener(PROCESS.report_fetcher)
    PROCESS.action_listener.ensure_running()
    return PROCESS.report_fetcher, PROCESS.action_listener


def _client_context(raw_request) -> ClientContext:
    """The request's context as the middleware set it, or made here from the raw request's headers; it stays
    set for the rest of this request's task, streaming included."""
    client = CLIENT_CONTEXT.get()
    if client is None:
        headers = getattr(raw_request, "headers", None)
        client = ClientContext({k.lower(): v for k, v in headers.items()} if headers is not None else {})
        CLIENT_CONTEXT.set(client)
    return client


def monitored_handler(handler, kind: str):
    """Wrap an OpenAI handler (`kind` is COMPLETION or CHAT)."""
    chunk_object = CHUNK_OBJECTS[kind]

    @functools.wraps(handler)
    async def wrapper(self, request, raw_request=None, *args, **kwargs):
        vllm_config = getattr(self.engine_client, "vllm_config", None)
        config = load_plugin_config(getattr(vllm_config, "additional_config", None))
        if config is None:
            return await handler(self, request, raw_request, *args, **kwargs)
        from .responses import filtered_reason, first_prompt, report_field, with_final_chunk

        client = _client_context(raw_request)
        fetcher, actions = services(config)
        PROCESS.engine_client = self.engine_client
        try:
            result = await handler(self, request, raw_request, *args, **kwargs)
        except BaseException:
            INFLIGHT.discard([a.key for a in client.admitted])
            raise
        n = getattr(request, "n", 1) or 1
        if hasattr(result, "__aiter__"):
            return with_final_chunk(
                result, fetcher, n, chunk_object, client, actions, config.responses, getattr(request, "model", None)
            )
        try:
            result_id = getattr(result, "id", None)
            if result_id is None or not hasattr(result, "choices"):  # an error response
                return result
            admitted = first_prompt(client, result_id)
            aborted_by = actions.aborted_by(admitted)
            for choice in result.choices:
                choice.finish_reason = filtered_reason(choice.finish_reason, aborted_by)
            if not config.responses:
                actions.forget(admitted)
                return result
            field = await report_field(fetcher, actions, client, result_id, n)
            if field is not None:
                result.circuitwatch = field
            return result
        finally:
            INFLIGHT.discard([a.key for a in client.admitted])

    return wrapper
