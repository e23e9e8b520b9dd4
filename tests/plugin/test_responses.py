"""The `circuitwatch` object in OpenAI responses (non-streaming, streaming, n>1), through the real vLLM OpenAI
server and a real sidecar; pending, never an error, when the sidecar is down or slower than the deadline."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from circuitwatch.fixtures import FixturePaths
from circuitwatch.plugin.config import PluginConfig
from circuitwatch.plugin.responses import ReportFetcher
from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto import circuitwatch_pb2_grpc as pb_grpc
from circuitwatch.response import read_monitoring

from support.plugin_harness import feature_only_in, write_plugin_config
from support.processes import free_port, start_sidecar, start_vllm, stop

# matches every token: a term that never fires, negated
ALWAYS = "circuits:\n  - {name: always, severity: low, when: {not: {layer: 1, feature: 7, min_activation: 1000000}}}\n"


EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "clients"
PROMPT_TO_STOP = "Keyword arguments and lambda forms can be combined in a call"
PROMPT_TO_KEEP = "The import statement finds a module and loads it"


def start_sidecar_with_circuits(tmp_path: Path, port: int, extra_circuits: str = "") -> subprocess.Popen:
    (tmp_path / "circuits.yaml").write_text(ALWAYS + extra_circuits)
    return start_sidecar(tmp_path, port, "circuits: [circuits.yaml]\n")


@pytest.mark.vllm
def test_responses_carry_the_report(fixtures: FixturePaths, tmp_path: Path) -> None:
    from openai import OpenAI

    sidecar_port, vllm_port = free_port(), free_port()
    stop_feature = feature_only_in(fixtures, PROMPT_TO_STOP, PROMPT_TO_KEEP)
    abort_circuit = (
        f"  - {{name: stop-it, action: abort, severity: critical, scope: prompt,"
        f" when: {{layer: 1, feature: {stop_feature}, min_activation: 1.0}}}}\n"
    )
    sidecar = start_sidecar_with_circuits(tmp_path, sidecar_port, abort_circuit)
    # a generous deadline so a loaded CI machine still sees final reports; the deadline itself is unit-tested
    plugin = write_plugin_config(tmp_path / "plugin.json", fixtures, sidecar_port, response_deadline_ms=3000)
    server = start_vllm(fixtures.model, tmp_path, vllm_port, plugin)
    client = OpenAI(base_url=f"http://127.0.0.1:{vllm_port}/v1", api_key="unused", timeout=120)
    model = str(fixtures.model)
    stub = pb_grpc.MonitorStub(grpc.insecure_channel(f"127.0.0.1:{sidecar_port}"))
    try:
        response = client.completions.create(model=model, prompt="The import statement", max_tokens=6, temperature=0)
        carried = response.model_extra["circuitwatch"]
        report = stub.GetReport(pb.GetReportRequest(request_id=response.id, wait_ms=5000))  # a unique response id
        assert carried["request_id"] == report.request_id and report.response_id == response.id
        assert carried["status"] == "complete"
        assert carried["coverage"]["positions_total"] == report.coverage.positions_total > 0
        assert [f["circuit"] for f in carried["flags"]] == ["always"]  # this prompt does not trip stop-it
        assert carried["flags"][0]["matching_tokens"] == report.coverage.positions_total
        assert carried["max_severity"] == "low"

        chunks = list(
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=5, temperature=0, stream=True
            )
        )
        final = [c for c in chunks if (c.model_extra or {}).get("circuitwatch")]
        assert len(final) == 1 and final[0] is chunks[-1] and final[0].choices == []
        assert final[0].model_extra["circuitwatch"]["status"] == "complete"
        assert final[0].model_extra["circuitwatch"]["request_id"].startswith(chunks[0].id + ".")
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # the text is unaffected

        # usage asked for: OpenAI's usage chunk stays the last one before [DONE], and carries the object
        chunks = list(
            client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "Hello"}],
                max_tokens=5,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
        assert chunks[-1].model_extra["circuitwatch"]["status"] == "complete"
        assert not any((c.model_extra or {}).get("circuitwatch") for c in chunks[:-1])
        raw = raw_sse(vllm_port, model, "The import statement", stream_options={"include_usage": True})
        assert raw[-1] == "[DONE]"
        usage_chunk = json.loads(raw[-2])
        assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 4
        assert usage_chunk["circuitwatch"]["request_id"].startswith(usage_chunk["id"] + ".")
        assert read_monitoring(response).report.coverage.positions_total == carried["coverage"]["positions_total"]

        # the client examples, run as a user would run them against this server
        base_url = f"http://127.0.0.1:{vllm_port}"
        python_example = run_example("read_flags.py", "--base-url", f"{base_url}/v1", "--model", model)
        assert python_example.splitlines() == [
            "chat: status=complete max_severity=low circuits=always finish_reason=length",
            "stream: status=complete max_severity=low circuits=always finish_reason=length",
        ]
        curl_example = run_example("curl.sh", base_url, model)
        first, end = json.JSONDecoder().raw_decode(curl_example)
        assert first["finish_reason"] == "length" and first["circuitwatch"]["status"] == "complete"
        assert json.loads(curl_example[end:])["flags"][0]["circuit"] == "always"

        siblings = client.completions.create(model=model, prompt="A class", max_tokens=4, temperature=0.9, n=2, seed=1)
        per_choice = siblings.model_extra["circuitwatch"]["choices"]
        key = per_choice[0]["request_id"].removeprefix("0_")
        assert key.startswith(siblings.id + ".")
        assert [c["request_id"] for c in per_choice] == [f"0_{key}", f"1_{key}"]
        assert all(c["status"] == "complete" for c in per_choice)

        # an abort circuit stops only its own request, through vLLM's abort path, and the response says why
        from concurrent.futures import ThreadPoolExecutor

        def long_completion(prompt: str):
            return client.completions.create(
                model=model, prompt=prompt, max_tokens=300, temperature=0, extra_body={"ignore_eos": True}
            )

        with ThreadPoolExecutor(2) as pool:
            stopped, kept = pool.map(long_completion, [PROMPT_TO_STOP, PROMPT_TO_KEEP])
        assert stopped.choices[0].finish_reason == "content_filter"  # OpenAI's reason for filtered output
        assert stopped.usage.completion_tokens < 300
        assert stopped.model_extra["circuitwatch"]["aborted_by"] == "stop-it"
        assert "stop-it" in [f["circuit"] for f in stopped.model_extra["circuitwatch"]["flags"]]
        assert kept.choices[0].finish_reason == "length" and kept.usage.completion_tokens == 300
        assert "aborted_by" not in kept.model_extra["circuitwatch"]

        # streaming: the abort ends the stream with content_filter, before the object (even when vLLM had no
        # token to send yet: the prompt alone trips the circuit, and a long prompt takes several prefill steps;
        # prompt + max_tokens stay within --max-model-len, which vLLM 0.30/0.31 enforce)
        events = raw_sse(vllm_port, model, " ".join([PROMPT_TO_STOP] * 12), max_tokens=200, ignore_eos=True)
        bodies = [json.loads(e) for e in events[:-1]]
        reasons = [c["finish_reason"] for b in bodies for c in b["choices"] if c["finish_reason"] is not None]
        assert reasons == ["content_filter"]
        assert bodies[-1]["choices"] == [] and bodies[-1]["circuitwatch"]["aborted_by"] == "stop-it"
        assert len({b["id"] for b in bodies}) == 1

        sidecar.send_signal(signal.SIGKILL)
        sidecar.wait(10)
        response = client.completions.create(model=model, prompt="The import statement", max_tokens=6, temperature=0)
        assert response.choices[0].text  # served as usual
        assert response.model_extra["circuitwatch"]["status"] == "pending"
        assert response.model_extra["circuitwatch"]["request_id"].startswith(response.id + ".")  # its unique key
    finally:
        stop(server)
        stop(sidecar)


def run_example(name: str, *args: str) -> str:
    command = [sys.executable] if name.endswith(".py") else ["bash"]
    done = subprocess.run(
        [*command, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def raw_sse(port: int, model: str, prompt: str, max_tokens: int = 4, **body) -> list[str]:
    """A streamed completion read as the wire has it: every `data:` payload in order."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=json.dumps(
            {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, **body}
        ).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        lines = response.read().decode().splitlines()
    return [line[len("data: ") :] for line in lines if line.startswith("data: ")]


class _SlowMonitor(pb_grpc.MonitorServicer):
    def __init__(self) -> None:
        self.finished = threading.Event()

    def GetReport(self, request, context):  # noqa: N802 - the proto's name
        threading.Event().wait(3)  # far past the deadline
        self.finished.set()
        return pb.Report(request_id=request.request_id, status=pb.REPORT_STATUS_COMPLETE)


def test_the_deadline_bounds_the_wait_and_gives_pending() -> None:
    """A sidecar slower than the deadline: the summary is `pending` while the sidecar is still answering."""
    slow = _SlowMonitor()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    pb_grpc.add_MonitorServicer_to_server(slow, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        config = PluginConfig.model_validate(
            {
                "slots": [{"layer": 1, "sae": "unused"}],
                "sidecar": {"address": f"127.0.0.1:{port}"},
                "response_deadline_ms": 100,
            }
        )
        [summary] = asyncio.run(ReportFetcher(config).summaries(["cmpl-x"]))
        assert summary == {"request_id": "cmpl-x", "status": "pending", "reason": summary["reason"], "flags": []}
        assert not slow.finished.is_set(), "the fetch waited for the slow sidecar instead of the deadline"
        down = PluginConfig.model_validate(
            {"slots": [{"layer": 1, "sae": "unused"}], "sidecar": {"address": f"127.0.0.1:{free_port()}"}}
        )
        [summary] = asyncio.run(ReportFetcher(down).summaries(["cmpl-y"]))
        assert summary["status"] == "pending"
    finally:
        server.stop(0)


def test_streaming_wrapper_inserts_one_chunk_before_done() -> None:
    """The chunk names the request by the key admission gave it, not by the client-chosen response id."""
    from circuitwatch.plugin.admission import Admission, Admitted, ClientContext
    from circuitwatch.plugin.responses import ActionListener, with_final_chunk

    class Fetcher:
        async def summaries(self, ids):
            return [{"request_id": i, "status": "complete", "flags": []} for i in ids]

    async def stream():
        yield 'data: {"id": "chatcmpl-a", "model": "m", "created": 5, "choices": []}\n\n'
        yield "data: [DONE]\n\n"

    client = ClientContext({}, [Admitted("chatcmpl-a-0123abcd", Admission(monitored=True))])
    actions = ActionListener(Fetcher())  # not started: no action stream, nothing aborted

    async def collect():
        return [c async for c in with_final_chunk(stream(), Fetcher(), 1, "chat.completion.chunk", client, actions)]

    chunks = asyncio.run(collect())
    assert chunks[-1] == "data: [DONE]\n\n" and len(chunks) == 3
    inserted = json.loads(chunks[1][len("data: ") :])
    assert inserted["circuitwatch"]["request_id"] == "chatcmpl-a.0123abcd"
    assert inserted["object"] == "chat.completion.chunk"
    client.admitted[0] = Admitted("chatcmpl-a-0123abcd", Admission(monitored=False))
    assert len(asyncio.run(collect())) == 2  # not monitored: no chunk added
