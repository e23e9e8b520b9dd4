"""Fleet benchmark: contrast latency over a 1M-request store, and what exporting costs a sidecar's ingest.

1. Contrast. Fills the embedded store (chdb: ClickHouse in-process) with --replicas x --per-replica requests
   through the fleet schema, generated in SQL (filling 1M requests through sidecars would take the bench an
   hour; the export path is part 2): every request has feature sets for two SAEs in the three code modes
   (codes: --features distinct features per SAE on average, drawn from a skewed density over 16,384; argmax
   token: a quarter of that; argmax mean: one per scope), a label ("pos" on one request in 100, carrying three
   planted features per SAE), arrivals spread over --hours. Then times fleet_contrast for "pos" against every
   other request, features only and with pairs, median of --queries.
   Ratio: the same contrast over one replica's 10k requests, answered by the local in-memory request index
   (identify.contrast over a RequestIndex built from the same feature sets) and by the store; both answers
   are checked to be identical first.
2. Export. Replays the ingest bench's traffic (bench/sidecar_bench.py: 256 tokens, k=16, two SAEs) into a
   SidecarCore with the fleet exporter off, on, and on while the store is held by another process (an
   outage: everything spools). Prints ingest requests/s and the ratios to "off", and how long the exporter took
   to have every request in the store after ingest ended.

    .venv-sidecar/bin/python bench/fleet_bench.py [--replicas 100] [--per-replica 10000] [--features 150]
(the sidecar venv has the [fleet] extra; `make test` builds it)
Target (DESIGN.md): contrast of 10k positives against 1M requests <= 1 s on the embedded engine; export keeps up
with ingest at < 5% ingest slowdown.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from sidecar_bench import SimulatedClock, make_batches, manifest

from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.sidecar import SidecarConfig
from circuitwatch.sidecar.config import FleetConfig
from circuitwatch.sidecar.core import SidecarCore
from circuitwatch.sidecar.fleet.connection import directory_locked, open_store
from circuitwatch.sidecar.fleet.delivery import retention_of
from circuitwatch.sidecar.fleet.exporter import FleetExporter
from circuitwatch.sidecar.fleet.queries import fleet_contrast, fleet_registry
from circuitwatch.sidecar.fleet.schema import migrate
from circuitwatch.sidecar.identify import Resolved, contrast
from circuitwatch.sidecar.request_index import RequestIndex, RequestMeta
from circuitwatch.sidecar.request_sets import FeatureSet, Reduction
from circuitwatch.sidecar.store import EvidenceStore

DB = "circuitwatch"
D_SAE = 16384
PLANTED = (101, 202, 303)


def fill_store(store, replicas: int, per_replica: int, features: int, hours: float) -> float:
    """Generate every table's rows in SQL, one insert per replica and table (as a replica's exporter would
    send them, in larger batches). Returns seconds."""
    start = time.perf_counter()
    base_ns = time.time_ns() - int(hours * 3600e9)
    step_ns = int(hours * 3600e9) // (replicas * per_replica)
    saes = [f"bench-sae-{s}" for s in range(2)]
    store.command(
        f"INSERT INTO {DB}.saes VALUES "
        + ", ".join(
            f"('{sae}', {s}, 'l{6 * (s + 1)}', 'topk', {6 * (s + 1)}, 'resid_post', -1, 4096, {D_SAE}, "
            f"'blake2b:{s:04d}', 'topk:k=16', 'saelens')"
            for s, sae in enumerate(saes)
        )
    )
    for r in range(replicas):
        first, count = r * per_replica, per_replica
        common = (
            f"'replica-{r}' AS instance, concat('req-', toString(number)) AS request_id, 'bench' AS model, "
            f"fromUnixTimestamp64Nano(toInt64({base_ns} + number * {step_ns}), 'UTC') AS arrival, "
            "number % 100 = 0 AS positive"
        )
        numbers = f"numbers({first}, {count})"
        store.command(
            f"INSERT INTO {DB}.reports (instance, request_id, response_id, model, arrival, finalized, status, "
            "complete, has_codes, flags, max_severity, labels, trace_id, num_prompt_tokens, num_generated_tokens, "
            "saes, report) "
            f"SELECT instance, request_id, '', model, arrival, arrival, 'complete', 1, 1, [], 'unspecified', "
            f"[if(positive, 'pos', 'neg')], '', 112, 32, {saes}, '' FROM (SELECT {common}, number FROM {numbers})"
        )
        store.command(
            f"INSERT INTO {DB}.request_labels (instance, request_id, arrival, version, labels) "
            f"SELECT instance, request_id, arrival, 0, [if(positive, 'pos', 'neg')] "
            f"FROM (SELECT {common}, number FROM {numbers})"
        )
        # codes: distinct features from a skewed density; the planted ones only (and always) on positives
        drawn = (
            "arrayFilter(f -> positive OR NOT has({planted:Array(UInt32)}, f), arrayDistinct(arrayMap("
            f"i -> toUInt32(pow((cityHash64(number, s, i) % 1000003) / 1000003, 2.5) * {D_SAE}), range(n))))"
        )
        for mode, size in ((pb.CODE_MODE_CODES, features), (pb.CODE_MODE_ARGMAX_TOKEN, max(1, features // 4))):
            store.command(
                f"INSERT INTO {DB}.request_features (instance, request_id, model, arrival, mode, sae, features, "
                f"scopes) SELECT instance, request_id, model, arrival, {mode}, {saes}[s + 1], feats, "
                "arrayMap(f -> toUInt8(5 + (cityHash64(number, f) % 3 = 0) + (cityHash64(number, f) % 4 = 0)), feats) "
                f"FROM (SELECT {common}, number, s, arraySort(arrayDistinct(arrayConcat({drawn}, "
                "if(positive, {planted:Array(UInt32)}, [])))) AS feats "
                f"FROM (SELECT number, s, toUInt32({size} * (0.5 + (cityHash64(number, s) % 1000) / 1000)) AS n "
                f"FROM {numbers} ARRAY JOIN [0, 1] AS s))",
                {"planted": list(PLANTED)},
            )
        store.command(
            f"INSERT INTO {DB}.request_features (instance, request_id, model, arrival, mode, sae, features, scopes) "
            f"SELECT instance, request_id, model, arrival, {pb.CODE_MODE_ARGMAX_MEAN}, {saes}[s + 1], "
            f"[toUInt32(if(positive, 101, cityHash64(number, s) % {D_SAE} + 1000))], [7] "
            f"FROM (SELECT {common}, number, s FROM {numbers} ARRAY JOIN [0, 1] AS s)"
        )
        # the hourly sums an exporter sends with each batch (rows.RowMaker._counts), here in SQL
        store.command(
            f"INSERT INTO {DB}.feature_counts SELECT toStartOfHour(arrival) AS hour, model, instance, mode, sae, "
            "feature, countIf(bitAnd(scope, 1) != 0), countIf(bitAnd(scope, 2) != 0), "
            "countIf(bitAnd(scope, 3) != 0), countIf(bitAnd(scope, 4) != 0) "
            f"FROM {DB}.request_features ARRAY JOIN features AS feature, scopes AS scope "
            f"WHERE instance = 'replica-{r}' GROUP BY hour, model, instance, mode, sae, feature"
        )
    return time.perf_counter() - start


def settle(store, quiet_s: float = 5.0, limit_s: float = 600.0) -> float:
    """Wait until the engine's background merges have been idle for quiet_s (a store that has been running a
    while), without forcing them (no OPTIMIZE FINAL). Returns how long it took."""
    start = quiet_since = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        if store.column("SELECT count() FROM system.merges")[0]:
            quiet_since = time.perf_counter()
        elif time.perf_counter() - quiet_since >= quiet_s:
            break
        time.sleep(0.5)
    return time.perf_counter() - start


def timed(call, repeats: int) -> tuple[float, object]:
    samples, answer = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        answer = call()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples), answer


def local_index_for(store, instance: str, mode: int):
    """A local request-level index (and its registry) over one replica's rows, built from the store's feature
    sets: the in-memory answer the fleet one is compared with."""
    registry, gslots = fleet_registry(store, DB)
    rows = store.query(
        "SELECT request_id, sae, features, scopes, toUnixTimestamp64Nano(arrival) AS arrival "
        f"FROM {DB}.request_features WHERE instance = {{i:String}} AND mode = {{m:UInt8}} ORDER BY request_id, sae",
        {"i": instance, "m": mode},
    ).to_pylist()
    labels = {
        row["request_id"]: row["label"]
        for row in store.query(
            f"SELECT request_id, labels[1] AS label FROM {DB}.request_labels WHERE instance = {{i:String}}",
            {"i": instance},
        ).to_pylist()
    }
    by_request: dict[str, list[dict]] = {}
    for row in rows:
        by_request.setdefault(row["request_id"], []).append(row)
    now = time.time_ns()
    index = RequestIndex(window_ns=365 * 86400 * 10**9, budget_bytes=8 << 30)
    for request_id, parts in by_request.items():
        terms = np.concatenate(
            [registry.term_bases[gslots[p["sae"]]] + np.asarray(p["features"], np.uint32) for p in parts]
        )
        scopes = np.concatenate([np.asarray(p["scopes"], np.uint8) for p in parts])
        found = FeatureSet(terms.astype(np.uint32), scopes)
        sets = {m: FeatureSet.empty() for m in (1, 2, 3)}
        sets[mode] = found
        meta = RequestMeta(request_id, parts[0]["arrival"], now, True, "bench")
        # the sets are known already: the reduction's "codes" hand them over and the compute step passes them on
        index.add(meta, Reduction(lambda sets=sets: sets, 0, ()), (labels[request_id],), [])
    lock = threading.RLock()
    index.seal(lock, compute=lambda inputs: [sets for sets, _, _ in inputs])
    return index, registry, lock


FIRST_OPEN = """
import argparse, sys, time
from circuitwatch.commands.identify import add_identify_parser, build_contrast
from circuitwatch.sidecar.fleet.connection import open_store
from circuitwatch.sidecar.fleet.queries import fleet_contrast

parser = argparse.ArgumentParser()
add_identify_parser(parser.add_subparsers())
args = parser.parse_args(["identify", "--positive-label", "pos", *sys.argv[2:]])
request = build_contrast(args, time.time_ns())  # what `circuitwatch identify --fleet DIR ...` asks
store = open_store(sys.argv[1], "circuitwatch")
started = time.perf_counter()
fleet_contrast(store, "circuitwatch", request)
print(time.perf_counter() - started)
"""


def contrast_section(args) -> None:
    """The open-engine figures on one open of the embedded engine, as a server or a process that keeps the store
    has it; what one `circuitwatch` command pays (opening included, imports not) from fresh interpreters."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.store or Path(tmp) / "store"
        store = open_store(str(directory), DB)
        with store.held():
            _contrast_section(args, store, directory)
        print(
            f"\none command's contrast, the engine opened in a fresh process for it (imports not counted), median of "
            f"{args.queries} (with the command's default pairs: one run)"
        )
        for options, repeats in ((["--pairs", "0"], args.queries), ([], 1)):
            samples = [fresh_process_contrast(directory, options, tmp) for _ in range(repeats)]
            command = " ".join(["circuitwatch identify --fleet DIR --positive-label pos", *options])
            print(f"  {statistics.median(samples) * 1e3:8.0f} ms   {command}")


def fresh_process_contrast(directory: Path, options: list[str], cwd: str) -> float:
    """What the command pays, opening the engine included, imports not: a fresh interpreter per query."""
    command = [sys.executable, "-c", FIRST_OPEN, str(directory), *options]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=True)
    return float(done.stdout)


def _contrast_section(args, store, directory: Path) -> None:
    total = args.replicas * args.per_replica
    if (directory / "filled").exists():  # --store kept from an earlier run with the same sizes
        seconds = 0.0
    else:
        migrate(store, DB, retention_of(FleetConfig()))
        print(f"filling the embedded store: {args.replicas} replicas x {args.per_replica} requests ...")
        seconds = fill_store(store, args.replicas, args.per_replica, args.features, args.hours)
        (directory / "filled").touch()
    settle_s = settle(store)
    elements = store.column(f"SELECT sum(length(features)) FROM {DB}.request_features WHERE mode = 1")[0]
    size = store.column(
        f"SELECT formatReadableSize(sum(data_compressed_bytes)) FROM system.parts WHERE database = '{DB}' AND active"
    )[0]
    parts = store.column(f"SELECT count() FROM system.parts WHERE database = '{DB}' AND active")[0]
    filled = f"in {seconds:.0f}s" if seconds else "(kept from an earlier run)"
    print(
        f"  {total:,} requests {filled}; codes mode: {elements / total / 2:.0f} features per request "
        f"and SAE on average ({elements:,} in all); store {size} compressed in {parts} parts "
        f"(background merges settled {settle_s:.0f}s after the fill)\n"
    )
    print(
        f"contrast: 'pos' ({total // 100:,} requests) against every other request, median of {args.queries} "
        "(with pairs: one run), on an open engine (as a server's is; the first query warmed it)"
    )
    fleet_contrast(store, DB, pb.ContrastRequest(positives=pb.RequestSelector(labels=["pos"]), top_pairs=0))
    for mode, name in ((pb.CODE_MODE_CODES, "codes"), (pb.CODE_MODE_ARGMAX_TOKEN, "argmax-token")):
        for pairs in (0, 20):
            request = pb.ContrastRequest(
                positives=pb.RequestSelector(labels=["pos"]), mode=mode, top=50, top_pairs=pairs
            )
            repeats = 1 if pairs else args.queries  # pairs over every other request scan them all: once
            seconds, answer = timed(lambda r=request: fleet_contrast(store, DB, r), repeats)
            top = [(f.slot, f.feature) for f in answer.features[:3]]
            print(
                f"  {name:<13} {'with 20 pairs' if pairs else 'features only':<14} {seconds * 1e3:8.0f} ms   "
                f"({answer.positives:,} vs {answer.negatives:,}; top {top})"
            )
    print("\nthe same contrast over one replica's requests: local in-memory index vs the fleet store")
    index, registry, lock = local_index_for(store, "replica-0", pb.CODE_MODE_CODES)
    request = pb.ContrastRequest(
        positives=pb.RequestSelector(labels=["pos"]), top=50, top_pairs=20, instances=["replica-0"]
    )
    with lock:
        view = index.view()
    resolved = Resolved({}, {}, frozenset(), "replica-0")
    local_s, local = timed(lambda: contrast(request, view, registry, resolved, time.time_ns()), args.queries)
    fleet_s, remote = timed(lambda: fleet_contrast(store, DB, request), args.queries)
    local.ClearField("elapsed_ms")
    assert remote == local, "the fleet answer differs from the local index's"
    print(
        f"  {local.positives + local.negatives:,} requests: local {local_s * 1e3:.1f} ms, "
        f"fleet {fleet_s * 1e3:.0f} ms (x{fleet_s / local_s:.1f}); identical answers"
    )


def wait_until_delivering(exporter: FleetExporter, limit_s: float = 60.0) -> None:
    """As a sidecar at start, before traffic: the delivery process is up (its imports, the engine, the schema: ~1 s
    of CPU, still counted with the rest of its CPU once it ends), so that a run does not time its start-up."""
    started = time.perf_counter()
    while not exporter.delivery.counters() and time.perf_counter() - started < limit_s:
        time.sleep(0.05)


def ingest_run(batches, requests: int, fleet_mode: str, tmp: Path, flush_s: float = 1.0) -> dict:
    """One run: ingest (+ the request index's maintenance, which also hands requests to the exporter) of
    `requests` requests. Returns the ingest rate, the process CPU time per request until every request is in
    the store (all threads: ingest, exporter, the embedded engine), and how long delivery took after ingest."""
    config = SidecarConfig(evidence_dir=tmp / "evidence")
    clock = SimulatedClock()
    core = SidecarCore(config, EvidenceStore(config.evidence_dir), clock=clock)
    store_dir = tmp / "store"
    exporter = None
    if fleet_mode != "off":
        fleet = FleetConfig(enabled=True, instance="bench", embedded_dir=store_dir, flush_interval_s=flush_s)
        exporter = core.fleet = FleetExporter(fleet, config.evidence_dir)
        exporter.start()
        wait_until_delivering(exporter)
    outage = directory_locked(store_dir) if fleet_mode == "outage" else contextlib.nullcontext()
    stream = core.open_stream(manifest())
    cpu0, children0 = time.process_time(), _children_cpu()
    with outage:
        t0 = time.perf_counter()
        for i in range(requests):
            codes, finish = batches[(2 * i) % len(batches)], batches[(2 * i + 1) % len(batches)]
            codes.codes.step = i + 1
            for s in codes.codes.slices:
                s.request_id = f"req-{i}"
            finish.finish.request_id = f"req-{i}"
            clock.now += 10**7
            core.ingest(stream, codes)
            core.ingest(stream, finish)
            if i % 100 == 99:
                core.request_index.seal(core.lock)
        core.request_index.seal(core.lock)
        ingest_s = time.perf_counter() - t0
    delivered_after = 0.0
    if exporter is not None:
        t1 = time.perf_counter()
        while exporter.snapshot()["exported"]["reports"] < requests and time.perf_counter() - t1 < 600:
            time.sleep(0.05)
        delivered_after = time.perf_counter() - t1
    cpu = time.process_time() - cpu0
    threads = {"flush_ms": 0.0, "deliver_ms": 0.0}
    if exporter is not None:
        threads = {f"{k}_ms": exporter.stats[f"{k}_cpu_ns"] / 1e6 / requests for k in ("flush", "deliver")}
        exporter.stop()  # the embedded store's delivery process ends here: its CPU is counted once it is waited for
    children = _children_cpu() - children0
    core.store.close()
    return {
        "rate": requests / ingest_s,
        "cpu_ms": (cpu + children) / requests * 1e3,
        "child_ms": children / requests * 1e3,
        "delivered_after": delivered_after,
        **threads,
    }


def _children_cpu() -> float:
    """CPU seconds of this process's ended children (the embedded store's delivery process)."""
    times = os.times()
    return times.children_user + times.children_system


def export_section(args) -> None:
    batches = make_batches(np.random.default_rng(0), 64)
    print(
        f"\nexport: {args.export_requests} requests of the ingest bench (256 tokens, k=16, 2 SAEs) per run into "
        f"one SidecarCore, modes interleaved, {args.rounds} rounds (medians)"
    )
    runs: dict[str, list[dict]] = {"off": [], "on": [], "outage": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for mode in runs:
                runs[mode].append(
                    ingest_run(batches, args.export_requests, mode, Path(tmp) / f"{mode}-{r}", args.flush_interval)
                )
    median = {m: {k: statistics.median(run[k] for run in rs) for k in rs[0]} for m, rs in runs.items()}
    off = median["off"]
    for mode, m in median.items():
        extra = ""
        if mode == "on":
            extra = f"; all in the store {m['delivered_after']:.1f}s after ingest ended"
        if mode == "outage":
            extra = f"; store held elsewhere during ingest, spool replayed {m['delivered_after']:.1f}s after"
        print(
            f"  export {mode:<7} ingest {m['rate']:6.0f} requests/s (x{m['rate'] / off['rate']:.3f}), "
            f"CPU {m['cpu_ms']:.2f} ms/request (exporter thread: spooling {m['flush_ms']:.2f}, "
            f"inserts {m['deliver_ms']:.2f}; delivery process {m['child_ms']:.2f}){extra}"
        )
    export_ms = median["on"]["cpu_ms"] - off["cpu_ms"]
    print(
        f"  export costs {export_ms:.2f} ms of CPU per request (spooling, rows, Arrow files, the embedded engine's "
        f"inserts): one core exports {1e3 / export_ms:,.0f} requests/s, "
        f"{1e3 / export_ms / off['rate']:.1f}x this ingest rate"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--replicas", type=int, default=100)
    parser.add_argument("--per-replica", type=int, default=10_000)
    parser.add_argument("--features", type=int, default=150, help="codes-mode features per request and SAE (mean)")
    parser.add_argument("--hours", type=float, default=10.0)
    parser.add_argument("--queries", type=int, default=5)
    parser.add_argument("--export-requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--flush-interval", type=float, default=1.0, help="fleet.flush_interval_s of the export runs")
    parser.add_argument("--skip-contrast", action="store_true")
    parser.add_argument("--skip-export", action="store_true")
    parser.add_argument("--store", type=Path, help="keep the filled store here and reuse it on the next run")
    args = parser.parse_args()
    if not args.skip_contrast:
        contrast_section(args)
    if not args.skip_export:
        export_section(args)


if __name__ == "__main__":
    main()
