"""Sidecar benchmark: ingest throughput, circuit-query latency over a 10-minute window, report latency.

Two traffic shapes:
- bulk: one message per request with all its positions (large slices). Fills a real SidecarCore with >= 50M
  postings spread over 10 minutes (a simulated clock, so the window is real without waiting ten minutes), then
  times circuit queries over the index against the same queries answered with plain Python sets in the same
  process, and prints ratios.
- decode: shaped like a serving engine's steps: 64 concurrent requests of 512 positions (a 128-token prefill
  chunk, then one token per step), 2 slots, k = 64, one message per engine step carrying a slice per running
  request and slot, finish markers on their own control stream. Measured in process (one core) and through
  gRPC with the producer's two streams, with report latency after the last codes and the reports' status (through
  gRPC three ways: at a reader from the producer sending; in the sidecar from the last input arriving, DESIGN's
  target, as the reports' own timestamps say; from sending to the report final, split at the sidecar's read); the
  same traffic to a relay that reports each finish at once, with no monitoring, gives the transport's floor on
  this host, and the sidecar's CPU seconds give its postings per core. The sidecar serves its Prometheus
  endpoint, as deployments do; the paced lines say from its ingest histograms how many code batches took over
  10 ms of wall time and how many over 10 ms of the ingesting thread's CPU time (a tail with the first and not
  the second was the thread kept off the CPU, not the sidecar's own work).

- small steps: one request at a time, one row per engine step (a serving engine with one client), paced at 50
  and 200 steps/s: the CPU a real sidecar process uses per message, against a bare gRPC endpoint that drops
  the bytes unread (the transport's own share), and the sender's CPU per message.

Targets (DESIGN.md): >= 2.5M postings/s ingest per core, circuit query p99 <= 20 ms, report ready <= 5 ms after
the last codes.

    .venv/bin/python bench/sidecar_bench.py [--postings 50e6] [--queries 200] [--decode-steps 3000]
        [--only bulk|decode|circuits|small-steps]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from circuitwatch.plugin.emitter import COALESCE_MAX_STEPS, batches_to_join
from circuitwatch.proto import CONTRACT_VERSION
from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto import circuitwatch_pb2_grpc as pb_grpc
from circuitwatch.proto.codec import join_slices, pack_slice
from circuitwatch.sidecar import SidecarConfig
from circuitwatch.sidecar.circuits import parse_circuits
from circuitwatch.sidecar.core import SidecarCore
from circuitwatch.sidecar.expressions import All, AnyOf, AtLeast, Term
from circuitwatch.sidecar.server import start
from circuitwatch.sidecar.store import EvidenceStore

D_SAE = 16384
K = 16
LAYERS = (6, 12)
TOKENS_PER_REQUEST = 256
WINDOW_S = 600


def feature_densities(rng: np.random.Generator) -> np.ndarray:
    """Per-feature firing probability, log-normal over decades as SAE feature-density histograms are, scaled
    to K features per token on average; the densest features fire on roughly 10-30% of tokens."""
    density = 10 ** rng.normal(0.0, 0.6, D_SAE)
    return np.minimum(density * K / density.sum(), 0.3)


DENSITIES = feature_densities(np.random.default_rng(1234))
BY_DENSITY = np.argsort(-DENSITIES)


def popular(rank: int) -> int:
    """Id of the rank-th densest feature."""
    return int(BY_DENSITY[rank])


# Popular features: the heavy end of the workload (a rare feature's query is cheaper).
QUERIES = {
    "single feature": {"layer": 6, "feature": popular(3)},
    "all (2 layers)": {"all": [{"layer": 6, "feature": popular(1)}, {"layer": 12, "feature": popular(2)}]},
    "any + threshold": {
        "any": [{"layer": 6, "feature": popular(5), "min_activation": 1.0}, {"layer": 12, "feature": popular(8)}]
    },
    "at_least 2 of 3": {
        "at_least": {
            "n": 2,
            "of": [
                {"layer": 6, "feature": popular(4)},
                {"layer": 6, "feature": popular(6)},
                {"layer": 12, "feature": popular(7)},
            ],
        }
    },
    "windowed (8 tokens)": {"all": [{"layer": 6, "feature": popular(10)}, {"layer": 12, "feature": popular(12)}]},
}
WINDOWS = {"windowed (8 tokens)": 8}


class SimulatedClock:
    def __init__(self) -> None:
        self.now = time.time_ns() - WINDOW_S * 10**9

    def __call__(self) -> int:
        return self.now


def manifest() -> pb.Manifest:
    return pb.Manifest(
        contract_version=CONTRACT_VERSION,
        model="bench",
        instance_id="bench",
        slots=[
            pb.SaeSlot(
                slot=i,
                name=f"l{layer}",
                architecture="topk",
                layer=layer,
                hook_point="resid_post",
                d_in=4096,
                d_sae=D_SAE,
                weights_hash=f"blake2b:{layer:04d}",
                selection=f"topk:k={K}",
            )
            for i, layer in enumerate(LAYERS)
        ],
    )


def sample_features(rng: np.random.Generator, rows: int) -> np.ndarray:
    """K distinct features per row drawn by density (Gumbel top-k)."""
    scores = np.log(DENSITIES)[None, :] + rng.gumbel(size=(rows, D_SAE))
    return np.argpartition(-scores, K, axis=1)[:, :K].astype(np.uint32)


def make_batches(rng: np.random.Generator, requests: int, templates: int = 16) -> list[pb.IngestMessage]:
    """Code batches (one request, both slots, all positions per batch) and finishes, built once, replayed."""
    rows = TOKENS_PER_REQUEST
    features = [sample_features(rng, rows) for _ in range(templates)]
    acts = [rng.gamma(2.0, 0.6, size=(rows, K)).astype(np.float16) for _ in range(templates)]
    offsets = np.arange(0, rows * K + 1, K, dtype=np.uint32)
    out = []
    for i in range(requests):
        t = i % templates
        slices = [
            pack_slice(
                f"req-{i}",
                slot,
                0,
                pb.PHASE_PROMPT,
                np.zeros(rows, np.uint32),
                offsets,
                features[(t + slot) % templates].ravel(),
                acts[t].ravel(),
            )
            for slot in range(len(LAYERS))
        ]
        out.append(pb.IngestMessage(codes=pb.CodeBatch(step=i + 1, slices=slices)))
        out.append(
            pb.IngestMessage(finish=pb.RequestFinish(request_id=f"req-{i}", num_prompt_tokens=rows, num_positions=rows))
        )
    return out


def fill(
    core: SidecarCore, clock: SimulatedClock, batches: list[pb.IngestMessage], target: int
) -> tuple[float, int, list[float], float, int]:
    """Ingest until `target` postings, spread evenly over the window, doing every 100 requests what the
    maintenance thread does for the request-level index. Returns (ingest seconds, postings, finalise ms,
    maintenance seconds, requests)."""
    stream = core.open_stream(manifest())
    per_request = TOKENS_PER_REQUEST * K * len(LAYERS)
    requests = int(np.ceil(target / per_request))
    step_ns = int(0.97 * WINDOW_S * 10**9) // requests  # everything stays inside the window
    elapsed, finalise_ms, maintenance = 0.0, [], 0.0
    for i in range(requests):
        codes, finish = batches[(2 * i) % len(batches)], batches[(2 * i + 1) % len(batches)]
        codes.codes.step = i + 1
        for s in codes.codes.slices:
            s.request_id = f"req-{i}"
        finish.finish.request_id = f"req-{i}"
        clock.now += step_ns
        t0 = time.perf_counter()
        core.ingest(stream, codes)
        t1 = time.perf_counter()
        core.ingest(stream, finish)
        t2 = time.perf_counter()
        elapsed += t2 - t0
        finalise_ms.append((t2 - t1) * 1e3)
        if i % 100 == 99 or i == requests - 1:  # what the maintenance thread does, timed apart
            core.index.seal_due()  # seals the token index's active segment when due (outside the ingest lock)
            core.request_index.seal(core.lock)  # reduces the requests finalised since, seals full segments
            maintenance += time.perf_counter() - t2
    return elapsed, requests * per_request, finalise_ms, maintenance, requests


# --- the plain-Python baseline ----------------------------------------------------------------------------


def python_postings(core: SidecarCore, terms: list[Term]) -> dict[tuple[int, int], dict[int, float]]:
    """(gslot, feature) -> {token key: activation} for the queried features, as plain Python dicts."""
    wanted = {(LAYERS.index(t.layer), t.feature) for t in terms}
    postings: dict[tuple[int, int], dict[int, float]] = {}
    for segment in core.index.segments():
        features = (segment.term_codes & np.uint64((1 << 28) - 1)).astype(np.int64).tolist()
        gslots = (segment.term_codes >> np.uint64(28)).astype(np.int64).tolist()
        for i, (g, f) in enumerate(zip(gslots, features, strict=True)):
            if (g, f) in wanted:
                a, b = segment.term_offsets[i], segment.term_offsets[i + 1]
                keys = segment.row_keys[segment.post_rows[a:b]].tolist()
                postings.setdefault((g, f), {}).update(zip(keys, segment.post_acts[a:b].tolist(), strict=True))
    return postings


def python_evaluate(expr, postings: dict, window: int = 1, universe: set[int] | None = None) -> set[int]:
    if isinstance(expr, Term):
        hits = postings.get((LAYERS.index(expr.layer), expr.feature), {})
        keys = {k for k, act in hits.items() if act >= expr.min_activation}
        return {k + d for k in keys for d in range(window)} & universe if window > 1 else keys
    if isinstance(expr, All):
        result = python_evaluate(expr.items[0], postings, window, universe)
        for item in expr.items[1:]:
            result = result & python_evaluate(item, postings, window, universe)
        return result
    if isinstance(expr, AnyOf):
        return set().union(*(python_evaluate(i, postings, window, universe) for i in expr.items))
    if isinstance(expr, AtLeast):
        counts: dict[int, int] = {}
        for item in expr.items:
            for key in python_evaluate(item, postings, window, universe):
                counts[key] = counts.get(key, 0) + 1
        return {k for k, c in counts.items() if c >= expr.n}
    raise TypeError(expr)


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[int(0.9 * (len(ordered) - 1))], ordered[int(0.99 * (len(ordered) - 1))]


def grpc_ingest(batches: list[pb.IngestMessage], seconds: float) -> float:
    """Postings/s through a real server on 127.0.0.1 (one client stream)."""
    with tempfile.TemporaryDirectory() as tmp:
        running = start(SidecarConfig(listen="127.0.0.1:0", evidence_dir=Path(tmp)))
        try:
            channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
            stub = pb_grpc.MonitorStub(channel)
            deadline = time.perf_counter() + seconds
            sent = [0]

            def messages():
                yield pb.IngestMessage(manifest=manifest())
                i = 0
                while time.perf_counter() < deadline:
                    codes, finish = batches[(2 * i) % len(batches)], batches[(2 * i + 1) % len(batches)]
                    codes.codes.step = i + 1
                    for s in codes.codes.slices:
                        s.request_id = f"g-{i}"
                    finish.finish.request_id = f"g-{i}"
                    sent[0] += TOKENS_PER_REQUEST * K * len(LAYERS)
                    yield codes
                    yield finish
                    i += 1

            t0 = time.perf_counter()
            ack = stub.Ingest(messages())
            elapsed = time.perf_counter() - t0
            assert ack.postings == sent[0]
            channel.close()
            return sent[0] / elapsed
        finally:
            running.stop(1)


# --- decode-shaped traffic ----------------------------------------------------------------------------------

DECODE_CONCURRENCY = 64
DECODE_POSITIONS = 512  # computed positions per request: a 128-token prefill chunk, then one per step
DECODE_PROMPT = 128
DECODE_K = 64
GET_REPORTS_IN_FLIGHT = 4  # GetReport calls waiting at once, for the next requests to finish


# The emitter's linger in the bench's line for it (the plugin's coalesce_linger_ms; off by default).
BENCH_LINGER_S = 0.1


def decode_manifest() -> pb.Manifest:
    m = manifest()
    for slot in m.slots:
        slot.selection = f"topk:k={DECODE_K}"
    return m


def decode_steps(rng: np.random.Generator, steps: int) -> list[tuple[pb.IngestMessage, list[pb.IngestMessage]]]:
    """Per engine step: (its code batch, the finish markers of the requests whose last codes it carries).
    Requests start one per step until DECODE_CONCURRENCY run, and a new one starts whenever one finishes."""
    pool = 8192  # rows of codes drawn once, reused at random (drawing k of 16384 per row is the slow part)
    scores = np.log(DENSITIES)[None, :] + rng.gumbel(size=(pool, D_SAE))
    rows = np.argpartition(-scores, DECODE_K, axis=1)[:, :DECODE_K].astype(np.uint32)
    acts = rng.gamma(2.0, 0.6, size=(pool, DECODE_K)).astype(np.float16)
    running: dict[str, int] = {}  # request -> next position
    started = 0
    out = []
    for step in range(steps):
        if len(running) < DECODE_CONCURRENCY:
            running[f"d-{started}"] = 0
            started += 1
        slices, finishes = [], []
        for request_id, position in list(running.items()):
            count = DECODE_PROMPT if position == 0 else 1
            phase = pb.PHASE_PROMPT if position < DECODE_PROMPT else pb.PHASE_GENERATED
            for slot in range(len(LAYERS)):
                picked = rng.integers(0, pool, count)
                offsets = np.arange(0, count * DECODE_K + 1, DECODE_K, dtype=np.uint32)
                slices.append(
                    pack_slice(
                        request_id,
                        slot,
                        position,
                        phase,
                        np.zeros(count, np.uint32),
                        offsets,
                        rows[picked].ravel(),
                        acts[picked].ravel(),
                    )
                )
            running[request_id] = position + count
            if position + count >= DECODE_POSITIONS:
                del running[request_id]
                finish = pb.RequestFinish(
                    request_id=request_id,
                    num_prompt_tokens=DECODE_PROMPT,
                    num_generated_tokens=DECODE_POSITIONS - DECODE_PROMPT + 1,
                    num_positions=DECODE_POSITIONS,
                )
                finishes.append(pb.IngestMessage(finish=finish))
        out.append((pb.IngestMessage(codes=pb.CodeBatch(step=step + 1, slices=slices)), finishes))
    return out


def step_rows(codes: pb.IngestMessage) -> int:
    return sum(piece.num_rows for piece in codes.codes.slices)


def next_run(
    traffic, first: int, made: int, end_at_finish: bool
) -> list[tuple[pb.IngestMessage, list[pb.IngestMessage]]]:
    """The engine steps the plugin's emitter sends in one message from `first` on, when steps up to `made` are
    queued: as many as its bounds allow (`batches_to_join`; its byte bound never binds here: 8,192 rows of 64 codes
    are ~3.2 MB), at least one; with `end_at_finish` (finish markers in its queue: the engine core in its process),
    up to the first step that finished requests."""
    queued = traffic[first : max(made, first + 1)]
    if end_at_finish:
        finishing = next((i for i, (_, finishes) in enumerate(queued) if finishes), len(queued) - 1)
        queued = queued[: finishing + 1]
    return queued[: batches_to_join(step_rows(codes) for codes, _ in queued)]


def joined(run) -> tuple[pb.IngestMessage, list[pb.IngestMessage]]:
    """One message for a run of engine steps, as the emitter sends it: each request's rows of a slot in one slice
    (join_slices), the step number of the last; and the run's finish markers."""
    if len(run) == 1:
        return run[0]
    slices = join_slices([piece for codes, _ in run for piece in codes.codes.slices])
    batch = pb.CodeBatch(step=run[-1][0].codes.step, slices=slices)
    return pb.IngestMessage(codes=batch), [f for _, finishes in run for f in finishes]


def coalesced_traffic(traffic) -> list[tuple[pb.IngestMessage, list[pb.IngestMessage]]]:
    """The same codes as the emitter sends them when every step is queued already (a sidecar that cannot keep
    up) and the engine core runs in its process: each message as many engine steps as its bounds allow, up to
    one that finished requests."""
    out, first = [], 0
    while first < len(traffic):
        run = next_run(traffic, first, len(traffic), end_at_finish=True)
        out.append(joined(run))
        first += len(run)
    return out


def decode_in_process(traffic) -> tuple[float, list[float], Counter]:
    """(postings/s on one core, report latency ms after the last codes, report statuses). Finish markers go in
    just before the step that carries their requests' last codes: the worst order for report latency."""
    with tempfile.TemporaryDirectory() as tmp:
        config = SidecarConfig(evidence_dir=Path(tmp), index={"window_s": WINDOW_S, "memory_budget_mb": 16384})
        core = SidecarCore(config, EvidenceStore(Path(tmp)))
        finished: dict[str, float] = {}
        statuses: Counter = Counter()

        def listener(report: pb.Report) -> None:
            finished[report.request_id] = time.perf_counter()
            statuses[pb.ReportStatus.Name(report.status)] += 1

        core.watchers.listeners.append(listener)
        codes_stream = core.open_stream(decode_manifest())
        control = core.open_stream(pb.Manifest(contract_version=CONTRACT_VERSION, instance_id="bench-engine"))
        latencies, postings, elapsed = [], 0, 0.0
        for codes, finishes in traffic:
            t0 = time.perf_counter()
            for finish in finishes:
                core.ingest(control, finish)
            t1 = time.perf_counter()
            core.ingest(codes_stream, codes)
            t2 = time.perf_counter()
            elapsed += t2 - t0
            postings += sum(len(s.feature_ids) // 4 for s in codes.codes.slices)
            latencies += [
                (finished[f.finish.request_id] - t1) * 1e3 for f in finishes if f.finish.request_id in finished
            ]
            if codes.codes.step % 50 == 0:  # what the maintenance thread does, outside the timing
                core.index.seal_due()
                core.maintain_request_index()
        return postings / elapsed, latencies, statuses


def _produce(
    port: int,
    steps: int,
    steps_per_s: float | None,
    out: str,
    finishes_in_batch: bool = False,
    coalesce: bool = False,
    linger_s: float = 0.0,
) -> None:
    """The producer, in its own process as the plugin's worker and engine core are: the code stream and the
    control stream with finish markers, or (`finishes_in_batch`, as the plugin sends them when the engine core
    runs in the worker's process) the finish markers inside the code batch of the step that finished their
    requests. With `coalesce`, the engine steps made while the stream was busy go as one message, as the plugin's
    emitter sends the batches queued behind each other; with `linger_s` too, a message also takes the steps made
    within linger_s of its first, ending at one that finished requests (sent when that step is made) or at the
    deadline, as the emitter does with the plugin's coalesce_linger_ms. Writes when each request's last codes were
    sent (wall clock, ns): with a linger, that is when the step that finished it was made."""
    import json
    import threading

    traffic = decode_steps(np.random.default_rng(7), steps)
    stub = pb_grpc.MonitorStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    sent_last: dict[str, int] = {}
    code_messages = [0]
    finish_queue: list = []
    lock = threading.Condition()

    def codes_stream():
        yield pb.IngestMessage(manifest=decode_manifest())
        began = time.perf_counter()
        first = 0
        lingering = bool(linger_s and steps_per_s)
        while first < len(traffic):
            if steps_per_s:
                time.sleep(max(0.0, began + first / steps_per_s - time.perf_counter()))
                made = min(len(traffic), int((time.perf_counter() - began) * steps_per_s) + 1)
            else:
                made = len(traffic)
            if lingering:  # the steps made within the linger join too
                deadline = began + first / steps_per_s + linger_s
                made = max(made, min(len(traffic), int((deadline - began) * steps_per_s) + 1))
            # the steps the engine has made by now wait in the emitter's queue: with coalescing, they go together
            run = next_run(traffic, first, made, finishes_in_batch) if coalesce else traffic[first : first + 1]
            first += len(run)
            if lingering:  # sent when its last step is made, or at the deadline if no step ended it
                ended_early = first < made or bool(run[-1][1])
                send_at = began + (first - 1) / steps_per_s if ended_early else deadline
                time.sleep(max(0.0, send_at - time.perf_counter()))
            codes, finishes = joined(run)
            if finishes_in_batch:
                codes.codes.finishes.extend(f.finish for f in finishes)
            else:
                with lock:
                    finish_queue.extend(finishes)
                    lock.notify()
            now = time.time_ns()
            for f in finishes:
                sent_last[f.finish.request_id] = now
            code_messages[0] += 1
            yield codes
        with lock:
            finish_queue.append(None)
            lock.notify()

    def control_stream():
        yield pb.IngestMessage(manifest=pb.Manifest(contract_version=CONTRACT_VERSION, instance_id="engine"))
        while True:
            with lock:
                while not finish_queue:
                    lock.wait()
                batch, finish_queue[:] = list(finish_queue), []
            for item in batch:
                if item is None:
                    return
                yield item

    control = threading.Thread(target=lambda: stub.Ingest(control_stream()), daemon=True)
    control.start()
    t0 = time.perf_counter()
    ack = stub.Ingest(codes_stream())
    elapsed = time.perf_counter() - t0
    control.join(60)
    Path(out).write_text(
        json.dumps({"postings": ack.postings, "seconds": elapsed, "sent_last": sent_last, "messages": code_messages[0]})
    )


@dataclass(frozen=True)
class IngestTimes:
    """The sidecar's code batches as its own ingest histograms count them (circuitwatch_ingest_batch_duration_seconds
    and _cpu_time_seconds): how many took over SLOW_BATCH_S of wall time, and how many over that of the ingesting
    thread's CPU time. Many more slow by wall than by CPU: the thread was kept off the CPU (the host, the other
    threads); as many by CPU: the sidecar's own work was that slow."""

    batches: int
    slow_by_wall: int
    slow_by_cpu: int

    def __sub__(self, before: IngestTimes) -> IngestTimes:
        return IngestTimes(
            self.batches - before.batches,
            self.slow_by_wall - before.slow_by_wall,
            self.slow_by_cpu - before.slow_by_cpu,
        )

    def describe(self) -> str:
        return (
            f"code batches over {SLOW_BATCH_S * 1e3:.0f} ms: {self.slow_by_wall} by wall time, {self.slow_by_cpu} by "
            f"the ingesting thread's CPU time, of {self.batches}"
        )


SLOW_BATCH_S = 0.01  # a bucket bound of the sidecar's latency histograms (telemetry.LATENCY_BUCKETS_S)


def ingest_times(metrics_port: int) -> IngestTimes:
    """The sidecar's ingest histograms, scraped from its Prometheus endpoint now."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {
        (sample.name, sample.labels.get("le")): sample.value
        for family in text_string_to_metric_families(text)
        if family.name.startswith("circuitwatch_ingest_batch_")
        for sample in family.samples
    }
    wall, cpu = "circuitwatch_ingest_batch_duration_seconds", "circuitwatch_ingest_batch_cpu_time_seconds"
    batches, bound = int(samples.get((f"{wall}_count", None), 0)), repr(SLOW_BATCH_S)
    wall_within = int(samples.get((f"{wall}_bucket", bound), 0))
    cpu_within = int(samples.get((f"{cpu}_bucket", bound), 0))
    return IngestTimes(batches, batches - wall_within, batches - cpu_within)


@dataclass
class GrpcRun:
    rate: float  # postings/s
    latencies: dict[str, list[float]]  # ms from sending a request's last codes to its report, per reader
    # ms from the sidecar receiving a report's last input (its last codes or finish) to the report final, as the
    # reports say (Report.inputs_received_unix_nanos, finalized_unix_nanos): DESIGN's "after its last codes arrive"
    in_sidecar: list[float]
    # ms from sending a request's last codes to the sidecar reading them off its stream (both processes read this
    # host's one wall clock): the transport, and any wait in it while the sidecar was busy with earlier messages
    to_sidecar: list[float]
    # ms from sending a request's last codes to its report final in the sidecar: the two above, with nothing between
    # the producer and the report left out (only the way back to a reader)
    sent_to_final: list[float]
    statuses: Counter
    endpoint_cpu_s: float  # CPU seconds of the endpoint's process while the producer ran
    messages: int  # code messages the producer sent
    ingest: IngestTimes | None  # the sidecar's code batches while the producer ran (None: the relay)


def decode_through_grpc(
    steps: int,
    steps_per_s: float | None = None,
    get_reports: int = 0,
    finishes_in_batch: bool = False,
    relay: bool = False,
    coalesce: bool = False,
    linger_s: float = 0.0,
) -> GrpcRun:
    """The real sidecar server (the CLI, in its own process as deployed) on 127.0.0.1, the producer in another
    process, and the reports read here, from outside the sidecar's process: on a WatchReports stream, and (with
    `get_reports` > 0) by that many GetReport calls at a time that wait for the next requests' reports as the
    plugin's API server does. As fast as the producer sends, the latency includes the queue it builds up.

    `relay` puts the bench's relay endpoint (relay_process) where the sidecar was: the same transport, and no
    monitoring at all, so its latency is this host's floor for any Python gRPC sidecar."""
    import json
    import multiprocessing
    import threading

    from serving_bench import process_cpu_seconds

    endpoint = relay_process if relay else sidecar_process
    with tempfile.TemporaryDirectory() as tmp, endpoint(Path(tmp)) as receiver:
        port = receiver.port
        stub = pb_grpc.MonitorStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        arrived: dict[str, dict[str, int]] = {"watch": {}, "get": {}}
        statuses: Counter = Counter()
        received: dict[str, tuple[int, int]] = {}  # request id -> (inputs received, finalized), the sidecar's clock
        watch = stub.WatchReports(pb.WatchReportsRequest())
        stop = threading.Event()

        def follow() -> None:
            try:
                for report in watch:
                    arrived["watch"][report.request_id] = time.time_ns()
                    statuses[pb.ReportStatus.Name(report.status)] += 1
                    if report.inputs_received_unix_nanos:
                        received[report.request_id] = report.inputs_received_unix_nanos, report.finalized_unix_nanos
            except grpc.RpcError:
                pass

        def wait_for_reports(first: int, stride: int) -> None:
            """Requests finish in the order they started (d-0, d-1, ...): wait for every stride-th one's report,
            asking again while it is not final (not started yet, or still running)."""
            number = first
            while not stop.is_set():
                try:
                    request = pb.GetReportRequest(request_id=f"d-{number}", wait_ms=2000)
                    report = stub.GetReport(request, timeout=5)
                except grpc.RpcError:  # not started within the wait (NOT_FOUND), or the server stopping
                    stop.wait(0.01)
                    continue
                if report.status != pb.REPORT_STATUS_PENDING:
                    arrived["get"][report.request_id] = time.time_ns()
                    number += stride

        readers = [threading.Thread(target=follow, daemon=True)]
        readers += [
            threading.Thread(target=wait_for_reports, args=(k, get_reports), daemon=True) for k in range(get_reports)
        ]
        for reader in readers:
            reader.start()
        time.sleep(0.2)
        out = str(Path(tmp) / "producer.json")
        producer = multiprocessing.get_context("spawn").Process(
            target=_produce, args=(port, steps, steps_per_s, out, finishes_in_batch, coalesce, linger_s)
        )
        cpu_before = process_cpu_seconds(receiver.pid)
        ingest_before = ingest_times(receiver.metrics_port) if receiver.metrics_port else None
        producer.start()
        producer.join()
        endpoint_cpu_s = process_cpu_seconds(receiver.pid) - cpu_before
        ingest = ingest_times(receiver.metrics_port) - ingest_before if ingest_before is not None else None
        result = json.loads(Path(out).read_text())
        deadline = time.monotonic() + 30
        while len(arrived["watch"]) < len(result["sent_last"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        watch.cancel()
        latencies = {
            reader: [(times[r] - t) / 1e6 for r, t in result["sent_last"].items() if r in times]
            for reader, times in arrived.items()
        }
        in_sidecar = [(final - got) / 1e6 for got, final in received.values()]
        sent = [(received[r], t) for r, t in result["sent_last"].items() if r in received]
        to_sidecar = [(got - t) / 1e6 for (got, _), t in sent]
        sent_to_final = [(final - t) / 1e6 for (_, final), t in sent]
        rate = result["postings"] / result["seconds"]
        return GrpcRun(
            rate, latencies, in_sidecar, to_sidecar, sent_to_final, statuses, endpoint_cpu_s, result["messages"], ingest
        )


def random_circuits(rng: np.random.Generator, count: int, dense: bool) -> list[dict]:
    """Circuits as operators write them: one to three terms over both layers, all / any / at_least, some with
    a co-occurrence window, a few with `not`. Features drawn uniformly (as circuits name specific features), or
    by density (`dense`: the heavy end, where most circuits fire in a long request)."""
    circuits = []
    weights = DENSITIES / DENSITIES.sum() if dense else None
    for i in range(count):
        terms = [
            {"layer": int(rng.choice(LAYERS)), "feature": int(rng.choice(D_SAE, p=weights))}
            for _ in range(int(rng.integers(1, 4)))
        ]
        kind = rng.choice(["single", "all", "any", "at_least", "not"], p=[0.3, 0.3, 0.2, 0.1, 0.1])
        if kind == "single" or len(terms) == 1:
            when = terms[0]
        elif kind == "at_least":
            when = {"at_least": {"n": 2, "of": terms}}
        elif kind == "not":
            when = {"all": [terms[0], {"not": terms[1]}]}
        else:
            when = {kind: terms}
        circuit = {"name": f"c{i}", "when": when}
        if rng.random() < 0.2:
            circuit["window"] = int(rng.integers(2, 16))
        circuits.append(circuit)
    return circuits


def circuits_section() -> None:
    """Report cost against the number of circuits: one 512-position request (k = 64, 2 slots) finalised under
    250 to 2,000 circuits. Evaluation shares term lookups across circuits and skips circuits whose terms never
    fired, so the cost grows at most linearly (it grew ~n^2.8 before: 2,000 circuits took 10 s)."""
    rng = np.random.default_rng(11)
    traffic = decode_steps(np.random.default_rng(3), 520)  # request d-0 runs alone from step 0 to 385
    print("\nreport for one 512-position request (k=64, 2 slots) under many circuits (median of 5):")
    print(
        f"{'features':<9} {'circuits':>9} {'flagged':>8} {'evaluate ms':>12} {'report ms':>10} "
        f"{'report ms/circuit':>18}"
    )
    for dense in (False, True):
        for count in (250, 1000, 2000):
            with tempfile.TemporaryDirectory() as tmp:
                core = SidecarCore(SidecarConfig(evidence_dir=Path(tmp)), EvidenceStore(Path(tmp)))
                circuits = parse_circuits({"circuits": random_circuits(rng, count, dense)}, "bench")
                core.set_circuits(type(core.circuits)(tuple(circuits)))
                codes_stream = core.open_stream(decode_manifest())
                finish = None
                for codes, finishes in traffic:
                    core.ingest(codes_stream, codes)
                    finish = next((f for f in finishes if f.finish.request_id == "d-0"), finish)
                    if finish is not None:
                        break
                state = core._open["d-0"]
                state.ensure_plan(core._plan_for, core.circuits.version)
                evaluate, report_ms = [], []
                for _ in range(5):
                    t0 = time.perf_counter()
                    evaluator = state.evaluator(DECODE_PROMPT, np.arange(DECODE_POSITIONS))
                    evaluator.match_all(core.circuits)
                    t1 = time.perf_counter()
                    report = core.reports.build(state, finish.finish, core.circuits, core.clock())
                    evaluate.append((t1 - t0) * 1e3)
                    report_ms.append((time.perf_counter() - t1) * 1e3)
                ms = statistics.median(report_ms)
                print(
                    f"{'density' if dense else 'uniform':<9} {count:>9} {len(report.flags):>8} "
                    f"{statistics.median(evaluate):>12.1f} {ms:>10.1f} {ms / count:>18.4f}"
                )
    print("target: 2,000 circuits evaluated over a 512-token request <= 20 ms")


def pace_ms() -> float:
    """Median time of a fixed piece of interpreter and numpy work: how fast this host runs right now."""
    data = np.random.default_rng(0).integers(0, 1 << 16, 1 << 18)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        total = 0
        for i in range(50_000):
            total += i * i
        np.sort(data)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


@contextlib.contextmanager
def host_pace() -> Iterator[list[float]]:
    """The host's pace (pace_ms) just before and just after the block, appended to the yielded list on exit.
    These shared cores swing 2-3x in speed within an hour (the guest's steal counter does not show it), so each
    decode line says how fast the host ran: compare latencies only between lines with a similar pace."""
    before = pace_ms()
    paces: list[float] = []
    yield paces
    paces += [before, pace_ms()]


def _pace(paces: list[float]) -> str:
    return f"(host pace {paces[0]:.1f} / {paces[1]:.1f} ms before / after)"


def decode_section(steps: int) -> None:
    traffic = decode_steps(np.random.default_rng(7), steps)
    postings = sum(len(s.feature_ids) // 4 for codes, _ in traffic for s in codes.codes.slices)
    print(
        f"\ndecode-shaped traffic: {steps} engine steps, {DECODE_CONCURRENCY} concurrent requests x "
        f"{DECODE_POSITIONS} positions, {len(LAYERS)} slots, k={DECODE_K}, one message per step "
        f"({postings / 1e6:.1f}M postings, {sum(len(f) for _, f in traffic)} requests finished)"
    )
    with host_pace() as pace:
        rate, latencies, statuses = decode_in_process(traffic)
    p50, _, p99 = percentiles(latencies)
    print(
        f"  in process (1 thread): {rate / 1e6:.2f}M postings/s (target >= 2.5M: {rate / 2.5e6:.2f}x); report ready "
        f"after the last codes p50 {p50:.2f} ms, p99 {p99:.2f} ms (target <= 5 ms); reports {dict(statuses)} "
        f"{_pace(pace)}"
    )
    coalesced = coalesced_traffic(traffic)
    with host_pace() as pace:
        rate, latencies, statuses = decode_in_process(coalesced)
    p50, _, p99 = percentiles(latencies)
    print(
        f"  the same codes as the plugin's emitter sends steps queued behind each other ({len(coalesced)} messages of "
        f"up to {COALESCE_MAX_STEPS} engine steps, each up to a step that finished requests, a request's rows of a "
        f"slot in one slice), in process: "
        f"{rate / 1e6:.2f}M postings/s; report ready after the message with the last codes p50 {p50:.2f} ms, p99 "
        f"{p99:.2f} ms; reports {dict(statuses)} {_pace(pace)}"
    )
    for coalesce in (False, True):
        with host_pace() as pace:
            run = decode_through_grpc(steps, coalesce=coalesce)
        per_core = postings / run.endpoint_cpu_s
        what = (
            f"  the same with the emitter's coalescing (every step is queued already: {run.messages} messages)"
            if coalesce
            else "  through gRPC, producer in its own process, as fast as it sends (both on these 2 cores)"
        )
        print(
            f"{what}: {run.rate / 1e6:.2f}M postings/s, the sidecar's process using {run.endpoint_cpu_s:.1f} CPU s: "
            f"{per_core / 1e6:.2f}M postings per CPU second of the sidecar (target >= 2.5M per core: "
            f"{per_core / 2.5e6:.2f}x); reports {dict(run.statuses)} {_pace(pace)}"
        )
    step_rate = 100  # a decode step every 10 ms: 64 sequences on a GPU
    with host_pace() as pace:
        run = decode_through_grpc(steps, steps_per_s=step_rate)
    p50, _, p99 = percentiles(run.latencies["watch"])
    print(
        f"  through gRPC at {step_rate} engine steps/s ({run.rate / 1e6:.2f}M postings/s sustained): report on "
        f"WatchReports after the last codes were sent p50 {p50:.2f} ms, p99 {p99:.2f} ms; {_in_sidecar(run)}; "
        f"reports {dict(run.statuses)}; {run.ingest.describe()} {_pace(pace)}"
    )
    in_batch: dict[tuple[bool, float], tuple[float, float]] = {}  # (coalesce, linger_s) -> (p50, p99)
    for coalesce, linger_s in ((False, 0.0), (True, 0.0), (True, BENCH_LINGER_S)):
        with host_pace() as pace:
            run = decode_through_grpc(
                steps, steps_per_s=step_rate, finishes_in_batch=True, coalesce=coalesce, linger_s=linger_s
            )
        p50, _, p99 = percentiles(run.latencies["watch"])
        in_batch[coalesce, linger_s] = p50, p99
        if linger_s:
            what = (
                f"the same with coalesce_linger_ms: {linger_s * 1e3:.0f} (a step's batch waits up to that long for "
                f"the steps behind it, and a step that finished requests ends the wait: {run.messages} messages)"
            )
        elif coalesce:
            what = (
                f"the same with the emitter's coalescing (the steps made while the stream was busy go in one "
                f"message: {run.messages} messages)"
            )
        else:
            what = (
                "the same with each finish marker inside the code batch of its step (the plugin, when vLLM's "
                "engine core runs in the worker's process)"
            )
        print(
            f"  {what}: WatchReports p50 {p50:.2f} ms, p99 {p99:.2f} ms; {_in_sidecar(run)}; the sidecar's process "
            f"used {run.endpoint_cpu_s:.1f} CPU s; reports {dict(run.statuses)}; {run.ingest.describe()} {_pace(pace)}"
        )
    p50, p99 = in_batch[False, 0.0]
    with host_pace() as pace:
        relayed = decode_through_grpc(steps, steps_per_s=step_rate, finishes_in_batch=True, relay=True)
    f50, _, f99 = percentiles(relayed.latencies["watch"])
    t50, _, t99 = percentiles(relayed.to_sidecar)
    print(
        f"  the transport's floor, the same traffic to a relay that parses each message and reports every finish "
        f"on WatchReports at once (no monitoring): p50 {f50:.2f} ms, p99 {f99:.2f} ms, of which sent -> read by the "
        f"relay p50 {t50:.2f} ms, p99 {t99:.2f} ms; the sidecar (finishes in the batch, a message per step) adds "
        f"{p50 - f50:.2f} ms at p50 and {p99 - f99:.2f} ms at p99 {_pace(pace)}"
    )
    with host_pace() as pace:
        run = decode_through_grpc(steps, steps_per_s=step_rate, get_reports=GET_REPORTS_IN_FLIGHT)
    (w50, _, w99), (g50, _, g99) = percentiles(run.latencies["watch"]), percentiles(run.latencies["get"])
    print(
        f"  the same with {GET_REPORTS_IN_FLIGHT} GetReport calls waiting at a time, as the API server waits for "
        f"each response's report: GetReport answered after the last codes were sent p50 {g50:.2f} ms, p99 "
        f"{g99:.2f} ms ({len(run.latencies['get'])} requests); WatchReports p50 {w50:.2f} ms, p99 {w99:.2f} ms; "
        f"{_in_sidecar(run)} {_pace(pace)}"
    )


def _in_sidecar(run: GrpcRun) -> str:
    """DESIGN's report target as the reports themselves measure it (from the sidecar receiving a report's last input
    to the report final), then from the producer sending the last codes to the report final, and its first leg
    (sent -> read by the sidecar). The way back to a reader is in the WatchReports figure."""
    p50, _, p99 = percentiles(run.in_sidecar)
    t50, _, t99 = percentiles(run.to_sidecar)
    s50, _, s99 = percentiles(run.sent_to_final)
    return (
        f"report final in the sidecar after its last codes arrived p50 {p50:.2f} ms, p99 {p99:.2f} ms (target <= 5 ms; "
        f"{sum(t > 5 for t in run.in_sidecar)} of {len(run.in_sidecar)} over), after they were sent p50 {s50:.2f} ms, "
        f"p99 {s99:.2f} ms ({sum(t > 5 for t in run.sent_to_final)} over 5 ms; sent -> read by the sidecar p50 "
        f"{t50:.2f} ms, p99 {t99:.2f} ms)"
    )


def small_step_messages(rows: int, steps: int, steps_per_s: float) -> Iterator[pb.IngestMessage]:
    """A manifest, one request's start, then `steps` code batches of one slice per slot, paced."""
    rng = np.random.default_rng(3)
    request_id = f"small-{time.time_ns()}"
    yield pb.IngestMessage(manifest=decode_manifest())
    yield pb.IngestMessage(start=pb.RequestStart(request_id=request_id, model="bench", num_prompt_tokens=1))
    began = time.perf_counter()
    for step in range(steps):
        time.sleep(max(0.0, began + step / steps_per_s - time.perf_counter()))
        offsets = np.arange(0, rows * DECODE_K + 1, DECODE_K, dtype=np.uint32)
        slices = [
            pack_slice(
                request_id,
                slot,
                step * rows,
                pb.PHASE_GENERATED,
                np.zeros(rows, np.uint32),
                offsets,
                rng.integers(0, D_SAE, rows * DECODE_K).astype(np.uint32),
                np.ones(rows * DECODE_K, np.float16),
            )
            for slot in range(len(LAYERS))
        ]
        yield pb.IngestMessage(codes=pb.CodeBatch(step=step + 1, slices=slices))


def small_steps_section(seconds: float = 8.0) -> None:
    """CPU per message of one-row steps: what a serving engine with one client sends each step."""
    import subprocess
    import sys

    import psutil

    def cpu_s(process: psutil.Process) -> float:
        times = process.cpu_times()
        return times.user + times.system

    print("\nsmall steps: one request, one row per engine step, 2 slots, k=64 (CPU ms per message, median of 3)")
    print(f"{'receiver':<28} {'steps/s':>8} {'receiver ms':>12} {'sender ms':>10}")
    with tempfile.TemporaryDirectory() as tmp, sidecar_process(Path(tmp)) as sidecar:
        sink = subprocess.Popen([sys.executable, __file__, "--sink-child"], stdout=subprocess.PIPE, text=True)
        try:
            sink_port = int(sink.stdout.readline())
            grpc.channel_ready_future(grpc.insecure_channel(f"127.0.0.1:{sink_port}")).result(timeout=60)
            receivers = {
                "sidecar (real server)": (sidecar.pid, sidecar.port),
                "bare gRPC endpoint": (sink.pid, sink_port),
            }
            me = psutil.Process()
            for steps_per_s in (50, 200):
                steps = int(seconds * steps_per_s)
                for name, (receiver_pid, receiver_port) in receivers.items():
                    receiver = psutil.Process(receiver_pid)
                    runs = []
                    for _ in range(3):
                        stub = pb_grpc.MonitorStub(grpc.insecure_channel(f"127.0.0.1:{receiver_port}"))
                        before = cpu_s(receiver), cpu_s(me)
                        stub.Ingest(small_step_messages(1, steps, steps_per_s))
                        runs.append(((cpu_s(receiver) - before[0]) / steps, (cpu_s(me) - before[1]) / steps))
                    received = statistics.median(r[0] for r in runs) * 1e3
                    sent = statistics.median(r[1] for r in runs) * 1e3
                    print(f"{name:<28} {steps_per_s:>8} {received:>12.2f} {sent:>10.2f}")
        finally:
            sink.terminate()
            sink.wait(30)


@dataclass(frozen=True)
class Receiver:
    """A process the bench sends codes to."""

    port: int
    pid: int
    metrics_port: int = 0  # the sidecar's Prometheus endpoint; 0: none (the relay)


@contextlib.contextmanager
def sidecar_process(tmp: Path) -> Iterator[Receiver]:
    """The real sidecar server, started by its CLI in its own process as deployed (default settings, listening
    on a free loopback port, its Prometheus endpoint on another), stopped with SIGTERM at the end."""
    import subprocess
    import sys

    port, metrics_port = _free_port(), _free_port()
    config = tmp / "sidecar.yaml"
    config.write_text(
        f"listen: 127.0.0.1:{port}\nevidence_dir: {tmp}/evidence\ntelemetry: {{prometheus_port: {metrics_port}}}\n"
    )
    cli = str(Path(sys.executable).with_name("circuitwatch"))
    process = subprocess.Popen(
        [cli, "sidecar", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        grpc.channel_ready_future(grpc.insecure_channel(f"127.0.0.1:{port}")).result(timeout=60)
        yield Receiver(port, process.pid, metrics_port)
    finally:
        process.terminate()
        process.wait(60)


@contextlib.contextmanager
def relay_process(tmp: Path) -> Iterator[Receiver]:
    """The relay endpoint (_relay) in a child process, as the sidecar runs in one."""
    import subprocess
    import sys

    relay = subprocess.Popen([sys.executable, __file__, "--relay-child"], stdout=subprocess.PIPE, text=True)
    try:
        port = int(relay.stdout.readline())
        grpc.channel_ready_future(grpc.insecure_channel(f"127.0.0.1:{port}")).result(timeout=60)
        yield Receiver(port, relay.pid)
    finally:
        relay.terminate()
        relay.wait(60)


class _Relay(pb_grpc.MonitorServicer):
    """Ingest parses every message as the sidecar does and, for each finish marker (its own message or inside a
    code batch), puts a report naming the request on every WatchReports stream at once: the sidecar's transport
    and threads with nothing monitored in between."""

    def __init__(self) -> None:
        import threading

        self._lock = threading.Lock()
        self._watchers: list = []

    def _final(self, request_id: str, received_ns: int) -> None:
        report = pb.Report(
            request_id=request_id,
            status=pb.REPORT_STATUS_COMPLETE,
            inputs_received_unix_nanos=received_ns,
            finalized_unix_nanos=time.time_ns(),
        )
        with self._lock:
            watchers = list(self._watchers)
        for watcher in watchers:
            watcher.put(report)

    def Ingest(self, request_iterator, context) -> pb.IngestAck:
        postings = 0
        for message in request_iterator:
            received_ns = time.time_ns()  # as the sidecar's Ingest takes it
            if message.WhichOneof("kind") == "codes":
                postings += sum(len(s.feature_ids) // 4 for s in message.codes.slices)
                for finish in message.codes.finishes:
                    self._final(finish.request_id, received_ns)
            elif message.WhichOneof("kind") == "finish":
                self._final(message.finish.request_id, received_ns)
        return pb.IngestAck(postings=postings)

    def WatchReports(self, request, context):
        import queue

        watcher: queue.Queue = queue.Queue()
        with self._lock:
            self._watchers.append(watcher)
        while context.is_active():
            with contextlib.suppress(queue.Empty):
                yield watcher.get(timeout=0.2)


def _relay() -> None:
    """The relay endpoint, in this child: its port on stdout."""
    from concurrent.futures import ThreadPoolExecutor

    server = grpc.server(ThreadPoolExecutor(32))
    pb_grpc.add_MonitorServicer_to_server(_Relay(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sink() -> None:
    """serving_bench's endpoint that drops each message unread, in this child: its port on stdout."""
    from serving_bench import start_sink

    server, port = start_sink()
    print(port, flush=True)
    server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--postings", type=float, default=50e6)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--decode-steps", type=int, default=3000)
    parser.add_argument("--only", choices=("bulk", "decode", "circuits", "small-steps"))
    parser.add_argument("--sink-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--relay-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink_child:
        _sink()
        return
    if args.relay_child:
        _relay()
        return
    if args.only in (None, "small-steps"):
        small_steps_section()
        if args.only == "small-steps":
            return
    if args.only in (None, "circuits"):
        circuits_section()
        if args.only == "circuits":
            return
    if args.only in (None, "decode"):
        decode_section(args.decode_steps)
        if args.only == "decode":
            return
    rng = np.random.default_rng(0)
    batches = make_batches(rng, requests=16)

    with tempfile.TemporaryDirectory() as tmp:
        clock = SimulatedClock()
        config = SidecarConfig(
            evidence_dir=Path(tmp), index={"window_s": WINDOW_S, "segment_s": 10, "memory_budget_mb": 16384}
        )
        core = SidecarCore(config, EvidenceStore(Path(tmp)), clock=clock)
        specs = [{"name": n, "when": q, "window": WINDOWS.get(n, 1)} for n, q in QUERIES.items()]
        circuits = parse_circuits({"circuits": specs}, "bench")
        core.set_circuits(type(core.circuits)(tuple(circuits)))
        seconds, postings, finalise_ms, maintenance_s, requests = fill(core, clock, batches, int(args.postings))
        core.index.seal()
        stats = core.index.stats()
        span_s = (clock.now - core.index.oldest_time) / 1e9
        print(
            f"index: {stats['postings'] / 1e6:.1f}M postings, {stats['rows'] / 1e6:.2f}M rows, "
            f"{stats['segments']} segments, "
            f"{stats['bytes'] / 2**20:.0f} MiB, spanning {span_s:.0f} s"
        )
        ingest_rate = postings / seconds
        print(
            f"ingest (in process, 1 thread, incl. circuit matching and report finalisation): "
            f"{ingest_rate / 1e6:.2f}M postings/s  (target >= 2.5M: {ingest_rate / 2.5e6:.2f}x target)"
        )
        p50, p90, p99 = percentiles(finalise_ms)
        print(f"report ready after the finish marker: p50 {p50:.2f} ms, p99 {p99:.2f} ms  (target <= 5 ms)")
        print(
            f"maintenance thread (off the ingest path: sealing token segments, reducing and sealing requests): "
            f"{maintenance_s / requests * 1e3:.2f} ms per request"
        )

        postings_sets = python_postings(core, [t for c in core.circuits.circuits for t in c.terms])
        universe = {k for segment in core.index.segments() for k in segment.row_keys.tolist()}

        print(f"\ncircuit queries over the whole {WINDOW_S // 60}-minute window ({args.queries} runs each):")
        print(
            f"{'query':<20} {'matches':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
            f"{'python sets ms':>15} {'speed-up':>9}"
        )
        for name in QUERIES:
            request = pb.QueryRequestsRequest(circuit=name)
            for _ in range(5):  # warm-up: first-touch page faults are not query cost
                core.query_requests(request)
            times = []
            for _ in range(args.queries):
                t0 = time.perf_counter()
                response = core.query_requests(request)
                times.append((time.perf_counter() - t0) * 1e3)
            circuit = core.circuits.by_name(name)
            baseline = []
            for _ in range(max(3, args.queries // 20)):
                t0 = time.perf_counter()
                keys = python_evaluate(circuit.expression, postings_sets, circuit.window, universe)
                counts: dict[int, int] = {}
                for key in keys:
                    counts[key >> 32] = counts.get(key >> 32, 0) + 1
                baseline.append((time.perf_counter() - t0) * 1e3)
            assert len(counts) == response.total_matches, (name, len(counts), response.total_matches)
            p50, p90, p99 = percentiles(times)
            b50 = statistics.median(baseline)
            print(
                f"{name:<20} {response.total_matches:>9} {p50:>8.2f} {p90:>8.2f} {p99:>8.2f} "
                f"{b50:>15.1f} {b50 / p50:>8.1f}x"
            )

    rate = grpc_ingest(batches, seconds=5)
    print(
        "\ningest through gRPC on 127.0.0.1 (one stream, server and client on this machine): "
        f"{rate / 1e6:.2f}M postings/s"
    )


if __name__ == "__main__":
    main()
