"""Fidelity and drift in a real sidecar on 127.0.0.1: per-slot fidelity in reports (checked against a numpy
recount of what was sent), LOW_FIDELITY when most tokens read poorly, thresholds from calibration, the config
or the default, mis-wiring reported by a producer, baselines validated, GetCodes with per-token errors, the
drift alarm both ways with its OTel event, and `circuitwatch health`."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest

from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto.codec import pack_slice, unpack_slice

from support.otlp_receiver import attributes, grpc_receiver
from support.processes import CLI
from support.sidecar_harness import manifest, running_sidecar

D_SAE = 128


def baseline(threshold: float = 0.3, frequencies: np.ndarray | None = None, **fields) -> pb.FidelityBaseline:
    values = {"error_mean": 0.15, "error_p50": 0.14, "error_p99": 0.4, "norm_mean": 10.0, "norm_p50": 10.0}
    values |= {"l0_mean": 4.0, "tokens": 5000} | fields
    message = pb.FidelityBaseline(source="test calibration", error_threshold=threshold, **values)
    if frequencies is not None:
        message.firing_frequencies = np.asarray(frequencies, "<f4").tobytes()
    return message


def calibrated_manifest(frequencies: np.ndarray | None = None, threshold: float = 0.3) -> pb.Manifest:
    """Slot 0 calibrated, slot 1 not."""
    message = manifest(d_sae=D_SAE)
    message.slots[0].baseline.CopyFrom(baseline(threshold, frequencies))
    return message


def fidelity_slice(request_id: str, slot: int, start: int, features: np.ndarray, errors, norms) -> pb.RequestSlice:
    """Rows [start, start + n) with `features` [n, k] and their errors and norms."""
    rows, k = features.shape
    return pack_slice(
        request_id,
        slot,
        start,
        pb.PHASE_PROMPT,
        np.arange(start, start + rows),
        np.arange(0, rows * k + 1, k),
        features.reshape(-1),
        np.ones(rows * k),
        np.asarray(errors, np.float32),
        np.asarray(norms, np.float32),
    )


def request_messages(request_id: str, errors: dict[int, np.ndarray], rng, step: int = 1) -> list[pb.IngestMessage]:
    n = len(errors[0])
    slices = [
        fidelity_slice(request_id, slot, 0, rng.integers(0, D_SAE, (n, 4)), slot_errors, np.full(n, 10.0))
        for slot, slot_errors in errors.items()
    ]
    finish = pb.RequestFinish(request_id=request_id, num_prompt_tokens=n, num_generated_tokens=1, num_positions=n)
    return [pb.IngestMessage(codes=pb.CodeBatch(step=step, slices=slices)), pb.IngestMessage(finish=finish)]


def test_reports_carry_fidelity_and_low_fidelity_never_passes_for_clean(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    good = {0: rng.uniform(0.05, 0.25, 40), 1: rng.uniform(0.05, 0.4, 40)}
    poor = {0: np.where(np.arange(40) < 28, 0.6, 0.1), 1: rng.uniform(0.05, 0.4, 40)}  # 70% above 0.3
    borderline = {0: np.where(np.arange(40) < 16, 0.6, 0.1), 1: rng.uniform(0.05, 0.4, 40)}  # 40%: not most
    uncalibrated_poor = {0: np.full(40, 0.1), 1: np.full(40, 0.7)}  # slot 1: above the default 0.5
    messages = [pb.IngestMessage(manifest=calibrated_manifest())]
    for i, (name, errors) in enumerate(
        [("good", good), ("poor", poor), ("borderline", borderline), ("uncalibrated", uncalibrated_poor)]
    ):
        messages += request_messages(name, errors, rng, step=i + 1)
    with running_sidecar(tmp_path) as (_, client):
        client.ingest(messages)
        reports = {name: client.report(name, wait_ms=5000) for name in ("good", "poor", "borderline", "uncalibrated")}
        codes = client.stub.GetCodes(pb.GetCodesRequest(request_id="poor"), timeout=10)
    expected_status = {
        "good": pb.REPORT_STATUS_COMPLETE,
        "poor": pb.REPORT_STATUS_LOW_FIDELITY,
        "borderline": pb.REPORT_STATUS_COMPLETE,
        "uncalibrated": pb.REPORT_STATUS_LOW_FIDELITY,
    }
    sent = {"good": good, "poor": poor, "borderline": borderline, "uncalibrated": uncalibrated_poor}
    for name, report in reports.items():
        assert report.status == expected_status[name], (name, report.fidelity)
        assert [f.slot for f in report.fidelity] == [0, 1]
        for f in report.fidelity:
            errors = sent[name][f.slot].astype(np.float32)
            threshold = 0.3 if f.slot == 0 else 0.5
            assert f.tokens == 40 and f.error_threshold == pytest.approx(threshold)
            assert f.error_mean == pytest.approx(float(errors.mean()), rel=1e-5)
            assert f.error_max == pytest.approx(float(errors.max()), rel=1e-6)
            assert f.fraction_above_threshold == pytest.approx(float((errors > threshold).mean()))
            assert f.norm_mean == pytest.approx(10.0)
            assert f.low_fidelity == (f.fraction_above_threshold > 0.5)
    assert "from calibration" in reports["good"].fidelity[0].note
    assert "uncalibrated" in reports["good"].fidelity[1].note
    assert "70% of tokens above the error threshold" in reports["poor"].fidelity[0].note
    assert reports["poor"].coverage.positions_seen == 40 and not reports["poor"].coverage.gaps
    slot0 = [unpack_slice(s) for s in codes.slices if s.slot == 0]
    assert np.concatenate([s.errors for s in slot0]).tolist() == pytest.approx(poor[0].tolist())


def test_re_encoded_positions_count_with_their_latest_error(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    first = fidelity_slice("again", 0, 0, rng.integers(0, D_SAE, (10, 4)), np.full(10, 0.9), np.full(10, 10.0))
    second = fidelity_slice("again", 0, 0, rng.integers(0, D_SAE, (10, 4)), np.full(10, 0.1), np.full(10, 10.0))
    finish = pb.RequestFinish(request_id="again", num_prompt_tokens=10, num_generated_tokens=1, num_positions=10)
    manifest_one = manifest(layers=(1,), d_sae=D_SAE)
    manifest_one.slots[0].baseline.CopyFrom(baseline())
    with running_sidecar(tmp_path) as (_, client):
        client.ingest(
            [
                pb.IngestMessage(manifest=manifest_one),
                pb.IngestMessage(codes=pb.CodeBatch(step=1, slices=[first])),
                pb.IngestMessage(codes=pb.CodeBatch(step=2, slices=[second])),
                pb.IngestMessage(finish=finish),
            ]
        )
        report = client.report("again", wait_ms=5000)
    assert report.status == pb.REPORT_STATUS_COMPLETE
    assert report.fidelity[0].error_mean == pytest.approx(0.1) and report.fidelity[0].tokens == 10


def test_operator_thresholds_override_calibration(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    messages = [pb.IngestMessage(manifest=calibrated_manifest())]
    messages += request_messages("r", {0: np.full(20, 0.2), 1: np.full(20, 0.2)}, rng)
    with running_sidecar(tmp_path, fidelity={"error_thresholds": {"sae-l1": 0.1}}) as (_, client):
        client.ingest(messages)
        report = client.report("r", wait_ms=5000)
    assert report.status == pb.REPORT_STATUS_LOW_FIDELITY
    assert report.fidelity[0].error_threshold == pytest.approx(0.1) and report.fidelity[0].low_fidelity
    assert "fidelity.error_thresholds" in report.fidelity[0].note
    assert not report.fidelity[1].low_fidelity


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: setattr(b, "error_threshold", 0.0), r"baseline\.error_threshold: must be > 0"),
        (lambda b: setattr(b, "error_mean", float("nan")), r"baseline\.error_mean: nan is not a finite value"),
        (lambda b: setattr(b, "norm_p50", -1.0), r"baseline\.norm_p50: -1\.0 is not a finite value >= 0"),
        (lambda b: setattr(b, "firing_frequencies", b"\x00" * 12), r"firing_frequencies: 12 bytes, expected 512"),
        (
            lambda b: setattr(b, "firing_frequencies", np.full(D_SAE, 2.0, "<f4").tobytes()),
            r"firing_frequencies: values must be shares in 0\.\.1",
        ),
        (lambda b: setattr(b, "source", "x" * 2000), r"baseline\.source: 2000 characters"),
    ],
)
def test_manifest_baselines_are_validated(tmp_path: Path, mutate, message: str) -> None:
    bad = calibrated_manifest()
    mutate(bad.slots[0].baseline)
    with running_sidecar(tmp_path) as (_, client), pytest.raises(grpc.RpcError) as info:
        client.ingest([pb.IngestMessage(manifest=bad)])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "manifest.slots[0] (slot 0).baseline" in info.value.details()
    assert __import__("re").search(message, info.value.details()), info.value.details()


def wiring_batch(step: int, verdict: int, slot: int = 0) -> pb.IngestMessage:
    check = pb.WiringCheck(slot=slot, verdict=verdict, detail=f"slot {slot}: test verdict", tokens=256)
    return pb.IngestMessage(codes=pb.CodeBatch(step=step, stats=pb.ProducerStats(wiring=[check])))


@contextmanager
def held_open(client, messages: list[pb.IngestMessage]) -> Iterator[None]:
    """An Ingest stream that has sent `messages` and stays open (a producer still serving) inside the block."""
    done = threading.Event()

    def items() -> Iterator[pb.IngestMessage]:
        yield from messages
        done.wait(60)

    call = client.stub.Ingest.future(items(), timeout=90)
    try:
        yield
    finally:
        done.set()
        call.result()


def test_a_miswired_slot_makes_reports_low_fidelity_and_shows_in_health(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    messages = [pb.IngestMessage(manifest=calibrated_manifest()), wiring_batch(1, pb.WIRING_VERDICT_MISWIRED)]
    messages += request_messages("after", {0: np.full(20, 0.1), 1: np.full(20, 0.1)}, rng, step=2)
    with running_sidecar(tmp_path) as (running, client):
        with held_open(client, messages):
            report = client.report("after", wait_ms=5000)
            health = client.stub.GetHealth(pb.GetHealthRequest(), timeout=10)
            cli = subprocess.run(
                [*CLI, "health", "--target", f"127.0.0.1:{running.port}"],
                capture_output=True,
                text=True,
                timeout=60,
            )
        # the producer is gone and its verdict with it: restarted with a fixed configuration, it is judged afresh
        fixed_messages = [pb.IngestMessage(manifest=calibrated_manifest()), wiring_batch(1, pb.WIRING_VERDICT_OK)]
        fixed_messages += request_messages("fixed", {0: np.full(20, 0.1), 1: np.full(20, 0.1)}, rng, step=2)
        client.ingest(fixed_messages)
        fixed = client.report("fixed", wait_ms=5000)
        closed = client.stub.GetHealth(pb.GetHealthRequest(), timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            client.ingest([pb.IngestMessage(manifest=calibrated_manifest()), wiring_batch(1, 1, slot=7)])
    assert report.status == pb.REPORT_STATUS_LOW_FIDELITY
    assert report.fidelity[0].low_fidelity and "mis-wired" in report.fidelity[0].note
    assert not report.fidelity[1].low_fidelity
    by_layer = {s.layer: s for s in health.slots}
    assert by_layer[1].state == pb.SLOT_STATE_MISWIRED
    assert by_layer[1].wiring["test-producer"].verdict == pb.WIRING_VERDICT_MISWIRED
    assert by_layer[2].state == pb.SLOT_STATE_NO_BASELINE
    assert cli.returncode == 3, cli.stderr
    assert "miswired" in cli.stdout and "wiring check on test-producer: miswired" in cli.stdout
    assert fixed.status == pb.REPORT_STATUS_COMPLETE and not any(f.low_fidelity for f in fixed.fidelity), fixed
    assert all(not s.wiring and s.state != pb.SLOT_STATE_MISWIRED for s in closed.slots), closed
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "stats.wiring[0]: slot 7" in info.value.details()


def drift_traffic(rng, frequencies: np.ndarray, tokens: int, start_step: int, error: float = 0.15) -> list:
    """Requests of 50 tokens whose 4 codes per token are drawn from `frequencies`, in one-request batches."""
    p = frequencies / frequencies.sum()
    messages = []
    for i in range(tokens // 50):
        features = np.stack([rng.choice(D_SAE, 4, replace=False, p=p) for _ in range(50)])
        request_id = f"d{start_step + i}"
        batch = fidelity_slice(request_id, 0, 0, features, np.full(50, error), np.full(50, 10.0))
        finish = pb.RequestFinish(request_id=request_id, num_prompt_tokens=50, num_generated_tokens=1, num_positions=50)
        messages += [
            pb.IngestMessage(codes=pb.CodeBatch(step=start_step + i, slices=[batch])),
            pb.IngestMessage(finish=finish),
        ]
    return messages


def test_drift_alarm_fires_on_shifted_traffic_and_stays_quiet_otherwise(tmp_path: Path, monkeypatch) -> None:
    """Calibration: features 0..99 fire, 100..127 never do. In-distribution traffic stays OK; traffic on the
    other features raises the alarm (a metric, an OTel event at a real OTLP receiver, GetHealth, the CLI);
    back in distribution it clears. Then an error 3x the calibration's raises it by itself."""
    server, port, collected = grpc_receiver()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    rng = np.random.default_rng(4)
    calibration = np.r_[rng.uniform(0.01, 0.08, 100), np.zeros(28)]
    shifted = np.r_[np.full(100, 0.001), np.full(28, 0.1)]
    one_slot = manifest(layers=(1,), d_sae=D_SAE)
    one_slot.slots[0].baseline.CopyFrom(baseline(frequencies=calibration * 4 / calibration.sum()))
    drift = {"half_life_tokens": 1000, "min_tokens": 500}

    def state(client) -> pb.SlotHealth:
        return client.stub.GetHealth(pb.GetHealthRequest(), timeout=10).slots[0]

    try:
        with running_sidecar(tmp_path, drift=drift) as (running, client):
            client.ingest([pb.IngestMessage(manifest=one_slot), *drift_traffic(rng, calibration, 300, 1)])
            assert state(client).state == pb.SLOT_STATE_WARMING_UP
            client.ingest([pb.IngestMessage(manifest=one_slot), *drift_traffic(rng, calibration, 3000, 10)])
            quiet = state(client)
            assert quiet.state == pb.SLOT_STATE_OK, quiet
            client.ingest([pb.IngestMessage(manifest=one_slot), *drift_traffic(rng, shifted, 3000, 100)])
            alarm = state(client)
            assert alarm.state == pb.SLOT_STATE_DRIFT, alarm
            assert alarm.js_divergence > 0.1 > quiet.js_divergence
            assert any("JS divergence" in r for r in alarm.reasons)
            cli = subprocess.run(
                [*CLI, "health", "--target", f"127.0.0.1:{running.port}"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert cli.returncode == 3 and "drift" in cli.stdout, cli.stdout + cli.stderr
            client.ingest([pb.IngestMessage(manifest=one_slot), *drift_traffic(rng, calibration, 6000, 200)])
            assert state(client).state == pb.SLOT_STATE_OK
            client.ingest(
                [pb.IngestMessage(manifest=one_slot), *drift_traffic(rng, calibration, 4000, 400, error=0.45)]
            )
            error_alarm = state(client)
            assert error_alarm.state == pb.SLOT_STATE_DRIFT and error_alarm.error_ratio > 2.5, error_alarm
            assert any("reconstruction error" in r for r in error_alarm.reasons)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and len(_drift_events(collected)) < 3:
                time.sleep(0.1)
        events = _drift_events(collected)
        assert [name for name, _ in events] == [
            "circuitwatch.drift_alarm",
            "circuitwatch.drift_cleared",
            "circuitwatch.drift_alarm",
        ]
        assert events[0][1]["circuitwatch.sae"] == "sae-l1"
    finally:
        server.stop(0)


def _drift_events(collected) -> list[tuple[str, dict]]:
    out = []
    for span in collected.spans():
        for event in span.events:
            if event.name.startswith("circuitwatch.drift"):
                out.append((event.name, attributes(event)))
    return out


@pytest.mark.parametrize("half_life", [1.0, 50.0, 20000.0])
def test_drift_firings_decay_as_if_every_count_decayed_each_batch(half_life: float) -> None:
    """The drift sums keep one decay scale instead of decaying d_sae counts per batch; the firings must equal
    the eager definition (each count times 0.5^(rows/half_life) per batch, plus the batch's firings), through the
    scale's rescaling (a half-life of one token with 100-row batches crosses it on every batch). Batches of 1-5
    rows take the add-one-by-one path, larger ones the count-by-id path."""
    from circuitwatch.sidecar.drift import SlotDrift

    rng = np.random.default_rng(5)
    d_sae = 64
    drift = SlotDrift(d_sae, None)
    eager = np.zeros(d_sae)
    for _ in range(300):
        rows = int(rng.integers(1, 101))
        features = rng.integers(0, d_sae, rows * 3).astype(np.uint32)  # repeats within a batch included
        drift.observe(features, rows, None, None, half_life)
        eager = eager * 0.5 ** (rows / half_life) + np.bincount(features, minlength=d_sae)
    np.testing.assert_allclose(drift.firings, eager, rtol=1e-9, atol=1e-300)
    assert drift.tokens > 0
