"""Through a real vLLM engine with the plugin: every code of every position of every request equals the
independent ground truth (transformers + reference encoder), in eager and in compiled mode, with chunked
prefill, shared prefixes and concurrent requests; greedy outputs are identical with the plugin on and off."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import grpc
import pytest

from circuitwatch.fixtures import FixturePaths
from circuitwatch.plugin.emitter import Emitter
from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto import circuitwatch_pb2_grpc as pb_grpc
from circuitwatch.sidecar import SidecarConfig
from circuitwatch.sidecar.server import start

from support.plugin_harness import ENGINE, GroundTruth, generate, prompts, write_plugin_config
from support.processes import free_port
from support.sidecar_harness import codes_in_sidecar

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def token_prompts(fixtures: FixturePaths):
    from transformers import AutoTokenizer

    return prompts(AutoTokenizer.from_pretrained(fixtures.model))


@pytest.fixture(scope="module")
def ground_truth(fixtures: FixturePaths) -> GroundTruth:
    return GroundTruth(fixtures)


@pytest.fixture(scope="module")
def plugin_off(fixtures: FixturePaths, token_prompts):
    os.environ.pop("CIRCUITWATCH_CONFIG", None)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return generate(fixtures, token_prompts, enforce_eager=False)


class SidecarStartedLate:
    """Starts the sidecar once QUEUED code batches wait in the plugin's emitter for it (or when asked for it).
    From then on each engine step waits for the emitter to reach it (up to a minute): an emitter that cannot
    deliver its queue when the engine shuts down gives it up, and a slow reconnect would race the end of the run."""

    QUEUED = 4

    def __init__(self, config: SidecarConfig, monkeypatch) -> None:
        self._config = config
        self._running = None
        self.queued = 0
        self._asked = threading.Event()
        self._started = threading.Event()
        submit = Emitter.submit_deferred

        def submit_once_connected(emitter: Emitter, build, ranges) -> None:
            if self._started.is_set():
                deadline = time.monotonic() + 60
                while not emitter.connected and time.monotonic() < deadline:
                    time.sleep(0.01)
            submit(emitter, build, ranges)

        monkeypatch.setattr(Emitter, "submit_deferred", submit_once_connected)
        self._thread = threading.Thread(target=self._start_when_queued, daemon=True)
        self._thread.start()

    def _start_when_queued(self) -> None:
        from circuitwatch.plugin.process import PROCESS

        while not self._asked.wait(0.005):
            emitter = PROCESS.code_emitter
            if emitter is not None and emitter.queue_depth >= self.QUEUED:
                self.queued = emitter.queue_depth
                break
        self._running = start(self._config)
        self._started.set()

    def running(self):
        self._asked.set()
        self._thread.join(120)
        return self._running


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "compiled"])
def test_codes_equal_ground_truth(
    fixtures: FixturePaths,
    tmp_path: Path,
    monkeypatch,
    token_prompts,
    ground_truth: GroundTruth,
    plugin_off,
    enforce_eager,
) -> None:
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    port = free_port()
    config = SidecarConfig(listen=f"127.0.0.1:{port}", evidence_dir=tmp_path / "evidence")
    # Eager: the sidecar comes up only once the engine's first steps wait in the emitter's queue (started after
    # the engine, or restarting), so the codes checked below went several engine steps to a message; the emitter
    # retries often, so the engine's steps wait for it only briefly (SidecarStartedLate).
    retry = {"reconnect_min_s": 0.05, "reconnect_max_s": 0.2} if enforce_eager else {}
    sidecar_target = {"address": f"127.0.0.1:{port}", **retry}
    # Compiled: the sidecar is up from the start, and each step's batch lingers for the steps behind it (up to a
    # step that finished requests), so the codes checked below went as the emitter joins them by waiting.
    linger = {} if enforce_eager else {"coalesce_linger_ms": 250}
    plugin_config = write_plugin_config(tmp_path / "plugin.json", fixtures, port, sidecar=sidecar_target, **linger)
    monkeypatch.setenv("CIRCUITWATCH_CONFIG", str(plugin_config))
    sidecar = SidecarStartedLate(config, monkeypatch) if enforce_eager else None
    running = None if enforce_eager else start(config)
    try:
        outputs = generate(fixtures, token_prompts, enforce_eager)
        running = sidecar.running() if sidecar is not None else running
        stub = pb_grpc.MonitorStub(grpc.insecure_channel(f"127.0.0.1:{running.port}"))

        # greedy outputs are identical with the plugin on and off
        assert [o[2] for o in outputs] == [o[2] for o in plugin_off]

        problems = {}
        for request_id, prompt, generated in outputs:
            report = stub.GetReport(pb.GetReportRequest(request_id=request_id, wait_ms=30_000), timeout=60)
            tokens = prompt + generated
            from circuitwatch.plugin.process import PROCESS

            notifier = PROCESS.finish_notifier
            assert report.status == pb.REPORT_STATUS_COMPLETE, (
                request_id,
                report.coverage,
                running.core.counters,
                notifier and notifier.has_own_stream and (notifier.emitter.counters, running.port),
            )
            assert report.coverage.positions_total == len(tokens) - 1
            assert report.coverage.positions_seen == len(tokens) - 1
            assert [s.layer for s in report.saes] == [1, 2, 3]
            found = ground_truth.mismatches(tokens, codes_in_sidecar(stub, request_id))
            if found:
                problems[request_id] = found[:5]
        assert not problems, problems
        # the engine core runs in this process beside the worker: finishes rode in the code batches of their steps
        from circuitwatch.plugin.process import PROCESS

        assert PROCESS.code_emitter is not None
        assert PROCESS.code_emitter.counters["finishes_in_batches"] >= len(outputs) // 2, PROCESS.code_emitter.counters
        if enforce_eager:  # the codes above went through the emitter's coalescing: joined slices, same codes
            # (a step that starts or finishes requests ends a run, so not every queued step is joined)
            assert (
                sidecar.queued >= SidecarStartedLate.QUEUED and PROCESS.code_emitter.counters["steps_coalesced"] > 0
            ), (
                sidecar.queued,
                PROCESS.code_emitter.counters,
            )
        else:  # the codes above went in messages that waited for later steps: joined slices, same codes
            assert PROCESS.code_emitter.counters["steps_lingered"] > 0, PROCESS.code_emitter.counters
        assert running.core.counters["duplicate_finishes"] == 0
        assert not PROCESS.finish_notifier.has_own_stream  # so the engine core opened no control stream
        assert len(outputs) >= 16
        assert any(len(p) > 128 for _, p, _ in outputs), "some prompts span several chunks and blocks"
    finally:
        running = sidecar.running() if sidecar is not None else running
        running.stop(1)


def test_preempted_requests_recompute_and_still_match(
    fixtures: FixturePaths, tmp_path: Path, monkeypatch, ground_truth: GroundTruth
) -> None:
    """6 KV blocks (768 tokens) for 8 concurrent requests: vLLM preempts and later recomputes them. The
    recomputed positions are encoded again; the sidecar keeps the later codes, which still equal ground truth."""
    from vllm import LLM, SamplingParams

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    running = start(SidecarConfig(listen="127.0.0.1:0", evidence_dir=tmp_path / "evidence"))
    try:
        monkeypatch.setenv(
            "CIRCUITWATCH_CONFIG", str(write_plugin_config(tmp_path / "plugin.json", fixtures, running.port))
        )
        llm = LLM(model=str(fixtures.model), enforce_eager=True, num_gpu_blocks_override=6, **ENGINE)
        # ~110-token prompts fit one 128-token block each; decoding 40 tokens crosses into a second block
        # while all 6 blocks are taken, so running requests must be preempted
        from transformers import AutoTokenizer

        from circuitwatch.fixtures.corpus import documents

        tokenizer = AutoTokenizer.from_pretrained(fixtures.model)
        chosen = [tokenizer(text)["input_ids"][: 105 + i] for i, text in enumerate(documents()[40:48])]
        params = SamplingParams(temperature=0.0, max_tokens=40, min_tokens=40)
        outputs = llm.generate([{"prompt_token_ids": p} for p in chosen], params)
        del llm
        stub = pb_grpc.MonitorStub(grpc.insecure_channel(f"127.0.0.1:{running.port}"))
        for output in outputs:
            tokens = list(output.prompt_token_ids) + list(output.outputs[0].token_ids)
            report = stub.GetReport(pb.GetReportRequest(request_id=output.request_id, wait_ms=30_000), timeout=60)
            assert report.status == pb.REPORT_STATUS_COMPLETE, (output.request_id, report.coverage)
            problems = ground_truth.mismatches(tokens, codes_in_sidecar(stub, output.request_id))
            assert not problems, (output.request_id, problems[:5])
        assert len(running.core.index.superseded) > 0, "no position was recomputed: the test did not preempt"
    finally:
        running.stop(1)
