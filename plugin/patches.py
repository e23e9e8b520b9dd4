"""The seams into vLLM, applied once per process by the entry point (API server, engine core, workers).

- Worker.load_model: after the model loads (before the profile run, compile and graph capture), start the
  WorkerPlugin, which installs taps. Shared by GPU and CPU workers and both model runners.
- Worker.execute_model: open a tap step around the forward, then map rows, encode and emit.
- V2 runner prepare_inputs: keep the step's InputBatch (it is otherwise a local of execute_model).
- InputProcessor.assign_request_id (the process that accepts requests: API server or offline LLM): admission
  (admission.py) decides, by the operator's policy, how each request is monitored, replacing whatever the
  client put in vllm_xargs; InputProcessor.__init__ records the configuration it runs under.
- The API server's middleware (vllm.entrypoints.launchers.app): every HTTP request runs with its client
  context, so admission knows it serves a client, whatever endpoint the request came through.
- Request.get_skip_reading_prefix_cache (engine core): monitored requests bypass prefix-cache reads.
- VllmConfig.compute_hash: mix in the plugin configuration, so compiled artifacts traced without the
  taps (or with other taps) are never reused from vLLM's on-disk compile cache.
- OpenAI completion and chat handlers (API-server process): see api_server.py.
An unconfigured plugin leaves every call to the original. Only the seams live here; what runs behind them is in
worker.py, engine.py and api_server.py, and per-process state in process.py.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os

from .admission import Admission
from .config import ENV_VAR, PluginConfig, load_plugin_config
from .process import PROCESS

log = logging.getLogger("circuitwatch.plugin")


def _engine_config() -> PluginConfig | None:
    """The configuration as the engine core sees it (its --additional-config, captured at EngineCore init)."""
    return load_plugin_config(PROCESS.engine_additional_config)


def apply() -> None:
    if PROCESS.applied:
        return
    PROCESS.applied = True
    if os.environ.get(ENV_VAR):
        load_plugin_config()  # a bad file fails start-up here, in the first process, with its reason
    _patch_worker()
    _patch_v2_runner()
    _patch_admission()
    _patch_engine_core()
    _patch_config_hash()
    _patch_api_server()
    _patch_http_context()


def _patch_worker() -> None:
    from vllm.v1.worker.gpu_worker import Worker

    original_load, original_execute = Worker.load_model, Worker.execute_model

    @functools.wraps(original_load)
    def load_model(self, *args, **kwargs):
        result = original_load(self, *args, **kwargs)
        config = load_plugin_config(self.vllm_config.additional_config)
        if config is not None:
            from .worker import worker_plugin

            runner = self.model_runner
            plugin = worker_plugin(config, self.vllm_config, runner.get_model(), runner.device, _parallelism(self))
            if plugin is not None:
                self._circuitwatch = plugin
                runner._circuitwatch_plugin = plugin
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
    except Exception as exc:  # present in every supported release (plugin/compat.py): say so loudly
        log.error("circuitwatch: cannot patch vLLM's V2 model runner (%s); GPU workers on it will emit no codes", exc)
        return
    original = V2Runner.prepare_inputs

    @functools.wraps(original)
    def prepare_inputs(self, *args, **kwargs):
        batch = original(self, *args, **kwargs)
        monitor = getattr(self, "_circuitwatch_plugin", None)
        if monitor is not None:
            monitor.v2_batch = batch
        return batch

    V2Runner.prepare_inputs = prepare_inputs


def _patch_admission() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    original_init = InputProcessor.__init__
    original_assign = InputProcessor.assign_request_id

    @functools.wraps(original_init)
    def init(self, vllm_config, *args, **kwargs):
        original_init(self, vllm_config, *args, **kwargs)
        PROCESS.frontend_additional_config = vllm_config.additional_config

    @functools.wraps(original_assign)
    def assign_request_id(request) -> None:
        original_assign(request)
        config = load_plugin_config(PROCESS.frontend_additional_config)
        if config is not None:
            from .admission import admit_request

            admission = admit_request(request, config)
            if admission is not None and admission.monitored and _on_event_loop():
                from .api_server import services

                services(config)  # circuit actions can reach requests from every endpoint

    InputProcessor.__init__ = init
    InputProcessor.assign_request_id = staticmethod(assign_request_id)
    try:
        from vllm.v1.engine.async_llm import AsyncLLM
    except Exception as exc:
        log.error("circuitwatch: cannot patch vLLM's AsyncLLM (%s); admission will not see served requests", exc)
        return
    original_async_init = AsyncLLM.__init__

    @functools.wraps(original_async_init)
    def async_init(self, *args, **kwargs):
        original_async_init(self, *args, **kwargs)
        PROCESS.engine_client = self  # circuit actions abort through it

    AsyncLLM.__init__ = async_init


def _patch_engine_core() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.request import Request

    original_init = EngineCore.__init__
    original_skip = Request.get_skip_reading_prefix_cache
    original_free = Scheduler._free_request
    original_update = Scheduler.update_from_output

    @functools.wraps(original_init)
    def init(self, vllm_config, *args, **kwargs):
        PROCESS.engine_additional_config = vllm_config.additional_config
        model_config = vllm_config.model_config
        PROCESS.engine_model = str(model_config.served_model_name or model_config.model)
        return original_init(self, vllm_config, *args, **kwargs)

    @functools.wraps(original_free)
    def free_request(self, request, *args, **kwargs):
        config = _engine_config()
        if config is not None:
            try:
                from .engine import notifier

                notifier(config, PROCESS.engine_model).request_freed(request)
            except Exception:  # never break the scheduler
                log.exception("circuitwatch: could not send the finish marker of %s", request.request_id)
        return original_free(self, request, *args, **kwargs)

    @functools.wraps(original_update)
    def update_from_output(self, *args, **kwargs):
        try:
            return original_update(self, *args, **kwargs)
        finally:
            code_emitter = PROCESS.code_emitter  # a worker in this process: the step's finishes are submitted
            if code_emitter is not None:
                code_emitter.engine_step_done()

    @functools.wraps(original_skip)
    def get_skip_reading_prefix_cache(self) -> bool:
        config = _engine_config()
        params = self.sampling_params
        bypass = config is not None and config.prefix_cache == "bypass" and params is not None
        if bypass and Admission.from_extra_args(params.extra_args, config).monitored:
            return True
        return original_skip(self)

    EngineCore.__init__ = init
    Request.get_skip_reading_prefix_cache = get_skip_reading_prefix_cache
    Scheduler._free_request = free_request
    Scheduler.update_from_output = update_from_output


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
    except Exception as exc:
        log.error("circuitwatch: cannot patch vLLM's OpenAI handlers (%s); responses will carry no report", exc)
        return
    from .api_server import monitored_handler
    from .request_ids import CHAT, COMPLETION

    handlers = (
        (OpenAIServingCompletion, "create_completion", COMPLETION),
        (OpenAIServingChat, "create_chat_completion", CHAT),
    )
    for cls, name, kind in handlers:
        setattr(cls, name, monitored_handler(getattr(cls, name), kind))


def _patch_http_context() -> None:
    try:
        import vllm.entrypoints.launchers.app as app_module
    except Exception as exc:
        log.error("circuitwatch: cannot patch vLLM's HTTP middleware (%s); client headers will not be read", exc)
        return
    original = app_module.init_entrypoints_middleware

    @functools.wraps(original)
    def init_entrypoints_middleware(args, app, *rest, **kwargs):
        original(args, app, *rest, **kwargs)
        from .admission import ClientContextMiddleware

        app.add_middleware(ClientContextMiddleware)  # added last: outermost, sees every HTTP request first

    app_module.init_entrypoints_middleware = init_entrypoints_middleware


def _on_event_loop() -> bool:
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _parallelism(worker):
    """This worker's tensor-parallel rank, and the attention heads the model has (plugin/slots.py)."""
    from .slots import Parallelism

    heads = int(worker.vllm_config.model_config.hf_text_config.num_attention_heads)
    try:
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        return Parallelism(get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size(), heads)
    except Exception:  # no parallel state: a single process
        return Parallelism(0, 1, heads)
