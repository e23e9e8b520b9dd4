"""Plugin pieces without an engine: configuration, per-request controls, row maps (V1 and V2), the tap op under
torch.compile, and the emitter against a real sidecar through an outage."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import torch

from circuitwatch.kernels.hook_points import HookPoint
from circuitwatch.plugin.config import (
    PluginConfigError,
    SidecarTarget,
    load_plugin_config,
)
from circuitwatch.plugin.emitter import COALESCE_MAX_ROWS, COALESCE_MAX_STEPS, BuiltBatch, Emitter, batches_to_join
from circuitwatch.plugin.rowmap import rows_from_batch, rows_from_v1_runner, rows_from_v2_batch
from circuitwatch.plugin.taps import TAPS, install_taps
from circuitwatch.proto import FINISHES_IN_BATCHES_SINCE
from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto import circuitwatch_pb2_grpc as pb_grpc

from support.processes import free_port
from support.sidecar_harness import SyntheticRequest, manifest, running_sidecar

# --- configuration ------------------------------------------------------------------------------------------


def test_unconfigured_plugin_does_nothing() -> None:
    assert load_plugin_config(None, env={}) is None
    assert load_plugin_config({"other": 1}, env={}) is None


def test_config_file_and_additional_config(tmp_path: Path) -> None:
    (tmp_path / "sae").mkdir()
    path = tmp_path / "plugin.yaml"
    path.write_text("slots:\n  - {layer: 2, sae: sae}\nmonitor: opt-in\n")
    config = load_plugin_config(None, env={"CIRCUITWATCH_CONFIG": str(path)})
    assert config.slots[0].sae == tmp_path / "sae"  # relative to the file
    assert config.monitor == "opt-in" and config.prefix_cache == "bypass"
    overridden = load_plugin_config({"circuitwatch": {"monitor": "all"}}, env={"CIRCUITWATCH_CONFIG": str(path)})
    assert overridden.monitor == "all"
    # vLLM's compile cache is keyed by the taps only: a policy change reuses the compiled model, a new tap does not
    assert overridden.digest() == config.digest()
    moved = load_plugin_config(
        {"circuitwatch": {"slots": [{"layer": 3, "sae": "sae"}]}}, env={"CIRCUITWATCH_CONFIG": str(path)}
    )
    assert moved.digest() != config.digest()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("monitor: all\n", r"slots: Field required"),
        ("slots: []\n", r"slots: List should have at least 1 item"),
        ("slots: [{layer: -1, sae: x}]\n", r"slots.0.layer: Input should be greater than or equal to 0"),
        ("slots: [{layer: 1, sae: x}]\nmonitor: sometimes\n", r"monitor: Input should be 'all' or 'opt-in'"),
        (
            "slots: [{layer: 1, sae: x}]\nprefix_cache: read\n",
            r"prefix_cache: Input should be 'bypass' or 'accept_gaps'",
        ),
        ("slots: [{layer: 1, sae: x, k: 0}]\n", r"slots.0.k: Input should be greater than 0"),
        ("slots: [{layer: 1, sae: x}]\nsidecar: {adress: y}\n", r"sidecar.adress: Extra inputs are not permitted"),
        ("slots: [{layer: 1, sae: x}, {layer: 1, sae: x}]\n", r"slots\[1\] repeats layer 1"),
        (
            "slots: [{layer: 1, sae: x}]\ncoalesce_linger_ms: -5\n",
            r"coalesce_linger_ms: Input should be greater than or equal to 0",
        ),
        (
            "slots: [{layer: 1, sae: x}]\ncoalesce_linger_ms: 60000\n",
            r"coalesce_linger_ms: Input should be less than or equal to 1000",
        ),
        ("slots: [\n", r"not valid YAML"),
    ],
)
def test_config_errors_name_source_field_and_reason(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "plugin.yaml"
    path.write_text(text)
    with pytest.raises(PluginConfigError, match=message) as info:
        load_plugin_config(None, env={"CIRCUITWATCH_CONFIG": str(path)})
    assert str(path) in str(info.value)


# --- row maps -------------------------------------------------------------------------------------------------


def test_rows_from_batch_chunked_prefill_and_decode() -> None:
    # request a: decode at position 40; b: prefill chunk of positions 128..131 (prefix cached below 128);
    # c: first chunk 0..2
    rows = rows_from_batch(["a", "b", "c"], np.array([0, 1, 5, 8]), np.array([40, 128, 0]), np.arange(100, 108))
    assert rows.row_request.tolist() == [0, 1, 1, 1, 1, 2, 2, 2]
    assert rows.positions.tolist() == [40, 128, 129, 130, 131, 0, 1, 2]
    assert rows.token_ids.tolist() == list(range(100, 108))
    assert rows.first_computed.tolist() == [40, 128, 0]


def test_v1_runner_rows_ignore_padding() -> None:
    runner = SimpleNamespace(
        input_batch=SimpleNamespace(
            req_ids=["r1", "r2", None], num_reqs=2, num_computed_tokens_cpu=np.array([7, 0, 0])
        ),
        query_start_loc=SimpleNamespace(np=np.array([0, 1, 4, 0])),
        input_ids=SimpleNamespace(cpu=torch.arange(50, 60, dtype=torch.int32)),  # 10 rows, only 4 real
    )
    rows = rows_from_v1_runner(runner)
    assert rows.req_ids == ["r1", "r2"]
    assert rows.positions.tolist() == [7, 0, 1, 2]
    assert rows.token_ids.tolist() == [50, 51, 52, 53]


def test_v2_batch_rows() -> None:
    """The V2 runner cannot run on CPU here: a stand-in with its InputBatch's fields (names from vLLM 0.32's
    vllm/v1/worker/gpu/input_batch.py). Input ids live on the device there; rows past num_tokens are padding."""
    batch = SimpleNamespace(
        req_ids=["x", "y"],
        num_reqs=2,
        query_start_loc_np=np.array([0, 3, 5]),
        num_computed_tokens_np=np.array([10, 256]),
        num_tokens=5,
        input_ids=torch.arange(8),  # padded to 8
    )
    rows = rows_from_v2_batch(batch)
    assert rows.positions.tolist() == [10, 11, 12, 256, 257]
    assert rows.token_ids.tolist() == [0, 1, 2, 3, 4]
    batch.num_tokens = 6
    with pytest.raises(ValueError, match="query_start_loc ends at 5 but num_tokens is 6"):
        rows_from_v2_batch(batch)


# --- the tap op -----------------------------------------------------------------------------------------------


class _Layer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.linear(x), x  # (mlp output, residual), like vLLM's decoder layers


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = SimpleNamespace()
        self.layers = torch.nn.ModuleList([_Layer(), _Layer()])
        self.model = torch.nn.Module()
        self.model.layers = self.layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            out, residual = layer(x)
            x = out + residual
        return x


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_tap_runs_every_real_step_and_never_outside_one(compiled: bool) -> None:
    model = _Model()
    assert install_taps(model, [(1, HookPoint.RESID_POST)]) == {(1, HookPoint.RESID_POST)}
    run = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
    x = torch.randn(3, 4)
    run(x)  # a warm-up/profile-like call outside a step: nothing captured
    assert TAPS.end_step() == {}
    for _ in range(2):  # every real step, also after compilation
        TAPS.begin_step()
        y = torch.randn(3, 4)
        run(y)
        captured = TAPS.end_step()
        with torch.no_grad():
            h = model.layers[0](y)
            expected = model.layers[1].linear(h[0] + h[1]) + (h[0] + h[1])
        assert torch.allclose(captured[(1, HookPoint.RESID_POST)], expected, atol=1e-6)


# --- the emitter ------------------------------------------------------------------------------------------------


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll until the condition holds or the timeout passes; the caller asserts what it expects afterwards."""
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.002)


def submit_slices(emitter: Emitter, slices: list[pb.RequestSlice]) -> None:
    """A code batch already packed, submitted the way the worker submits its deferred batches."""
    ranges = [(s.request_id, s.slot, s.first_position, s.first_position + s.num_rows) for s in slices]
    emitter.submit_deferred(lambda: BuiltBatch(slices), ranges)


def test_emitter_counts_drops_during_an_outage_and_reports_them(tmp_path: Path) -> None:
    port = free_port()
    target = SidecarTarget(address=f"127.0.0.1:{port}", reconnect_min_s=0.05, reconnect_max_s=0.2)
    emitter = Emitter(target, manifest(), max_batches=2)
    request = SyntheticRequest.random(np.random.default_rng(3), "during-outage")
    for a, b in request.chunks(3):  # the sidecar is down: submitting never waits; the oldest batches are dropped
        submit_slices(emitter, [request.slice(0, a, b), request.slice(1, a, b)])
    emitter.submit(pb.IngestMessage(finish=request.finish()))
    chunks = len(request.chunks(3))
    assert emitter.counters["batches_dropped"] == chunks - 2
    from circuitwatch.sidecar import SidecarConfig
    from circuitwatch.sidecar.server import start

    running = start(SidecarConfig(listen=f"127.0.0.1:{port}", evidence_dir=tmp_path / "ev"))
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        report = pb_grpc.MonitorStub(channel).GetReport(
            pb.GetReportRequest(request_id="during-outage", wait_ms=10_000), timeout=20, wait_for_ready=True
        )
        assert report.status == pb.REPORT_STATUS_INCOMPLETE
        assert {g.reason for g in report.coverage.gaps} == {pb.GAP_REASON_SIDECAR_UNAVAILABLE}
        kept = request.chunks(3)[-2:]
        assert report.coverage.positions_seen == sum(b - a for a, b in kept)
        in_gaps = {(g.slot, p) for g in report.coverage.gaps for p in range(g.start, g.end)}  # adjacent ones merge
        assert in_gaps == {(s, p) for a, b in request.chunks(3)[:-2] for p in range(a, b) for s in (0, 1)}
    finally:
        emitter.close(2)
        running.stop(1)


def test_emitter_delivers_everything_when_the_sidecar_is_up(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    requests = [SyntheticRequest.random(rng, f"ok-{i}") for i in range(5)]
    with running_sidecar(tmp_path) as (running, client):
        emitter = Emitter(SidecarTarget(address=f"127.0.0.1:{running.port}"), manifest(), max_batches=1000)
        for request in requests:
            for a, b in request.chunks(4):
                submit_slices(emitter, [request.slice(0, a, b), request.slice(1, a, b)])
            emitter.submit(pb.IngestMessage(finish=request.finish()))
        for request in requests:
            assert client.report(request.request_id, wait_ms=10_000).status == pb.REPORT_STATUS_COMPLETE
        assert emitter.counters["batches_dropped"] == 0
        emitter.close(2)


def assert_codes_stored_exactly(port: int, requests: list[SyntheticRequest]) -> None:
    """The sidecar holds exactly each request's codes, position by position and slot by slot."""
    from support.sidecar_harness import codes_in_sidecar

    stub = pb_grpc.MonitorStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    for request in requests:
        expected = {
            (slot, p): (request.tokens[p], rows[p])
            for slot, rows in request.codes.items()
            for p in range(request.num_positions)
        }
        assert codes_in_sidecar(stub, request.request_id) == expected


def whole(request: SyntheticRequest) -> list[pb.RequestSlice]:
    """Every code of the request, one slice per slot and phase."""
    return [request.slice(s, a, b) for a, b in request.chunks(10_000) for s in (0, 1)]


def test_with_the_engine_core_in_process_a_code_batch_carries_the_finishes_of_its_step(tmp_path: Path) -> None:
    """The engine core in the emitter's process (uni-process executor) reports each step's end: the batch built in
    a step waits for it and carries the finish markers submitted behind it; the sidecar finalises from them."""
    rng = np.random.default_rng(5)
    carried, alone = SyntheticRequest.random(rng, "carried"), SyntheticRequest.random(rng, "alone")
    with running_sidecar(tmp_path) as (running, client):
        emitter = Emitter(SidecarTarget(address=f"127.0.0.1:{running.port}"), manifest(), max_batches=10)
        try:
            # no engine step reported yet: a finish is a message of its own, after the batch
            submit_slices(emitter, whole(alone))
            emitter.submit(pb.IngestMessage(finish=alone.finish()))
            assert client.report("alone", wait_ms=10_000).status == pb.REPORT_STATUS_COMPLETE
            assert emitter.counters["sent_finish"] == 1 and emitter.counters["finishes_in_batches"] == 0

            await_finishes_in_batches(emitter)
            emitter.engine_step_done()  # the engine core runs here: from now on batches wait for their step
            step_over = threading.Event()

            def build() -> BuiltBatch:  # the step's batch is packed while the engine still samples
                assert step_over.wait(10)
                return BuiltBatch(whole(carried))

            ranges = [(p.request_id, p.slot, p.first_position, p.first_position + p.num_rows) for p in whole(carried)]
            emitter.submit_deferred(build, ranges)
            emitter.submit(pb.IngestMessage(finish=carried.finish()))  # the scheduler frees the request
            emitter.engine_step_done()
            step_over.set()
            report = client.report("carried", wait_ms=10_000)
            assert report.status == pb.REPORT_STATUS_COMPLETE
            assert report.coverage.positions_seen == carried.num_positions
            assert emitter.counters["finishes_in_batches"] == 1 and emitter.counters["sent_finish"] == 1
            assert emitter.counters["engine_step_waits_timed_out"] == 0
            assert running.core.counters["duplicate_finishes"] == 0

            # a step whose end is not reported in time: the batch goes without waiting longer
            late = SyntheticRequest.random(rng, "late")
            submit_slices(emitter, whole(late))
            wait_until(lambda: emitter.counters["engine_step_waits_timed_out"] != 0)
            emitter.submit(pb.IngestMessage(finish=late.finish()))
            assert client.report("late", wait_ms=10_000).status == pb.REPORT_STATUS_COMPLETE
            assert emitter.counters["engine_step_waits_timed_out"] == 1 and emitter.counters["sent_finish"] == 2
            assert emitter.stats().engine_step_wait_timeouts == 1  # relayed to the sidecar's metrics
        finally:
            emitter.close(2)


def test_a_joined_message_takes_queued_batches_up_to_its_step_and_row_bounds_and_always_the_first() -> None:
    assert batches_to_join([]) == 0
    assert batches_to_join([5] * (COALESCE_MAX_STEPS + 3)) == COALESCE_MAX_STEPS
    assert batches_to_join([COALESCE_MAX_ROWS + 1, 1]) == 1  # the first goes even alone over the row bound
    assert batches_to_join([COALESCE_MAX_ROWS - 10, 10, 1]) == 2  # up to the bound exactly
    assert batches_to_join([COALESCE_MAX_ROWS - 10, 11, 1]) == 1  # not past it, even when a later one would fit
    assert batches_to_join(iter([64, 64, 64])) == 3  # any iterable: the emitter passes a view of its queue


@pytest.mark.parametrize("max_bytes", [None, 1], ids=["joined", "byte-bound"])
def test_code_batches_queued_behind_each_other_go_as_one_message_up_to_a_step_that_finished_requests(
    tmp_path: Path, monkeypatch, max_bytes: int | None
) -> None:
    """While the sending thread is held up (here: the build of the batch before them waits), engine steps queue up;
    the emitter then sends them as few code batches, each request's rows of a slot joined into one slice. A step that
    finished requests ends its message, which carries their finish markers, so no report waits for later steps'
    codes. The real sidecar stores exactly the codes each step had and finalises every request from the finishes
    inside the batches. With a byte bound below one step's codes, the rest of each run goes back to the queue:
    one message per step, in order, nothing lost."""
    from circuitwatch.plugin import emitter as emitter_module

    if max_bytes is not None:
        monkeypatch.setattr(emitter_module, "COALESCE_MAX_BYTES", max_bytes)
    rng = np.random.default_rng(9)
    requests = [SyntheticRequest.random(rng, f"queued-{i}") for i in range(2)]
    blocker, first = SyntheticRequest.random(rng, "blocker"), SyntheticRequest.random(rng, "first")
    with running_sidecar(tmp_path) as (running, client):
        emitter = Emitter(SidecarTarget(address=f"127.0.0.1:{running.port}"), manifest(), max_batches=100)
        try:
            submit_slices(emitter, whole(blocker))  # connects, and learns the sidecar reads finishes in batches
            emitter.submit(pb.IngestMessage(finish=blocker.finish()))
            assert client.report("blocker", wait_ms=10_000).status == pb.REPORT_STATUS_COMPLETE
            await_finishes_in_batches(emitter)
            emitter.engine_step_done()  # the engine core runs in this process
            batches_before = running.core.counters["batches"]
            building, hold = threading.Event(), threading.Event()

            def held() -> BuiltBatch:
                building.set()
                assert hold.wait(10)
                return BuiltBatch(whole(first))

            emitter.submit_deferred(held, [(p.request_id, p.slot, 0, p.num_rows) for p in whole(first)])
            assert building.wait(10)  # the sending thread is held up: what comes next queues behind
            emitter.submit(pb.IngestMessage(finish=first.finish()))
            emitter.engine_step_done()
            steps = [request.chunks(8) for request in requests]
            finishing_steps = {len(chunks) - 1 for chunks in steps}
            assert len(finishing_steps) == 2  # the requests finish at different steps: two messages
            for step in range(max(len(chunks) for chunks in steps)):
                pieces = [
                    request.slice(slot, *chunks[step])
                    for request, chunks in zip(requests, steps, strict=True)
                    if step < len(chunks)
                    for slot in (0, 1)
                ]
                submit_slices(emitter, pieces)
                for request, chunks in zip(requests, steps, strict=True):
                    if step == len(chunks) - 1:
                        emitter.submit(pb.IngestMessage(finish=request.finish()))
                emitter.engine_step_done()
            queued = emitter.queue_depth
            assert 3 <= queued <= 16
            hold.set()
            for request in [first, *requests]:
                report = client.report(request.request_id, wait_ms=10_000)
                assert report.status == pb.REPORT_STATUS_COMPLETE
                assert report.coverage.positions_seen == request.num_positions
            messages = 2 if max_bytes is None else queued  # one per finishing step, or one per step
            assert emitter.counters["steps_coalesced"] == queued - messages
            assert emitter.stats().steps_coalesced == queued - messages  # relayed to the sidecar's metrics
            assert running.core.counters["batches"] - batches_before == 1 + messages  # and the held batch
            assert emitter.counters["finishes_in_batches"] == 3 and emitter.counters["sent_finish"] == 1
            assert running.core.counters["duplicate_finishes"] == 0
            assert_codes_stored_exactly(running.port, requests)
        finally:
            emitter.close(2)


def test_finishes_stay_separate_messages_for_a_sidecar_that_does_not_announce_it_reads_them() -> None:
    """A sidecar older than contract 6 would ignore finishes inside batches (the requests would end incomplete at
    request_timeout_s): it announces no contract version, so the emitter keeps sending them on their own."""
    from concurrent import futures

    received: list[pb.IngestMessage] = []

    class OldSidecar(pb_grpc.MonitorServicer):
        def Ingest(self, request_iterator, context):  # noqa: N802 - the proto's name
            for message in request_iterator:
                received.append(message)
            return pb.IngestAck()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_MonitorServicer_to_server(OldSidecar(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    request = SyntheticRequest.random(np.random.default_rng(6), "old")
    emitter = Emitter(SidecarTarget(address=f"127.0.0.1:{port}"), manifest(), max_batches=10)
    try:
        emitter.engine_step_done()
        step_over = threading.Event()

        def build() -> BuiltBatch:
            assert step_over.wait(10)
            return BuiltBatch(whole(request))

        ranges = [(p.request_id, p.slot, p.first_position, p.first_position + p.num_rows) for p in whole(request)]
        emitter.submit_deferred(build, ranges)
        emitter.submit(pb.IngestMessage(finish=request.finish()))
        emitter.engine_step_done()
        step_over.set()
        wait_until(lambda: any(m.HasField("finish") for m in received))
        kinds = [m.WhichOneof("kind") for m in received]
        assert kinds == ["manifest", "codes", "finish"]
        assert not received[1].codes.finishes and emitter.counters["finishes_in_batches"] == 0
    finally:
        emitter.close(2)
        server.stop(0)


def await_finishes_in_batches(emitter: Emitter) -> None:
    """Until the connected sidecar's contract announcement is read (on a thread of its own) and says it reads
    finish markers inside code batches."""
    wait_until(lambda: emitter.sidecar_contract >= FINISHES_IN_BATCHES_SINCE)
    assert emitter.sidecar_contract >= FINISHES_IN_BATCHES_SINCE


def connected_with_finishes_in_batches(emitter: Emitter, client, rng: np.random.Generator) -> None:
    """Send one request the plain way (the emitter connects and learns that the sidecar reads finishes in
    batches), then report the engine core as running in the emitter's process."""
    first = SyntheticRequest.random(rng, f"connect-{rng.integers(1 << 30)}")
    submit_slices(emitter, whole(first))
    emitter.submit(pb.IngestMessage(finish=first.finish()))
    assert client.report(first.request_id, wait_ms=10_000).status == pb.REPORT_STATUS_COMPLETE
    await_finishes_in_batches(emitter)
    emitter.engine_step_done()


def run_steps(emitter: Emitter, requests: list[SyntheticRequest], rows_per_step: int) -> None:
    """The requests decoded side by side, `rows_per_step` positions a step: each step's batch, the finish markers
    of the requests it finished, then the end of the step, as vLLM's engine core in the worker's process does. The
    next step comes once the sending thread has taken the batch, so nothing queues behind a send."""
    steps = [request.chunks(rows_per_step) for request in requests]
    for step in range(max(len(chunks) for chunks in steps)):
        live = [(r, chunks) for r, chunks in zip(requests, steps, strict=True) if step < len(chunks)]
        submit_slices(emitter, [r.slice(slot, *chunks[step]) for r, chunks in live for slot in (0, 1)])
        for request, chunks in live:
            if step == len(chunks) - 1:
                emitter.submit(pb.IngestMessage(finish=request.finish()))
        emitter.engine_step_done()
        wait_until(lambda: not emitter.queue_depth)
        assert emitter.queue_depth == 0


def test_with_a_linger_code_batches_wait_for_later_steps_until_a_step_finishes_requests(tmp_path: Path) -> None:
    """coalesce_linger_ms: each step's batch waits for the steps behind it, and a step that finished requests ends
    the wait at once, its finish markers inside. With a linger far longer than the test, only the finishing steps
    can end a message: two requests finishing at different steps make exactly two messages, every step's codes
    land exactly (the real sidecar's stored codes), and both reports are complete without waiting for the linger."""
    rng = np.random.default_rng(11)
    requests = [SyntheticRequest.random(rng, f"linger-{i}") for i in range(2)]
    with running_sidecar(tmp_path) as (running, client):
        emitter = Emitter(SidecarTarget(address=f"127.0.0.1:{running.port}"), manifest(), max_batches=100, linger_s=600)
        try:
            connected_with_finishes_in_batches(emitter, client, rng)
            batches_before = running.core.counters["batches"]
            rows_per_step = 4
            assert len({len(r.chunks(rows_per_step)) for r in requests}) == 2  # they finish at different steps
            run_steps(emitter, requests, rows_per_step)
            for request in requests:
                report = client.report(request.request_id, wait_ms=10_000)
                assert report.status == pb.REPORT_STATUS_COMPLETE
                assert report.coverage.positions_seen == request.num_positions
            steps = max(len(r.chunks(rows_per_step)) for r in requests)
            assert running.core.counters["batches"] - batches_before == 2
            assert emitter.counters["steps_coalesced"] == steps - 2
            assert emitter.counters["steps_lingered"] == steps - 2  # every step joined by waiting for it
            assert emitter.counters["finishes_in_batches"] == 2  # and the connecting request's went alone:
            assert emitter.counters["sent_finish"] == 1
            assert_codes_stored_exactly(running.port, requests)
        finally:
            emitter.close(2)


def test_with_a_linger_a_batch_no_later_step_joins_goes_at_its_deadline(tmp_path: Path) -> None:
    """An engine that makes no further step (idle, or between requests): the lingering batch goes once linger_s
    has passed since it was submitted, not before, and not never."""
    rng = np.random.default_rng(12)
    request = SyntheticRequest.random(rng, "lingering")
    linger_s = 0.5
    with running_sidecar(tmp_path) as (running, client):
        emitter = Emitter(
            SidecarTarget(address=f"127.0.0.1:{running.port}"), manifest(), max_batches=100, linger_s=linger_s
        )
        try:
            connected_with_finishes_in_batches(emitter, client, rng)
            batches_before = running.core.counters["batches"]
            submitted = time.monotonic()
            submit_slices(emitter, whole(request))
            emitter.engine_step_done()  # the step finished no request
            # the batch counter moves before the batch's requests are opened (same lock), so wait for the request
            wait_until(lambda: running.core.is_open("lingering"))  # its codes are in; no finish yet
            assert time.monotonic() - submitted >= linger_s
            assert running.core.counters["batches"] == batches_before + 1
        finally:
            emitter.close(2)


def test_a_linger_has_no_effect_where_finish_markers_do_not_ride_in_code_batches(tmp_path: Path) -> None:
    """With vLLM's engine core in another process (no engine_step_done here) the emitter cannot tell a finishing
    step, so a lingering batch would hold reports back: every batch goes at once, whatever linger_s says."""
    rng = np.random.default_rng(13)
    request = SyntheticRequest.random(rng, "not-lingering")
    with running_sidecar(tmp_path) as (running, client):
        emitter = Emitter(SidecarTarget(address=f"127.0.0.1:{running.port}"), manifest(), max_batches=100, linger_s=600)
        try:
            for a, b in request.chunks(4):
                before = running.core.counters["batches"]
                submit_slices(emitter, [request.slice(0, a, b), request.slice(1, a, b)])
                wait_until(lambda before=before: running.core.counters["batches"] != before)
                assert running.core.counters["batches"] == before + 1  # one message per batch, none waiting
            emitter.submit(pb.IngestMessage(finish=request.finish()))
            assert client.report("not-lingering", wait_ms=10_000).status == pb.REPORT_STATUS_COMPLETE
            assert emitter.counters["steps_lingered"] == 0
            assert emitter.counters["linger_unavailable"] == len(request.chunks(4))  # logged once it lasts
        finally:
            emitter.close(2)


def test_a_run_lingering_when_the_stream_breaks_goes_to_the_next_sidecar(tmp_path: Path) -> None:
    """The sidecar goes away while a run waits for later steps: the run goes back to the queue, not into the
    broken stream, and the sidecar that comes up next gets it; the request's report is complete."""
    from circuitwatch.sidecar import SidecarConfig
    from circuitwatch.sidecar.server import start

    from support.sidecar_harness import Client

    rng = np.random.default_rng(14)
    request = SyntheticRequest.random(rng, "outlives-a-sidecar")
    port = free_port()
    target = SidecarTarget(address=f"127.0.0.1:{port}", reconnect_min_s=0.05, reconnect_max_s=0.2)
    emitter = Emitter(target, manifest(), max_batches=100, linger_s=600)
    running = start(SidecarConfig(listen=f"127.0.0.1:{port}", evidence_dir=tmp_path / "first"))
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=10)
        connected_with_finishes_in_batches(emitter, Client(channel, pb_grpc.MonitorStub(channel)), rng)
        steps = request.chunks(4)
        for a, b in steps[:-1]:  # every step but the last: they linger, waiting for the finishing one
            submit_slices(emitter, [request.slice(0, a, b), request.slice(1, a, b)])
            emitter.engine_step_done()
        wait_until(lambda: not emitter.queue_depth)  # the sending thread holds them
        assert emitter.queue_depth == 0 and running.core.counters["batches"] == 1  # only the connecting request's
        running.stop(grace_s=0.5)
        wait_until(lambda: emitter.queue_depth == len(steps) - 1)
        assert emitter.queue_depth == len(steps) - 1  # back in the queue, in order
        running = start(SidecarConfig(listen=f"127.0.0.1:{port}", evidence_dir=tmp_path / "second"))
        a, b = steps[-1]
        submit_slices(emitter, [request.slice(0, a, b), request.slice(1, a, b)])
        emitter.submit(pb.IngestMessage(finish=request.finish()))
        emitter.engine_step_done()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=10)
        report = Client(channel, pb_grpc.MonitorStub(channel)).report("outlives-a-sidecar", wait_ms=10_000)
        assert report.status == pb.REPORT_STATUS_COMPLETE
        assert report.coverage.positions_seen == request.num_positions
        assert emitter.counters["batches_dropped"] == 0
    finally:
        emitter.close(2)
        running.stop(1)


def test_a_finish_sent_inside_a_code_batch_is_resent_after_a_reconnect() -> None:
    from collections import Counter

    from circuitwatch.plugin.resend import ResendLog

    log = ResendLog(Counter())
    finish = pb.RequestFinish(request_id="in-batch", num_positions=3)
    log.sent(pb.IngestMessage(codes=pb.CodeBatch(step=1, finishes=[finish])), now=0.0)
    assert [m.finish for m in log.replay(now=1.0)] == [finish]


def test_gpu_compilation_settings_keep_vllm_attention_ops_and_split_at_the_tap() -> None:
    """CUDA graphs cannot be captured here; this checks the settings are valid for the installed vLLM."""
    from vllm.config.compilation import CompilationConfig

    from circuitwatch.plugin.gpu_compilation import gpu_compilation_config

    settings = gpu_compilation_config()
    assert settings["splitting_ops"][-1] == "circuitwatch::tap"
    assert set(CompilationConfig._attention_ops) <= set(settings["splitting_ops"])
    parsed = CompilationConfig(**settings)
    assert "circuitwatch::tap" in parsed.splitting_ops
    assert parsed.cudagraph_mode.name == "PIECEWISE"


def test_deferred_batch_that_fails_to_build_becomes_an_encoder_error_gap(tmp_path: Path) -> None:
    request = SyntheticRequest(request_id="broken", num_prompt=6, num_positions=6, tokens=list(range(6)))
    request.codes = {0: [{1: 1.0}] * 6, 1: [{1: 1.0}] * 6}
    with running_sidecar(tmp_path) as (running, client):
        emitter = Emitter(SidecarTarget(address=f"127.0.0.1:{running.port}"), manifest(), max_batches=10)

        def broken() -> list:
            raise RuntimeError("device copy failed")

        emitter.submit_deferred(
            lambda: BuiltBatch([request.slice(0, 0, 3), request.slice(1, 0, 3)]), [("broken", s, 0, 3) for s in (0, 1)]
        )
        emitter.submit_deferred(broken, [("broken", s, 3, 6) for s in (0, 1)])
        emitter.submit(pb.IngestMessage(finish=request.finish()))
        report = client.report("broken", wait_ms=10_000)
        assert report.status == pb.REPORT_STATUS_INCOMPLETE
        assert {(g.slot, g.start, g.end, g.reason) for g in report.coverage.gaps} == {
            (s, 3, 6, pb.GAP_REASON_ENCODER_ERROR) for s in (0, 1)
        }
        emitter.close(2)
