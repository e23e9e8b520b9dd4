"""Serving benchmark: what monitoring costs a vLLM deployment, against the floor the SAE encoders set.

Variants: plugin off, on with the torch backend, on with ONNX Runtime; each in a fresh engine (its own process),
alternating off/torch/onnx for --rounds rounds, compiled mode (vLLM's default), a real sidecar receiving codes.

Models:
- `llama7b-ratio`: a random-weight Llama whose SAE/model FLOP ratio is a 7-8B deployment's: 32 layers (as Llama
  2/3 7-8B), intermediate 2.7x hidden, 16x-wide TopK SAEs (k 32) on two layers. The encoders then add 64 h^2
  FLOPs per token to the model's ~24 h^2 per layer x 32 layers: 8.3%, whatever the hidden size (256 here, so
  that it runs on these CPUs). Wiring checks are off (random SAEs on a random model read nothing well).
- `fixture`: the 4-layer fixture model with its calibrated resid_post SAEs on layers 1 and 3 (a much larger
  SAE/model ratio, 60%+), wiring check on.

Offline (`LLM.generate`, in-process engine so the bench can see the plugin's steps): output tokens/s. The floor
is the encoders alone on the same step shapes in the same process: every step's monitored row count is recorded,
and after generation each slot's encoder runs again on rows of those counts. overhead / floor is the ratio the
DESIGN target bounds (<= 1.3 with ONNX).

Server (`--server`): vLLM's OpenAI server with `openai` clients, one alone (nothing queues, so what the monitor
adds shows) and 16 concurrent: streaming TTFT and TPOT (p50/p99), non-streaming latency, how many responses still
said `pending` at the plugin's response deadline, and where the wait between the engine finishing a request and
the response reaching the client goes (engine finish -> report final, from the sidecar's report; report final ->
response at the client). The sidecar's CPU seconds per offline variant show what it takes from these cores.

One request at a time (`--step-split`): where a monitored decode step's cost above the floor goes in the worker's
process. One in-process engine (ONNX backend, `monitor: opt-in`), requests taking turns between four treatments:
not monitored; encoded in the step but not handed to the emitter; also packed on the sending thread but not sent;
sent (to the endpoint that drops the bytes, as to a sidecar on other cores: the sidecar's own CPU per message is
`bench/sidecar_bench.py --only small-steps`). Per treatment: ms per output token (median over its requests) and
the step hook's wall time on decode steps, against the unmonitored requests of the same run, and the encoders'
floor for a one-row step replayed in the same process, back to back and with their weights flushed from the caches
between runs (as a model step leaves them: the ratio column uses this one). Between the rungs is work on the
process's other threads (packing, gRPC's), which take the interpreter and the cores from the step.

    .venv/bin/python bench/serving_bench.py [--model llama7b-ratio|fixture] [--rounds 2] [--server]
        [--variants off,onnx,onnx-sink] [--server-variants off,onnx] [--step-split]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # support.processes: starting and stopping vLLM and the sidecar

VARIANTS = ("off", "torch", "onnx")
# Opt-in variants that take the cost apart:
# - `onnx-unsent`: the sidecar unreachable, so nothing is packed or sent: the worker's own cost;
# - `onnx-sink`: codes packed and sent to a gRPC endpoint in this process that drops the raw bytes unread: the
#   worker's cost plus shipping, without the sidecar's CPU (which shares these two cores with vLLM).
# - `onnx-optin` (server only): one server under `monitor: opt-in`, requests alternately opting in and not, so
#   monitored and unmonitored requests are compared in the same process at the same time (no drift between runs).
EXTRA_VARIANTS = ("onnx-unsent", "onnx-sink", "onnx-optin")
PROMPTS, PROMPT_TOKENS, OUTPUT_TOKENS = 64, 128, 96
SERVER_CONCURRENCY = (1, 16)  # one client alone (nothing queues: what the monitor adds shows), then a busy server


# --- the models -------------------------------------------------------------------------------------------


def llama7b_ratio(root: Path) -> tuple[Path, list[dict]]:
    """A random Llama shaped like 7-8B models (32 layers), hidden 256, with random 16x SAEs on layers 10 and 21."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from circuitwatch.fixtures import build_fixtures
    from circuitwatch.fixtures.sae_writers import write_saelens

    fixtures = build_fixtures()
    model_dir = root / "llama7b-ratio"
    tokenizer = AutoTokenizer.from_pretrained(fixtures.model)
    torch.manual_seed(0)
    hidden = 256
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=688, num_hidden_layers=32,
        num_attention_heads=4, num_key_value_heads=4, head_dim=64, max_position_embeddings=1024,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        torch_dtype="float32",
    )  # fmt: skip
    LlamaForCausalLM(config).float().save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    slots = []
    generator = torch.Generator().manual_seed(1)
    for layer in (10, 21):
        d_sae = 16 * hidden
        tensors = {
            "W_enc": torch.randn(hidden, d_sae, generator=generator) / hidden**0.5,
            "b_enc": torch.zeros(d_sae),
            "W_dec": torch.randn(d_sae, hidden, generator=generator) / hidden**0.5,
            "b_dec": torch.zeros(hidden),
        }
        directory = write_saelens(root / f"sae_l{layer}", "topk", tensors, k=32, hook_name=f"model.layers.{layer}")
        slots.append({"layer": layer, "sae": str(directory)})
    return model_dir, slots


def fixture_model(_root: Path) -> tuple[Path, list[dict]]:
    from circuitwatch.fixtures import build_fixtures

    fixtures = build_fixtures()
    return fixtures.model, [
        {"layer": 1, "sae": str(fixtures.topk_sae(1))},
        {"layer": 3, "sae": str(fixtures.topk_sae(3))},
    ]


MODELS = {"llama7b-ratio": llama7b_ratio, "fixture": fixture_model}


def prompts(model: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    from circuitwatch.fixtures.corpus import documents

    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = [tokenizer(text)["input_ids"] for text in documents()[5:]]
    return [doc[:PROMPT_TOKENS] for doc in ids if len(doc) >= PROMPT_TOKENS][:PROMPTS]


def plugin_config(
    path: Path, slots: list[dict], backend: str, sidecar_port: int, wiring: bool, monitor: str = "all"
) -> Path:
    config = {
        "slots": slots,
        "encoder_backend": backend,
        "sidecar": {"address": f"127.0.0.1:{sidecar_port}"},
        "wiring_check": {"enabled": wiring},
        "monitor": monitor,
    }
    path.write_text(json.dumps(config))
    return path


# --- offline: one variant in its own process ----------------------------------------------------------------


def offline_child(model: str, config: str | None) -> dict:
    """Generate in an in-process engine; with the plugin, time its encoders alone on the recorded step shapes."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if config:
        os.environ["CIRCUITWATCH_CONFIG"] = config
    from vllm import LLM, SamplingParams

    from circuitwatch.plugin.worker import WorkerPlugin

    steps: list[int] = []
    plugins: list[WorkerPlugin] = []
    original = WorkerPlugin._encode_step

    def recording(self, runner, captured):
        before = self.counters["rows_encoded"]
        original(self, runner, captured)
        steps.append(self.counters["rows_encoded"] - before)
        if not plugins:
            plugins.append(self)

    WorkerPlugin._encode_step = recording
    llm = LLM(model=model, dtype="float32", max_model_len=512, max_num_batched_tokens=256, max_num_seqs=64, seed=0)
    try:
        token_prompts = prompts(Path(model))
        params = SamplingParams(temperature=0, max_tokens=OUTPUT_TOKENS, min_tokens=OUTPUT_TOKENS, ignore_eos=True)
        llm.generate([{"prompt_token_ids": p} for p in token_prompts[:4]], params, use_tqdm=False)  # warm-up
        steps.clear()
        if plugins:
            plugins[0].emitter.counters["encode_ns"] = 0
        started = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": p} for p in token_prompts], params, use_tqdm=False)
        elapsed = time.perf_counter() - started
        result = {"seconds": elapsed, "tokens": sum(len(o.outputs[0].token_ids) for o in outputs)}
        if plugins:
            plugin = plugins[0]
            result["encode_in_step_s"] = plugin.emitter.counters["encode_ns"] / 1e9
            result["steps"] = len(steps)
            result["floor_s"] = encoder_floor(plugin, steps)
            result["emitter"] = {k: int(v) for k, v in plugin.emitter.counters.items() if isinstance(v, int | float)}
    finally:
        llm.llm_engine.engine_core.shutdown()
    return result


def encoder_floor(plugin, steps: list[int]) -> float:
    """Seconds the slots' encoders alone need for rows of the recorded step sizes (median of 3 replays)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    inputs = {n: torch.randn(n, plugin.slots[0].sae.spec.d_in, generator=generator) * 4 for n in set(steps) if n}
    for slot in plugin.slots:  # warm-up
        for x in list(inputs.values())[:4]:
            slot.encoder.encode(x)
    replays = []
    for _ in range(3):
        started = time.perf_counter()
        for n in steps:
            if n:
                for slot in plugin.slots:
                    slot.encoder.encode(inputs[n])
        replays.append(time.perf_counter() - started)
    return statistics.median(replays)


# --- one request at a time: the per-step cost above the floor, taken apart -------------------------------------

SPLIT_TREATMENTS = ("unmonitored", "encoded", "packed", "sent")
SPLIT_REQUESTS, SPLIT_OUTPUT_TOKENS = 72, 48
SPLIT_SETTLE_S = 0.2  # between requests: the last one's sending is over before the next one starts


def step_split_child(model: str, config: str) -> dict:
    """Requests one at a time in an in-process engine, taking turns between SPLIT_TREATMENTS. The bench removes the
    later parts of the plugin's work for some requests: it drops their code batches at the emitter's door
    (`encoded`), or lets the sending thread build and serialise them but not send them (`packed`)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["CIRCUITWATCH_CONFIG"] = config
    from vllm import LLM, SamplingParams

    from circuitwatch.plugin.admission import XARG_MONITOR
    from circuitwatch.plugin.emitter import Emitter
    from circuitwatch.plugin.worker import WorkerPlugin

    treatment = {"now": "sent"}
    hook_ms: dict[str, list[float]] = {t: [] for t in SPLIT_TREATMENTS}
    plugins: list[WorkerPlugin] = []
    submit_deferred, messages, after_step = Emitter.submit_deferred, Emitter._messages, WorkerPlugin.after_step

    def dropping_submit(self, build, ranges) -> None:
        if treatment["now"] != "encoded":
            submit_deferred(self, build, ranges)

    def unsent_messages(self, done):
        for message in messages(self, done):
            if treatment["now"] == "packed" and message.WhichOneof("kind") == "codes":
                message.SerializeToString()  # what gRPC would do with it before sending
                continue
            yield message

    def timed_after_step(self, runner, scheduler_output) -> None:
        started = time.perf_counter_ns()
        after_step(self, runner, scheduler_output)
        if scheduler_output.total_num_scheduled_tokens == 1:
            hook_ms[treatment["now"]].append((time.perf_counter_ns() - started) / 1e6)
        if not plugins:
            plugins.append(self)

    Emitter.submit_deferred, Emitter._messages, WorkerPlugin.after_step = (
        dropping_submit,
        unsent_messages,
        timed_after_step,
    )
    # without the prefix cache, as the servers below: monitored requests bypass it, so with it on unmonitored
    # repeats of a prompt would run other code paths than monitored ones
    llm = LLM(
        model=model, dtype="float32", max_model_len=512, max_num_batched_tokens=256, max_num_seqs=64, seed=0,
        enable_prefix_caching=False,
    )  # fmt: skip
    per_token: dict[str, list[float]] = {t: [] for t in SPLIT_TREATMENTS}
    try:
        token_prompts = prompts(Path(model))

        def params(monitored: bool) -> SamplingParams:
            # under `monitor: opt-in` every request says whether it opts in, so all carry the same extra_args
            return SamplingParams(
                temperature=0, max_tokens=SPLIT_OUTPUT_TOKENS, min_tokens=SPLIT_OUTPUT_TOKENS, ignore_eos=True,
                extra_args={XARG_MONITOR: monitored},
            )  # fmt: skip

        for prompt in token_prompts[:3]:  # warm-up
            llm.generate([{"prompt_token_ids": prompt}], params(True), use_tqdm=False)
        for t in SPLIT_TREATMENTS:
            hook_ms[t].clear()
        for i in range(SPLIT_REQUESTS):
            treatment["now"] = now = SPLIT_TREATMENTS[i % len(SPLIT_TREATMENTS)]
            prompt = token_prompts[3 + i % (len(token_prompts) - 3)]
            encoded_before = plugins[0].counters["rows_encoded"] if plugins else 0
            started = time.perf_counter()
            llm.generate([{"prompt_token_ids": prompt}], params(now != "unmonitored"), use_tqdm=False)
            per_token[now].append(1e3 * (time.perf_counter() - started) / SPLIT_OUTPUT_TOKENS)
            encoded = plugins[0].counters["rows_encoded"] - encoded_before
            if (encoded > 0) != (now != "unmonitored"):
                raise RuntimeError(f"step split: a request treated as {now!r} had {encoded} rows encoded")
            time.sleep(SPLIT_SETTLE_S)
        treatment["now"] = "sent"
        floor_ms = 1e3 * encoder_floor(plugins[0], [1] * 200) / 200
        cold_floor_ms = 1e3 * cold_one_row_floor(plugins[0])
    finally:
        llm.llm_engine.engine_core.shutdown()
    return {"per_token_ms": per_token, "hook_ms": hook_ms, "floor_ms": floor_ms, "cold_floor_ms": cold_floor_ms}


def cold_one_row_floor(plugin, repeats: int = 50) -> float:
    """Seconds the slots' encoders need for one row each with their weights out of the caches, as after a model
    step (which reads more than the last-level cache holds): the median over `repeats`, caches flushed between."""
    import numpy as np
    import torch

    flush = np.ones(64 << 20, np.uint8)  # larger than any last-level cache here
    x = torch.randn(1, plugin.slots[0].sae.spec.d_in, generator=torch.Generator().manual_seed(0)) * 4
    times = []
    for _ in range(repeats):
        flush.sum()
        started = time.perf_counter()
        for slot in plugin.slots:
            slot.encoder.encode(x)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def run_step_split(model: Path, slots: list[dict], work: Path, ports: dict[str, int], wiring: bool) -> None:
    config = plugin_config(work / "split.json", slots, "onnx", ports["sink"], wiring, monitor="opt-in")
    command = [sys.executable, __file__, "--split-child", str(model), str(config)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"step split: child failed\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    per_token = {t: statistics.median(v) for t, v in result["per_token_ms"].items()}
    hooks = {t: statistics.median(v) if v else 0.0 for t, v in result["hook_ms"].items()}
    base = per_token["unmonitored"]
    print(
        f"\none request at a time, {SPLIT_REQUESTS} requests of {SPLIT_OUTPUT_TOKENS} tokens taking turns (ONNX, "
        f"codes sent to an endpoint that drops them); encoders' floor for a one-row step {result['floor_ms']:.2f} ms "
        f"(back to back), {result['cold_floor_ms']:.2f} ms with their weights out of the caches"
    )
    print(f"{'treatment':12} {'ms/token':>9} {'added':>7} {'x cold floor':>12} {'hook p50':>9}")
    for t in SPLIT_TREATMENTS:
        added = per_token[t] - base
        ratio = f"{added / result['cold_floor_ms']:12.2f}" if t != "unmonitored" else f"{'':12}"
        hook = f"{hooks[t]:8.2f}ms"
        print(f"{t:12} {per_token[t]:9.2f} {added:+7.2f} {ratio} {hook}")


def target_port(variant: str, ports: dict[str, int]) -> tuple[str, int]:
    """(encoder backend, the port its codes go to) of a variant: `unsent` to port 1, where nothing listens."""
    backend, _, mode = variant.partition("-")
    return backend, {"": ports["sidecar"], "optin": ports["sidecar"], "unsent": 1, "sink": ports["sink"]}[mode]


def start_sink():
    """A gRPC endpoint for Monitor/Ingest that reads each message as raw bytes and drops it: codes leave the
    worker as they would for a sidecar on other cores, and nothing here spends CPU decoding them."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from circuitwatch.proto import circuitwatch_pb2 as pb

    def ingest(messages, _context) -> bytes:
        for _ in messages:
            pass
        return pb.IngestAck().SerializeToString()

    handler = grpc.method_handlers_generic_handler(
        "circuitwatch.v1.Monitor", {"Ingest": grpc.stream_unary_rpc_method_handler(ingest)}
    )
    server = grpc.server(ThreadPoolExecutor(8))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process and its children (the sidecar's maintenance worker) have used so far:
    the sidecar's share of the shared cores."""
    import psutil

    process = psutil.Process(pid)
    times = process.cpu_times()
    total = times.user + times.system + times.children_user + times.children_system  # children: those reaped
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = child.cpu_times()
            total += times.user + times.system
    return total


def run_offline(model: Path, slots: list[dict], variant: str, work: Path, ports: dict[str, int], wiring: bool) -> dict:
    backend, port = target_port(variant, ports)
    config = None if variant == "off" else plugin_config(work / f"{variant}.json", slots, backend, port, wiring)
    command = [sys.executable, __file__, "--child", str(model)] + ([str(config)] if config else [])
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{variant}: child failed\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- server: the OpenAI API with concurrent clients -------------------------------------------------------------


def new_load() -> dict:
    return {"ttft": [], "tpot": [], "latency": [], "pending": 0, "received": []}


async def client_load(port: int, token_prompts: list[list[int]], concurrency: int, alternate: bool) -> list[dict]:
    """Streaming requests (TTFT, TPOT), then non-streaming ones of 16 tokens (latency, `pending`, and per response
    the wall-clock time it reached the client with the sidecar's report id, for the breakdown). `alternate`: every
    other request opts in to monitoring (a `monitor: opt-in` server); the loads are [opted in, not]."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    model = (await client.models.list()).data[0].id
    gate = asyncio.Semaphore(concurrency)
    loads = [new_load(), new_load()] if alternate else [new_load()]

    def opt(i: int) -> tuple[dict, dict]:
        if not alternate:
            return loads[0], {}
        return loads[i % 2], {"vllm_xargs": {"circuitwatch_monitor": i % 2 == 0}}

    async def streamed(i: int, prompt: list[int]) -> None:
        load, xargs = opt(i)
        async with gate:
            started = time.perf_counter()
            stream = await client.completions.create(
                model=model, prompt=prompt, max_tokens=OUTPUT_TOKENS, temperature=0, stream=True,
                extra_body={"min_tokens": OUTPUT_TOKENS, "ignore_eos": True, **xargs},
            )  # fmt: skip
            times = []
            async for chunk in stream:
                if chunk.choices:  # a token (its text may be empty: a random model's partial UTF-8); not the
                    times.append(time.perf_counter())  # final `circuitwatch` chunk, whose choices are empty
            load["ttft"].append(times[0] - started)
            load["tpot"].append((times[-1] - times[0]) / max(1, len(times) - 1))

    async def whole(i: int, prompt: list[int]) -> None:
        load, xargs = opt(i)
        async with gate:
            started = time.perf_counter()
            response = await client.completions.create(
                model=model, prompt=prompt, max_tokens=16, temperature=0,
                extra_body={"min_tokens": 16, "ignore_eos": True, **xargs},
            )  # fmt: skip
            load["latency"].append(time.perf_counter() - started)
            field = (response.model_extra or {}).get("circuitwatch")
            load["pending"] += bool(field and field.get("status") == "pending")
            if field and field.get("request_id"):
                load["received"].append((field["request_id"], time.time_ns()))

    await asyncio.gather(*(streamed(i, p) for i, p in enumerate(token_prompts[:4])))  # warm-up
    loads[:] = [new_load() for _ in loads]
    await asyncio.gather(*(streamed(i, p) for i, p in enumerate(token_prompts)))
    await asyncio.gather(*(whole(i, p) for i, p in enumerate(token_prompts)))
    return loads


def report_breakdown(sidecar_port: int, received: list[tuple[str, int]]) -> dict[str, list[float]]:
    """Per non-streaming response, from the sidecar's report and the client's clock (one machine, one clock):
    engine finish -> report final (finish marker, codes still in flight, finalisation) and report final ->
    response at the client (GetReport's wake-up, the API server, the HTTP hop)."""
    from circuitwatch.proto import circuitwatch_pb2 as pb
    from circuitwatch.proto import circuitwatch_pb2_grpc as pb_grpc
    from circuitwatch.proto.client import open_channel

    stub = pb_grpc.MonitorStub(open_channel(f"127.0.0.1:{sidecar_port}"))
    to_final, to_client = [], []
    for request_id, client_ns in received:
        report = stub.GetReport(pb.GetReportRequest(request_id=request_id, wait_ms=2000), timeout=5)
        if report.finalized_unix_nanos and report.finish_unix_nanos:
            to_final.append((report.finalized_unix_nanos - report.finish_unix_nanos) / 1e9)
            to_client.append((client_ns - report.finalized_unix_nanos) / 1e9)
    return {"finish_to_final": to_final, "final_to_client": to_client}


def run_server(
    model: Path, slots: list[dict], variant: str, work: Path, ports: dict[str, int], wiring: bool
) -> dict[str, dict[int, dict]]:
    """{variant: {concurrency: load}}; the opt-in variant gives two: its opted-in and its other requests."""
    from support.processes import free_port, start_vllm, stop

    directory = work / f"server-{variant}"
    directory.mkdir(exist_ok=True)
    backend, target = target_port(variant, ports)
    alternate = variant.endswith("-optin")
    monitor = "opt-in" if alternate else "all"
    config = (
        None if variant == "off" else plugin_config(directory / "plugin.json", slots, backend, target, wiring, monitor)
    )
    port = free_port()
    # No prefix cache: monitored requests bypass it by default (every position encoded), and the streamed and
    # non-streamed passes reuse prompts, so with it on the unmonitored ones would skip prefills the others compute.
    engine_args = ("--max-num-batched-tokens", "256", "--max-num-seqs", "64", "--no-enable-prefix-caching")
    server = start_vllm(model, directory, port, config, engine_args)
    labels = [f"{variant}:monitored", f"{variant}:not"] if alternate else [variant]
    results: dict[str, dict[int, dict]] = {label: {} for label in labels}
    try:
        for concurrency in SERVER_CONCURRENCY:
            loads = asyncio.run(client_load(port, prompts(model), concurrency, alternate))
            for label, load in zip(labels, loads, strict=True):
                if target == ports["sidecar"] and load["received"]:  # the real sidecar's reports time the wait
                    load.update(report_breakdown(ports["sidecar"], load["received"]))
                results[label][concurrency] = load
        return results
    finally:
        stop(server)


# --- the report -----------------------------------------------------------------------------------------------


def quantiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="llama7b-ratio")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--server", action="store_true", help="also through the OpenAI server")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS + EXTRA_VARIANTS)}")
    parser.add_argument("--skip-offline", action="store_true", help="only the server part")
    parser.add_argument("--server-variants", help="the variants run through the server (default: --variants)")
    parser.add_argument("--step-split", action="store_true", help="one request at a time: the cost above the floor")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--split-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(offline_child(args.child[0], args.child[1] if len(args.child) > 1 else None)))
        return
    if args.split_child:
        print(json.dumps(step_split_child(*args.split_child)))
        return

    from support.processes import free_port, start_sidecar, stop

    variants = [v for v in args.variants.split(",") if v] if not args.skip_offline else []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, slots = MODELS[args.model](work)
        wiring = args.model == "fixture"
        ports = {"sidecar": free_port()}
        sidecar = start_sidecar(work, ports["sidecar"])
        sink, ports["sink"] = start_sink()
        try:
            offline: dict[str, list[dict]] = {v: [] for v in variants}
            for round_ in range(args.rounds):
                for variant in variants:
                    cpu_before = process_cpu_seconds(sidecar.pid)
                    result = run_offline(model, slots, variant, work, ports, wiring)
                    result["sidecar_cpu_s"] = process_cpu_seconds(sidecar.pid) - cpu_before
                    offline[variant].append(result)
                    print("result", json.dumps({"variant": variant, **result}), flush=True)
                    print(
                        f"round {round_ + 1} {variant:5}: {result['tokens'] / result['seconds']:7.1f} tok/s", flush=True
                    )
            server = {}
            for variant in (args.server_variants or args.variants).split(",") if args.server else ():
                server |= run_server(model, slots, variant, work, ports, wiring)
            if args.step_split:
                run_step_split(model, slots, work, ports, wiring)
        finally:
            stop(sidecar)
            sink.stop(0)
    report(args.model, offline, server)


def report(model: str, offline: dict[str, list[dict]], server: dict[str, dict]) -> None:
    if offline.get("off") and all(offline.values()):
        report_offline(model, offline)
    if server:
        report_server(server)


def report_offline(model: str, offline: dict[str, list[dict]]) -> None:
    base = statistics.median(r["seconds"] for r in offline["off"])
    print(
        f"\nmodel {model}: {PROMPTS} prompts x {PROMPT_TOKENS} tokens, {OUTPUT_TOKENS} output tokens each, "
        "compiled mode"
    )
    print(
        f"{'variant':8} {'tok/s':>8} {'overhead':>9} {'floor':>7} {'in-step':>8} {'ovh/floor':>9} {'sidecar CPU s':>14}"
    )
    idle_cpu = statistics.median(r["sidecar_cpu_s"] for r in offline["off"])  # engine start-up, idle ticks
    for variant, runs in offline.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        tokens = runs[0]["tokens"]
        line = f"{variant:8} {tokens / seconds:8.1f} {100 * (seconds / base - 1):8.1f}%"
        if variant != "off":
            floor = statistics.median(r["floor_s"] for r in runs) / base
            in_step = statistics.median(r["encode_in_step_s"] for r in runs) / base
            cpu = statistics.median(r["sidecar_cpu_s"] for r in runs) - idle_cpu
            line += f" {100 * floor:6.1f}% {100 * in_step:7.1f}% {(seconds / base - 1) / floor:9.2f} {cpu:14.2f}"
        print(line)
    print("(sidecar CPU s: what the sidecar process used while the variant ran, less what it used idle with off)")


def report_server(server: dict[str, dict[int, dict]]) -> None:
    for concurrency in SERVER_CONCURRENCY:
        loads = {variant: results[concurrency] for variant, results in server.items()}
        print(
            f"\nOpenAI server, {concurrency} concurrent client(s), {PROMPTS} streaming + {PROMPTS} non-streaming "
            "(16 tokens) requests"
        )
        width = max(8, *(len(variant) for variant in loads))
        print(
            f"{'variant':{width}} {'TTFT p50':>9} {'p99':>7} {'TPOT p50':>9} {'p99':>7} {'latency p50':>12} {'p90':>7} "
            f"{'pending':>8}"
        )
        for variant, result in loads.items():
            t50, t99 = quantiles(result["ttft"])
            p50, p99 = quantiles(result["tpot"])
            l50 = statistics.median(result["latency"])
            l90 = sorted(result["latency"])[int(0.9 * len(result["latency"]))]
            print(
                f"{variant:{width}} {1e3 * t50:8.1f}ms {1e3 * t99:6.1f}ms {1e3 * p50:8.1f}ms {1e3 * p99:6.1f}ms "
                f"{1e3 * l50:11.1f}ms {1e3 * l90:6.1f}ms {result['pending']:>4}/{len(result['latency'])}"
            )
        for variant, result in loads.items():
            if result.get("finish_to_final"):
                final, client = quantiles(result["finish_to_final"]), quantiles(result["final_to_client"])
                print(
                    f"{variant}: engine finish -> report final p50 {1e3 * final[0]:.1f} ms, p99 {1e3 * final[1]:.1f} "
                    f"ms; report final -> response at the client p50 {1e3 * client[0]:.1f} ms, p99 "
                    f"{1e3 * client[1]:.1f} ms"
                )


if __name__ == "__main__":
    main()
