"""`make demo`: circuitwatch end to end on CPU.

Builds (or reuses) the fixtures, calibrates the monitored SAE (`circuitwatch calibrate`), derives an example
circuit from it, starts the sidecar and the vLLM OpenAI server with the plugin, sends real requests with the
`openai` client (some trip the circuit, some don't, one is byte soup the SAEs cannot read) and prints each
request's flags, coverage, fidelity and trace span, then `circuitwatch health`. Then the identification loop:
reviewers label a few requests after the fact (`circuitwatch label`), `circuitwatch identify` finds the features
that separate them and saves the top ones as a circuit the sidecar reloads, and new requests are flagged by it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import torch
import yaml
from otlp_printer import SpanPrinter  # examples/otlp_printer.py

from circuitwatch.fixtures import build_fixtures
from circuitwatch.fixtures.activations import residual_stream
from circuitwatch.fixtures.corpus import documents
from circuitwatch.kernels import ReferenceEncoder, load_sae
from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto import circuitwatch_pb2_grpc as pb_grpc

WORK = Path(".demo")
LAYER = 3
TARGET = "lambda"
MIN_ACTIVATION = 2.0
REQUESTS = [
    ("completion", "A lambda expression creates an anonymous function; lambda x: x + 1 is"),
    ("completion", "The import statement finds a module and"),
    ("chat", "Explain what lambda does in a sort key."),
    ("chat", "How do I open a file and read it line by line?"),
    ("completion", "Keyword arguments and lambda forms can be combined:"),
    ("completion", "A class definition defines a class object; its"),
    # nothing like the English the model and its SAEs learnt: the report says low_fidelity, never clean
    ("completion", "ʁƞ¤ɮŘǢ¸ɐȟÍĈȝɓŭʧǸŦÉǞĪȼģǯɵȒůŽ§ȁɃėʀøɚƾŏǦʒƁɲĠȓƜśɬǭʐ¾ÙĹǿɢĞȾʃǷėƩɟƉȠŧˀ"),
]


# The identification loop: prompts that talk about raising exceptions vs prompts that do not.
FRAMES = [
    "The {} statement is described in the reference manual.",
    "Use {} when the module must be loaded first.",
    "In this example, {} appears at the top of the file.",
    "A beginner asked why {} behaves this way.",
    "The documentation explains {} with a short example.",
    "Is it safe to use {} inside a function body?",
    "The {} keyword cannot be used as an identifier.",
    "Every {} in the code is checked by the compiler.",
    "Here, {} is combined with a loop over the items.",
]
ESCALATE = [frame.format("raise") for frame in FRAMES]
ROUTINE = [
    "The for loop iterates over the items of a sequence.",
    "A dictionary maps keys to values in insertion order.",
    "Integers support addition and multiplication.",
    "The while loop repeats while the condition is true.",
    "A string literal is enclosed in quotes.",
    "Comparisons can be chained in an expression.",
    "The print function writes text to the console.",
    "A tuple is an immutable sequence of objects.",
    "Slices select a range of items from a list.",
]
REVIEWED = 6  # the first 6 of each list are sent and reviewed; the last 3 come later as new traffic


def log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_feature(model_dir: Path, sae_dir: Path) -> tuple[int, float, float]:
    """The SAE feature that fires (>= MIN_ACTIVATION) most selectively on the word 'lambda' in the corpus."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    encoder = ReferenceEncoder(load_sae(sae_dir))
    on_target, elsewhere = [], []
    for text in documents():
        if TARGET not in text:
            continue
        encoded = tokenizer(text, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"][:1024], encoded["offset_mapping"][:1024]
        spans = [(i, i + len(TARGET)) for i in range(len(text)) if text.startswith(TARGET, i)]
        # tokens that overlap an occurrence of the word (BPE splits it into pieces)
        is_target = torch.tensor([any(a < e and s < b for s, e in spans) for a, b in offsets])
        if not is_target.any():
            continue
        acts = encoder.activations(residual_stream(model, torch.tensor([ids]), [LAYER])[LAYER][0])
        fired = acts >= MIN_ACTIVATION
        on_target.append(fired[is_target])
        elsewhere.append(fired[~is_target])
    rate_on = torch.cat(on_target).float().mean(0)
    rate_off = torch.cat(elsewhere).float().mean(0)
    feature = int(torch.argmax(rate_on - 50 * rate_off))  # selective: rare anywhere else
    return feature, float(rate_on[feature]), float(rate_off[feature])


def wait_http(url: str, process: subprocess.Popen, log_file: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"process exited; see {log_file}:\n{log_file.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"timed out waiting for {url}; see {log_file}")


def wait_grpc(port: int, process: subprocess.Popen, log_file: Path) -> grpc.Channel:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    for _ in range(100):
        if process.poll() is not None:
            raise SystemExit(f"sidecar exited; see {log_file}:\n{log_file.read_text()[-2000:]}")
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            return channel
        except grpc.RpcError:
            time.sleep(0.2)
    raise SystemExit(f"sidecar did not become healthy; see {log_file}")


def stop(process: subprocess.Popen, name: str) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
    log(f"{name} stopped (exit code {process.returncode})")


def main() -> int:
    started = time.monotonic()
    fixtures = build_fixtures()
    shutil.rmtree(WORK, ignore_errors=True)  # a fresh evidence store each run
    WORK.mkdir()
    run = time.strftime("%H%M%S")
    sae_dir = fixtures.topk_sae(LAYER)
    feature, rate_on, rate_off = pick_feature(fixtures.model, sae_dir)
    log(
        f"example circuit: layer {LAYER} feature {feature} fires on {rate_on:.0%} of the tokens of '{TARGET}' "
        f"in the corpus and on {rate_off:.1%} of the others"
    )
    circuits = {
        "circuits": [
            {
                "name": "mentions-lambda",
                "description": f"layer {LAYER} feature {feature}, picked by the demo for the token '{TARGET}'",
                "severity": "high",
                "scope": "prompt",
                "labels": ["demo"],
                "when": {"layer": LAYER, "feature": feature, "min_activation": MIN_ACTIVATION},
            }
        ]
    }
    (WORK / "circuits.yaml").write_text(yaml.safe_dump(circuits, sort_keys=False))
    sidecar_port, vllm_port = free_port(), free_port()
    (WORK / "identified.yaml").write_text("")  # where `circuitwatch identify --save-circuit` writes
    (WORK / "sidecar.yaml").write_text(
        f"listen: 127.0.0.1:{sidecar_port}\ncircuits: [circuits.yaml, identified.yaml]\nevidence_dir: evidence\n"
    )
    log(f"calibrating the layer-{LAYER} SAE on the built-in sample (the other slots use the baseline beside their SAE)")
    baseline = WORK / f"baseline-layer{LAYER}.json"
    cli("calibrate", "--model", str(fixtures.model), "--sae", str(sae_dir), "--layer", str(LAYER),
        "--max-documents", "40", "--out", str(baseline))  # fmt: skip
    plugin = {
        "slots": [
            {"layer": LAYER, "sae": str(sae_dir), "baseline": str(baseline.resolve())},
            {"layer": 1, "sae": str(fixtures.sparsify_sae(1))},
            # a non-residual slot: head 2's attention output (attn_z), hook point and head from the SAE's cfg.json
            {"layer": 1, "sae": str(fixtures.tap_sae("attn_z_head"))},
        ],
        "sidecar": {"address": f"127.0.0.1:{sidecar_port}"},
        "response_deadline_ms": 2000,  # the demo waits for final reports (default: 50 ms, then "pending")
        "wiring_check": {"tokens": 64},  # judge the wiring on the first 64 tokens (default 256)
    }
    (WORK / "plugin.json").write_text(json.dumps(plugin, indent=2))

    sidecar_log, vllm_log = WORK / "sidecar.log", WORK / "vllm.log"
    spans = SpanPrinter()
    log(f"starting the sidecar on 127.0.0.1:{sidecar_port}, exporting spans to a local OTLP receiver")
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": spans.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    sidecar = subprocess.Popen(
        [sys.executable, "-m", "circuitwatch.cli", "sidecar", "--config", str(WORK / "sidecar.yaml")],
        stdout=subprocess.DEVNULL,
        stderr=sidecar_log.open("w"),
        env={**os.environ, **otel},
    )
    server = None
    try:
        channel = wait_grpc(sidecar_port, sidecar, sidecar_log)
        stub = pb_grpc.MonitorStub(channel)
        log(f"starting the vLLM OpenAI server on 127.0.0.1:{vllm_port} with the circuitwatch plugin (logs: {vllm_log})")
        env = {**os.environ, "CIRCUITWATCH_CONFIG": str((WORK / "plugin.json").resolve())}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        server = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", str(fixtures.model),
             "--host", "127.0.0.1", "--port", str(vllm_port), "--dtype", "float32", "--max-model-len", "1024"],
            env=env,
            stdout=vllm_log.open("w"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_http(f"http://127.0.0.1:{vllm_port}/health", server, vllm_log)
        log(f"vLLM ready after {time.monotonic() - started:.0f}s; sending {len(REQUESTS)} requests\n")

        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{vllm_port}/v1", api_key="demo")
        model = str(fixtures.model)
        for i, (kind, text) in enumerate(REQUESTS):
            request_id = f"demo-{run}-{i}"
            trace_id = os.urandom(16).hex()
            headers = {"X-Request-Id": request_id, "traceparent": f"00-{trace_id}-{os.urandom(8).hex()}-01"}
            if kind == "chat":
                response = client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": text}], max_tokens=24, temperature=0,
                    extra_headers=headers,
                )  # fmt: skip
                answer = response.choices[0].message.content
            else:
                response = client.completions.create(
                    model=model, prompt=text, max_tokens=24, temperature=0, extra_headers=headers
                )
                answer = response.choices[0].text
            carried = response.model_extra["circuitwatch"]  # in the API response itself
            coverage = carried.get("coverage", {})
            flags = ", ".join(
                f"{f['circuit']} ({f['severity']}, {f['matching_tokens']} tokens, first at {f['positions'][0]})"
                for f in carried["flags"]
            )
            print(f"{kind:<10} {response.id}   trace {trace_id}")
            print(f"  prompt:   {text!r}")
            print(f"  answer:   {answer.strip()[:70]!r}")
            seen, total = coverage.get("positions_seen", 0), coverage.get("positions_total", 0)
            print(f"  response: circuitwatch.status={carried['status']}, {seen}/{total} positions seen")
            print(f"  flags:    {flags or 'none'}")
            fidelity = "; ".join(
                f"{f['sae']} error {f['error_mean']:.2f}, {f['fraction_above_threshold']:.0%} of tokens above "
                f"{f['error_threshold']:.2f}{' LOW' if f['low_fidelity'] else ''}"
                for f in carried.get("fidelity", [])
            )
            print(f"  fidelity: {fidelity or 'not measured'}")
            span = spans.wait_for(carried["request_id"])  # the sidecar's unique key for this request
            print(f"  span:     {span}\n" if span else "  span:     (not exported yet)\n")
        flagged = stub.ListReports(pb.ListReportsRequest(flagged_only=True, limit=100)).reports
        log(f"sidecar holds {len(flagged)} flagged report(s): {', '.join(r.request_id for r in flagged)}")
        log("each SAE's state: the start-up wiring check, and drift once enough tokens have been seen")
        cli("health", "--target", f"127.0.0.1:{sidecar_port}")
        ok = identification_loop(client, model, stub, sidecar_port, run)
    finally:
        if server is not None:
            stop(server, "vLLM server")
        stop(sidecar, "sidecar")
        spans.close()
    log(f"done in {time.monotonic() - started:.0f}s (work files in {WORK}/)")
    return 0 if ok else 1


def complete(client, model: str, prompt: str, request_id: str) -> tuple[str, dict]:
    """(the response id, which the sidecar resolves to this request, and the response's circuitwatch field)"""
    response = client.completions.create(
        model=model, prompt=prompt, max_tokens=8, temperature=0, extra_headers={"X-Request-Id": request_id}
    )
    return response.id, response.model_extra["circuitwatch"]


def cli(*args: str) -> None:
    """Run a circuitwatch command as a user would, echoing it and its output."""
    print("  $ circuitwatch " + " ".join(a if " " not in a else repr(a) for a in args))
    done = subprocess.run([sys.executable, "-m", "circuitwatch.cli", *args], capture_output=True, text=True)
    for line in (done.stdout + done.stderr).rstrip().splitlines():
        print("    " + line)
    if done.returncode:
        raise SystemExit(f"circuitwatch {args[0]} failed (exit code {done.returncode})")


def identification_loop(client, model: str, stub, sidecar_port: int, run: str) -> bool:
    """label -> identify -> save -> new requests flagged; True when the saved circuit flags exactly the new
    requests that talk about raising exceptions."""
    print()
    log("identification loop: reviewers escalate answers about raising exceptions; which features separate them?")
    target = ["--target", f"127.0.0.1:{sidecar_port}"]
    escalate = [complete(client, model, p, f"demo-{run}-x{i}")[0] for i, p in enumerate(ESCALATE[:REVIEWED])]
    routine = [complete(client, model, p, f"demo-{run}-r{i}")[0] for i, p in enumerate(ROUTINE[:REVIEWED])]
    log(f"sent {2 * REVIEWED} requests; a reviewer labels them after the fact")
    cli("label", *target, *[a for i in escalate for a in ("--id", i)], "--add", "review:escalate",
        "--author", "demo-reviewer", "--note", "asks about raising exceptions")  # fmt: skip
    cli("label", *target, *[a for i in routine for a in ("--id", i)], "--add", "review:ok", "--author", "demo-reviewer")
    saving = ["--save-circuit", "raises-exceptions", "--circuits-file", str(WORK / "identified.yaml"), "--reload"]
    cli("identify", *target, "--positive-label", "review:escalate", "--negative-label", "review:ok",
        "--scope", "prompt", "--top", "6", "--pairs", "3", "--cut", "2", *saving)  # fmt: skip
    log("new traffic, monitored with the saved circuit from the first request on:")
    ok = True
    for i, (prompt, expected) in enumerate(
        [(p, True) for p in ESCALATE[REVIEWED:]] + [(p, False) for p in ROUTINE[REVIEWED:]]
    ):
        _, carried = complete(client, model, prompt, f"demo-{run}-new{i}")
        flags = [f["circuit"] for f in carried["flags"] if f["circuit"] == "raises-exceptions"]
        ok &= bool(flags) == expected
        print(
            f"  {'FLAGGED' if flags else 'clean  '}  {prompt!r}{'' if bool(flags) == expected else '  <- unexpected'}"
        )
    log("the saved circuit flags exactly the new requests about raising exceptions" if ok else "loop FAILED")
    return ok


if __name__ == "__main__":
    sys.exit(main())
