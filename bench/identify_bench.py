"""Identification benchmark: contrast-query latency over a 10-minute window of >= 50M postings.

Fills a real SidecarCore (simulated clock, as bench/sidecar_bench.py) with 12k requests: 1k positives labelled
"pos" that carry a few planted features, 10k negatives labelled "neg" and 1k unlabelled, every token with
K codes per slot drawn from log-normal feature densities (each request its own draw). Then times
SidecarCore.contrast for 1k positives vs 10k negatives against a plain-Python baseline in the same process: each
request's feature set precomputed as a Python frozenset, counted with collections.Counter and ranked, i.e.
the same request-level idea without the packed index. Both answers are checked to be identical.
Target (DESIGN.md): contrast query over 10k requests <= 50 ms.

    .venv/bin/python bench/identify_bench.py [--requests 12000] [--queries 30]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from sidecar_bench import D_SAE, LAYERS, K, SimulatedClock, feature_densities, manifest, percentiles

from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto.codec import pack_slice
from circuitwatch.sidecar import SidecarConfig
from circuitwatch.sidecar.core import SidecarCore
from circuitwatch.sidecar.store import EvidenceStore

PROMPT_TOKENS, GENERATED_TOKENS = 112, 32
WINDOW_S = 600
PLANTED = {0: (101, 202, 303), 1: (404, 505, 606)}  # slot -> features on some token of every positive


def token_codes(rng: np.random.Generator, cdf: np.ndarray, rows: int) -> np.ndarray:
    """K features per token drawn by density; repeats inside a row are redrawn uniformly (rare)."""
    features = np.minimum(np.searchsorted(cdf, rng.random((rows, K))), D_SAE - 1).astype(np.uint32)
    features.sort(axis=1)
    repeated = np.zeros_like(features, dtype=bool)
    repeated[:, 1:] = features[:, 1:] == features[:, :-1]
    features[repeated] = rng.integers(0, D_SAE, int(repeated.sum()), dtype=np.uint32)
    return features


def requests(rng: np.random.Generator, count: int, positives: int, negatives: int):
    """(request id, label, {slot: features [tokens, K]}) with the planted features on positives."""
    cdf = np.cumsum(feature_densities(np.random.default_rng(1234)))
    cdf /= cdf[-1]
    tokens = PROMPT_TOKENS + GENERATED_TOKENS
    for i in range(count):
        label = "pos" if i % (count // positives) == 0 and i // (count // positives) < positives else ""
        codes = {slot: token_codes(rng, cdf, tokens) for slot in range(len(LAYERS))}
        if label == "pos":
            for slot, planted in PLANTED.items():
                for feature in planted:
                    codes[slot][rng.integers(0, PROMPT_TOKENS), 0] = feature
        else:
            for slot, planted in PLANTED.items():  # planted features stay off the other requests
                codes[slot][np.isin(codes[slot], planted)] = planted[0] + 1
        yield f"req-{i}", label, codes


def fill(core: SidecarCore, clock: SimulatedClock, count: int, positives: int, negatives: int) -> tuple[dict, float]:
    """Ingest every request (start with labels, one code batch per phase, finish); returns the Python sets."""
    stream = core.open_stream(manifest())
    rng = np.random.default_rng(0)
    step_ns = int(0.97 * WINDOW_S * 10**9) // count
    sets: dict[str, frozenset] = {}
    labels: dict[str, str] = {}
    tokens = PROMPT_TOKENS + GENERATED_TOKENS
    offsets = np.arange(0, tokens * K + 1, K, dtype=np.uint32)
    acts = rng.gamma(2.0, 0.6, size=tokens * K).astype(np.float16)
    negatives_left = negatives
    ingest_s = 0.0
    maintenance_s = 0.0
    for step, (request_id, label, codes) in enumerate(requests(rng, count, positives, negatives)):
        if not label and negatives_left > 0:
            label, negatives_left = "neg", negatives_left - 1
        labels[request_id] = label
        clock.now += step_ns
        messages = [
            pb.IngestMessage(start=pb.RequestStart(request_id=request_id, labels=[label] if label else [])),
            pb.IngestMessage(
                codes=pb.CodeBatch(
                    step=step + 1,
                    slices=[
                        pack_slice(
                            request_id, slot, first, phase, np.zeros(n, np.uint32),
                            offsets[: n + 1], codes[slot][first : first + n].ravel(), acts[: n * K],
                        )
                        for slot in codes
                        for first, n, phase in ((0, PROMPT_TOKENS, pb.PHASE_PROMPT),
                                                (PROMPT_TOKENS, GENERATED_TOKENS, pb.PHASE_GENERATED))
                    ],
                )
            ),
            pb.IngestMessage(
                finish=pb.RequestFinish(
                    request_id=request_id, num_prompt_tokens=PROMPT_TOKENS, num_positions=tokens,
                    num_generated_tokens=GENERATED_TOKENS + 1,
                )
            ),
        ]  # fmt: skip
        t0 = time.perf_counter()
        for message in messages:
            core.ingest(stream, message)
        ingest_s += time.perf_counter() - t0
        sets[request_id] = frozenset((slot, int(f)) for slot, c in codes.items() for f in np.unique(c).tolist())
        if step % 1000 == 999:
            t0 = time.perf_counter()
            core.tick()  # what the sidecar's maintenance thread does: reduce requests, seal request segments
            maintenance_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    core.tick()
    maintenance_s += time.perf_counter() - t0
    return {"sets": sets, "labels": labels}, ingest_s, maintenance_s


def python_contrast(sets: dict, positives: list[str], negatives: list[str], top: int) -> list[tuple]:
    """The baseline: Counter over per-request frozensets, ranked like the index (exclusivity, support, id)."""
    count_p, count_n = Counter(), Counter()
    for request_id in positives:
        count_p.update(sets[request_id])
    for request_id in negatives:
        count_n.update(sets[request_id])
    scored = [
        (a / len(positives) - count_n[t] / len(negatives), a, t[0] * D_SAE + t[1], t, count_n[t])
        for t, a in count_p.items()
    ]
    scored.sort(key=lambda s: (-s[0], -s[1], s[2]))
    return [(t[0], t[1], a, b) for _, a, _, t, b in scored[:top]]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=12_000)
    parser.add_argument("--positives", type=int, default=1_000)
    parser.add_argument("--negatives", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=30)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        clock = SimulatedClock()
        config = SidecarConfig(
            evidence_dir=Path(tmp), index={"window_s": WINDOW_S, "segment_s": 10, "memory_budget_mb": 16384}
        )
        core = SidecarCore(config, EvidenceStore(Path(tmp)), clock=clock)
        t0 = time.perf_counter()
        truth, ingest_s, maintenance_s = fill(core, clock, args.requests, args.positives, args.negatives)
        fill_s = time.perf_counter() - t0
        core.index.seal()
        stats = core.index.stats()
        finalize_ms = core.counters["finalize_ns"] / core.counters["reports"] / 1e6
        request_index = core.request_index
        pending = len(request_index.channels[pb.CODE_MODE_CODES].pending)
        print(
            f"window: {stats['postings'] / 1e6:.1f}M postings, {args.requests} requests over {WINDOW_S // 60} minutes "
            f"(filled in {fill_s:.0f} s)\ningest incl. report finalisation {stats['postings'] / ingest_s / 1e6:.2f}M "
            f"postings/s; finalisation {finalize_ms:.2f} ms/request; maintenance thread (request sets, sealing) "
            f"{maintenance_s / args.requests * 1e3:.2f} ms/request"
        )
        print(
            f"request index: {request_index.nbytes / 2**20:.0f} MiB in sealed segments, {pending} requests pending; "
            f"token index {stats['bytes'] / 2**20:.0f} MiB"
        )
        labels = truth["labels"]
        positives = [r for r, label in labels.items() if label == "pos"]
        negatives = [r for r, label in labels.items() if label == "neg"]
        cases = {
            "codes, no pairs": pb.ContrastRequest(
                positives=pb.RequestSelector(labels=["pos"]), negatives=pb.RequestSelector(labels=["neg"]),
                top=50, top_pairs=0,
            ),
            "codes + 20 pairs": pb.ContrastRequest(
                positives=pb.RequestSelector(labels=["pos"]), negatives=pb.RequestSelector(labels=["neg"]), top=50
            ),
            "codes, ids given": pb.ContrastRequest(
                positives=pb.RequestSelector(request_ids=positives),
                negatives=pb.RequestSelector(request_ids=negatives), top=50, top_pairs=0,
            ),
            "argmax-token + pairs": pb.ContrastRequest(
                positives=pb.RequestSelector(labels=["pos"]), negatives=pb.RequestSelector(labels=["neg"]),
                mode=pb.CODE_MODE_ARGMAX_TOKEN, top=50,
            ),
            "argmax-mean + pairs": pb.ContrastRequest(
                positives=pb.RequestSelector(labels=["pos"]), negatives=pb.RequestSelector(labels=["neg"]),
                mode=pb.CODE_MODE_ARGMAX_MEAN, top=50,
            ),
        }  # fmt: skip

        baseline_ms = []
        for _ in range(3):
            t0 = time.perf_counter()
            expected = python_contrast(truth["sets"], positives, negatives, 50)
            baseline_ms.append((time.perf_counter() - t0) * 1e3)
        b50 = statistics.median(baseline_ms)
        print(f"\ncontrast: {len(positives)} positives vs {len(negatives)} negatives ({args.queries} runs each)")
        header = f"{'query':<22} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'python ms':>10} {'speed-up':>9}"
        print(header + "  top features")
        for name, request in cases.items():
            for _ in range(3):
                core.contrast(request)  # warm-up
            times = []
            for _ in range(args.queries):
                t0 = time.perf_counter()
                response = core.contrast(request)
                times.append((time.perf_counter() - t0) * 1e3)
            assert (response.positives, response.negatives) == (len(positives), len(negatives))
            if request.mode in (pb.CODE_MODE_UNSPECIFIED, pb.CODE_MODE_CODES):
                got = [(f.slot, f.feature, f.positives, f.negatives) for f in response.features]
                assert got == expected, "index and Python baseline disagree"
                planted = {(slot, f) for slot, features in PLANTED.items() for f in features}
                assert {(f.slot, f.feature) for f in response.features[: len(planted)]} == planted
            p50, p90, p99 = percentiles(times)
            speedup = f"{b50 / p50:>8.0f}x" if request.mode in (0, pb.CODE_MODE_CODES) else f"{'':>9}"
            top = " ".join(f"L{LAYERS[f.slot]}:{f.feature}" for f in response.features[:3])
            print(f"{name:<22} {p50:>8.1f} {p90:>8.1f} {p99:>8.1f} {b50:>10.0f} {speedup}  {top}")
        print("target: contrast over 10k requests <= 50 ms (the python baseline counts the same request-level sets)")


if __name__ == "__main__":
    main()
