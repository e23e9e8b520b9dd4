"""Drift alarm on real activations: how often it fires on in-distribution traffic (false alarms) and how many
tokens of shifted traffic it needs to fire (detection delay), with the sidecar's own DriftMonitor and the
default alarm rule (sidecar/config.py DriftConfig).

    .venv/bin/python bench/drift_bench.py                  # about a minute on 2 cores
    .venv/bin/python bench/drift_bench.py --streams 100    # tighter estimates

Model and SAEs: the fixture model and the plugin's three fixture slots (SAELens TopK on layer 1, Gemma Scope
JumpReLU on layer 2, sparsify TopK on layer 3), encoded by the torch backend with the plugin's default
selection. Calibration: `circuitwatch calibrate`'s measurement on the even-numbered CPython help topics (first
256 tokens each). In-distribution traffic: requests of 32-256 tokens cut at random places from the odd-numbered
topics, which calibration never read. Shifted traffic: random token ids, or byte soup (random Latin-1 and IPA
characters). Each stream draws requests with replacement from a pool of encoded requests and evaluates the rule
every `--check-every` tokens, as the sidecar's maintenance tick does.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from circuitwatch.calibration import calibrate
from circuitwatch.fixtures import fixture_paths
from circuitwatch.fixtures.activations import residual_stream
from circuitwatch.fixtures.corpus import documents
from circuitwatch.kernels import load_sae
from circuitwatch.kernels.encoders import make_encoder
from circuitwatch.kernels.hook_points import Tap
from circuitwatch.kernels.selection import selection_for
from circuitwatch.plugin.config import SlotConfig
from circuitwatch.plugin.slots import baseline_proto
from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.sidecar.config import DriftConfig
from circuitwatch.sidecar.drift import DriftMonitor


@dataclass
class EncodedRequest:
    tokens: int
    slots: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # per slot: (feature ids, errors, norms)


def main() -> None:
    logging.getLogger("circuitwatch").setLevel(logging.ERROR)  # the alarms are counted below, not logged
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=40)
    parser.add_argument("--stream-tokens", type=int, default=200_000, help="in-distribution tokens per stream")
    parser.add_argument("--check-every", type=int, default=1_000, help="tokens between rule evaluations")
    parser.add_argument("--warm-tokens", type=int, default=40_000, help="in-distribution tokens before a shift")
    parser.add_argument("--max-delay", type=int, default=200_000, help="shifted tokens before giving up")
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    started = time.perf_counter()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    fixtures = fixture_paths()
    model = AutoModelForCausalLM.from_pretrained(fixtures.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(fixtures.model)
    slots = [
        SlotConfig(layer=1, sae=fixtures.topk_sae(1)),
        SlotConfig(layer=2, sae=fixtures.gemmascope_safetensors),
        SlotConfig(layer=3, sae=fixtures.sparsify_sae(3)),
    ]
    encoders, baselines = [], []
    texts = documents()
    for slot in slots:
        sae = load_sae(slot.sae, expected_d_in=model.config.hidden_size)
        encoder = make_encoder(sae, selection_for(slot.selection, slot.k, sae, 64), "torch", "cpu")
        baseline = calibrate(
            model, tokenizer, sae, encoder, Tap(slot.layer), texts[0::2], 256, model_name="fixture model"
        )
        encoders.append(encoder)
        baselines.append((sae.spec.d_sae, baseline_proto(baseline, slot)))
        print(
            f"{sae.name} layer {slot.layer}: calibrated on {baseline.tokens} tokens, error p50 {baseline.error.p50:.3f}"
        )

    held_out = [tokenizer(text)["input_ids"] for text in texts[1::2]]
    bos = tokenizer.bos_token_id

    def window() -> list[int]:
        ids = held_out[rng.integers(len(held_out))]
        length = int(rng.integers(32, 257))
        start = int(rng.integers(0, max(1, len(ids) - length)))
        return [bos, *ids[start : start + length - 1]]

    def random_ids() -> list[int]:
        return [bos, *rng.integers(0, tokenizer.vocab_size, int(rng.integers(31, 256))).tolist()]

    def byte_soup() -> list[int]:
        text = "".join(chr(c) for c in rng.integers(0x21, 0x2FF, int(rng.integers(20, 170))))
        return tokenizer(text)["input_ids"][:256]

    def encode(ids: list[int]) -> EncodedRequest:
        layers = [slot.layer for slot in slots]
        streams = residual_stream(model, torch.tensor([ids]), layers)
        per_slot = []
        for slot, encoder in zip(slots, encoders, strict=True):
            codes = encoder.encode(streams[slot.layer][0])
            valid = codes.valid.numpy()
            feature_ids = codes.ids.numpy()[valid]
            per_slot.append((feature_ids[feature_ids >= 0], codes.errors.numpy()[valid], codes.norms.numpy()[valid]))
        return EncodedRequest(len(ids), per_slot)

    pools = {
        "in-distribution": [encode(window()) for _ in range(300)],
        "random token ids": [encode(random_ids()) for _ in range(100)],
        "byte soup": [encode(byte_soup()) for _ in range(100)],
    }
    print(f"encoded {sum(len(p) for p in pools.values())} requests in {time.perf_counter() - started:.0f} s\n")

    settings = DriftConfig()
    print(
        f"rule (defaults): at least {settings.min_tokens:g} effective tokens, half-life {settings.half_life_tokens:g} "
        f"tokens; DRIFT when JS >= {settings.js_threshold}, error ratio >= {settings.error_ratio_threshold}, or norm "
        f"ratio outside 1/{settings.norm_ratio_threshold:g}..{settings.norm_ratio_threshold:g}; evaluated every "
        f"{args.check_every} tokens\n"
    )

    def new_monitor() -> DriftMonitor:
        monitor = DriftMonitor(settings, time.time_ns)
        for gslot, (d_sae, baseline) in enumerate(baselines):
            monitor.register(gslot, d_sae, baseline)
        return monitor

    def feed(monitor: DriftMonitor, request: EncodedRequest) -> None:
        for gslot, (features, errors, norms) in enumerate(request.slots):
            monitor.observe(gslot, features, request.tokens, errors, norms)

    def alarmed(monitor: DriftMonitor) -> list[int]:
        return [g for g, drift in monitor.slots.items() if drift.state == pb.SLOT_STATE_DRIFT]

    # 1. false alarms: long in-distribution streams
    in_distribution = pools["in-distribution"]
    streams_alarmed, checks, checks_alarmed = 0, 0, 0
    peaks = {name: [0.0] * len(slots) for name in ("js", "error_ratio", "norm_ratio")}
    for _ in range(args.streams):
        monitor, fed, next_check, any_alarm = new_monitor(), 0, args.check_every, False
        while fed < args.stream_tokens:
            request = in_distribution[rng.integers(len(in_distribution))]
            feed(monitor, request)
            fed += request.tokens
            if fed >= next_check:
                next_check += args.check_every
                monitor.check()
                if monitor.slots[0].tokens < settings.min_tokens:
                    continue
                checks += 1
                if alarmed(monitor):
                    checks_alarmed, any_alarm = checks_alarmed + 1, True
                for gslot, drift in monitor.slots.items():
                    for name in peaks:
                        value = drift.metrics.get(name, 0.0)
                        value = max(value, 1 / value) if name == "norm_ratio" and value else value
                        peaks[name][gslot] = max(peaks[name][gslot], value)
        streams_alarmed += any_alarm
    total = args.streams * args.stream_tokens
    print(
        f"in-distribution: {args.streams} streams x {args.stream_tokens} tokens ({total / 1e6:.1f}M tokens, "
        f"{checks} evaluations after warm-up): {streams_alarmed} streams ever alarmed, "
        f"{checks_alarmed} evaluations in alarm ({checks_alarmed / max(checks, 1):.2%})"
    )
    for name, values in peaks.items():
        print(f"  highest {name} seen, per slot: {', '.join(f'{v:.3f}' for v in values)}")

    # 2. where each kind of traffic settles (100k tokens of it alone): the headroom of each threshold
    print("\nsteady state after 100k tokens of one kind (per slot: JS bits / error ratio / norm ratio):")
    for kind, pool in pools.items():
        monitor, fed = new_monitor(), 0
        while fed < 100_000:
            request = pool[rng.integers(len(pool))]
            feed(monitor, request)
            fed += request.tokens
        monitor.check()
        print(
            f"  {kind:17} "
            + "  ".join(
                f"{d.metrics['js']:.3f} / {d.metrics['error_ratio']:.2f} / {d.metrics['norm_ratio']:.2f}"
                for d in monitor.slots.values()
            )
        )

    # 3. detection delay: warm on in-distribution traffic, then shift all or part of it
    print()
    for kind in ("random token ids", "byte soup"):
        for share in (1.0, 0.5, 0.25):
            delays, missed, which = [], 0, {}
            for _ in range(args.streams):
                monitor, fed = new_monitor(), 0
                while fed < args.warm_tokens:
                    request = in_distribution[rng.integers(len(in_distribution))]
                    feed(monitor, request)
                    fed += request.tokens
                monitor.check()
                shifted_tokens, next_check, detected = 0, args.check_every, None
                while shifted_tokens < args.max_delay and detected is None:
                    shifted = rng.random() < share
                    pool = pools[kind] if shifted else in_distribution
                    request = pool[rng.integers(len(pool))]
                    feed(monitor, request)
                    shifted_tokens += request.tokens if shifted else 0
                    fed += request.tokens
                    if fed >= next_check:
                        next_check = fed + args.check_every
                        monitor.check()
                        if alarmed(monitor):
                            detected = shifted_tokens
                            for gslot in alarmed(monitor):
                                reason = monitor.slots[gslot].reasons[0].split(":")[0].split(" ")[0]
                                which[reason] = which.get(reason, 0) + 1
                if detected is None:
                    missed += 1
                else:
                    delays.append(detected)
            summary = (
                f"median {statistics.median(delays):,.0f}, p90 {np.quantile(delays, 0.9):,.0f} shifted tokens"
                if delays
                else "never"
            )
            print(
                f"{kind:17} {share:>4.0%} of traffic: detected in {len(delays)}/{args.streams} streams, {summary}; "
                f"missed {missed}; first reasons {which}"
            )
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
