"""The seams into vLLM, applied once per process by the entry point (API server, engine core, workers).

- Worker.load_model: after the model loads (before the profile run, compile and graph capture), start the
  WorkerMonitor, which installs taps. Shared by GPU and CPU workers and both model runners.
- Worker.execute_model: open a tap step around the forward, then map rows, encode and emit.
- V2 runner prepare_inputs: keep the step's InputBatch (it is otherwise a local of execute_model).
- Request.get_skip_reading_prefix_cache (engine core): monitored requests bypass prefix-cache reads.
- VllmConfig.compute_hash: mix in the plugin configuration, so compiled artifacts traced without the
  taps (or with other taps) are never reused from vLLM's on-disk compile cache.
- OpenAI completion and chat handlers (API-server process): copy the client's W3C `traceparent` /
  `tracestate` headers into `vllm_xargs`, so the trace context reaches the workers (and the sidecar) whether
  or not vLLM's own --otlp-traces-endpoint is set.
An unconfigured plugin leaves every call to the original.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os

from .config import ENV_VAR, XARG_TRACEPARENT, XARG_TRACESTATE, PluginConfig, load_plugin_config, wants_monitoring

log = logging.getLogger("circuitwatch.plugin")

_applied = False
_engine_additional_config: dict | None = None
_engine_model = ""


def _process_config(additional_config: dict | None = None) -> PluginConfig | None:
    return load_plugin_config(additional_config if additional_config is not None else _engine_additional_config)


def apply() -> None:
    global _applied
    if _applied:
        return
    _applied = True
    if os.environ.get(ENV_VAR):
        load_plugin_config()  # a bad file fails start-up here, in the first process, with its reason
    _patch_worker()
    _patch_v2_runner()
    _patch_engine_core()
    _patch_config_hash()
    _patch_api_server()


def _patch_worker() -> None:
    from vllm.v1.worker.gpu_worker import Worker

    original_load, original_execute = Worker.load_model, Worker.execute_model

    @functools.wraps(original_load)
    def load_model(self, *args, **kwargs):
        result = original_load(self, *args, **kwargs)
        config = load_plugin_config(self.vllm_config.additional_config)
        if config is not None and _is_encoding_rank():
            from .worker import WorkerMonitor

            runner = self.model_runner
            self._circuitwatch = WorkerMonitor(config, self.vllm_config, runner.get_model(), runner.device)
            runner._circuitwatch_monitor = self._circuitwatch
        return result

    @functools.wraps(original_execute)
    def execute_model(self, scheduler_output, *args, **kwargs):
        monitor = getattr(self, "_circuitwatch", None)
        if monitor is None:
            return original_execute(self, scheduler_output, *args, **kwargs)
        monitor.before_step(self.model_runner, scheduler_output)
        try:
            return original_execute(self, scheduler_output, *args, **kwargs)
        finally:
            monitor.after_step(self.model_runner, scheduler_output)

    Worker.load_model = load_model
    Worker.execute_model = execute_model


def _patch_v2_runner() -> None:
    try:
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2Runner
    except Exception:  # not in every vLLM build
        return
    original = V2Runner.prepare_inputs

    @functools.wraps(original)
    def prepare_inputs(self, *args, **kwargs):
        batch = original(self, *args, **kwargs)
        monitor = getattr(self, "_circuitwatch_monitor", None)
        if monitor is not None:
            monitor.v2_batch = batch
        return batch

    V2Runner.prepare_inputs = prepare_inputs


def _patch_engine_core() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.request import Request

    original_init = EngineCore.__init__
    original_skip = Request.get_skip_reading_prefix_cache
    original_free = Scheduler._free_request

    @functools.wraps(original_init)
    def init(self, vllm_config, *args, **kwargs):
        global _engine_additional_config, _engine_model
        _engine_additional_config = vllm_config.additional_config
        model_config = vllm_config.model_config
        _engine_model = str(model_config.served_model_name or model_config.model)
        return original_init(self, vllm_config, *args, **kwargs)

    @functools.wraps(original_free)
    def free_request(self, request, *args, **kwargs):
        config = _process_config()
        if config is not None:
            try:
                from .engine import notifier

                notifier(config, _engine_model).request_freed(request)
            except Exception:  # never break the scheduler
                log.exception("circuitwatch: could not send the finish marker of %s", request.request_id)
        return original_free(self, request, *args, **kwargs)

    @functools.wraps(original_skip)
    def get_skip_reading_prefix_cache(self) -> bool:
        config = _process_config()
        params = self.sampling_params
        bypass = config is not None and config.prefix_cache == "bypass" and params is not None
        if bypass and wants_monitoring(params.extra_args, config):
            return True
        return original_skip(self)

    EngineCore.__init__ = init
    Request.get_skip_reading_prefix_cache = get_skip_reading_prefix_cache
    Scheduler._free_request = free_request


def _patch_config_hash() -> None:
    from vllm.config import VllmConfig

    original = VllmConfig.compute_hash

    @functools.wraps(original)
    def compute_hash(self, *args, **kwargs) -> str:
        base = original(self, *args, **kwargs)
        config = load_plugin_config(self.additional_config)
        if config is None:
            return base
        return hashlib.sha256(f"{base}|circuitwatch:{config.digest()}".encode()).hexdigest()[:10]

    VllmConfig.compute_hash = compute_hash


def _patch_api_server() -> None:
    try:
        from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
        from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
    except Exception:  # a vLLM build without the OpenAI server
        return
    handlers = (
        (OpenAIServingCompletion, "create_completion", "text_completion"),
        (OpenAIServingChat, "create_chat_completion", "chat.completion.chunk"),
    )
    for cls, name, chunk_object in handlers:
        setattr(cls, name, _monitored_handler(getattr(cls, name), chunk_object))


_fetcher = None
_actions = None


def _monitored_handler(handler, chunk_object: str):
    """Stamp the client's trace context into vllm_xargs; put the report in the response; let circuit
    actions (abort) reach the request while it runs."""

    @functools.wraps(handler)
    async def wrapper(self, request, raw_request=None, *args, **kwargs):
        global _fetcher, _actions
        headers = getattr(raw_request, "headers", None)
        if headers is not None and headers.get("traceparent"):
            xargs = dict(request.vllm_xargs or {})
            xargs.setdefault(XARG_TRACEPARENT, headers["traceparent"])
            if headers.get("tracestate"):
                xargs.setdefault(XARG_TRACESTATE, headers["tracestate"])
            request.vllm_xargs = xargs
        vllm_config = getattr(self.engine_client, "vllm_config", None)
        config = load_plugin_config(getattr(vllm_config, "additional_config", None))
        if config is None or not wants_monitoring(request.vllm_xargs, config):
            return await handler(self, request, raw_request, *args, **kwargs)
        from .responses import ActionListener, ReportFetcher, attach, with_final_chunk

        if _fetcher is None or _fetcher.config != config:
            _fetcher = ReportFetcher(config)
            _actions = ActionListener(_fetcher)
        _actions.ensure_running()
        # ids as vLLM's OpenAI layer builds them: response id from X-Request-Id or the body request_id;
        # completions name prompt 0 "<response id>-0" inside the engine
        base = (headers.get("X-Request-Id") if headers is not None else None) or getattr(request, "request_id", None)
        sidecar_id = f"{'cmpl' if chunk_object == 'text_completion' else 'chatcmpl'}-{base}" if base else None
        if sidecar_id is not None:
            vllm_ids = [f"{sidecar_id}-0"] if chunk_object == "text_completion" else [sidecar_id]
            _actions.inflight[sidecar_id] = (self.engine_client, vllm_ids)
        try:
            result = await handler(self, request, raw_request, *args, **kwargs)
        except BaseException:
            _actions.inflight.pop(sidecar_id, None)
            raise
        n = getattr(request, "n", 1) or 1
        if hasattr(result, "__aiter__"):
            return with_final_chunk(result, _fetcher, n, chunk_object, _actions, enabled=config.responses)
        _actions.inflight.pop(sidecar_id, None)
        response_id = getattr(result, "id", None)
        if not config.responses or response_id is None or not hasattr(result, "choices"):  # an error response
            return result
        ids = [response_id] if n == 1 else [f"{i}_{response_id}" for i in range(n)]
        result.circuitwatch = attach(await _fetcher.summaries(ids), _actions.aborted.pop(response_id, None))
        return result

    return wrapper


def _is_encoding_rank() -> bool:
    """With tensor parallelism only rank 0 encodes: every rank holds the same residual stream."""
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank() == 0
    except Exception:
        return True
