"""Fleet queries: contrasts and report listings over every replica's rows in the fleet store.

A fleet contrast is identify.contrast_over with a FleetSource: selection, scores, ranks, pairs and evaluation
are the local code; only the counting is SQL. So the answer over the store equals the answer a single sidecar
would give over the same traffic, count for count and rank for rank (tests/sidecar/test_fleet.py checks it).

How the counts run:
- a side chosen by selectors is a set of request keys (rkey), read from `reports` (+ `request_labels`);
  its feature counts are an ARRAY JOIN over its rows of `request_features`;
- "every other request" (negatives: rest) is never listed: its counts are the population's totals from the
  `feature_counts` sums (whole hours; the partial hours at the window's edges from `request_features`) minus
  the positives' counts;
- pair counts group requests by which pair candidates they carry (one row per distinct pattern), and the
  evaluation groups them by how many circuit features they carry, so neither ships one row per request.

Differences from a sidecar's own Contrast, by design: the population is every request with codes in the store
(its retention) rather than the sidecar's index window; an unset window end means no upper bound (replicas'
clocks differ); expression selectors are refused (they run on token codes, which a sidecar's live index has).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import numpy as np

from circuitwatch.proto import circuitwatch_pb2 as pb

from ..errors import MonitorError
from ..identify import EXAMPLES, contrast_over
from ..registry import SaeIdentity, SaeRegistry
from ..request_sets import BOTH_IS_UNION, scope_bits
from .connection import FleetStore
from .schema import check_database

HOUR_NS = 3600 * 10**9
MAX_FEATURES = 1 << 28  # the fleet registry's term space (every SAE in the store)


def _in_scope(mode: int, scope: int) -> str:
    """SQL for a request_features row's features in the scope ({bits:UInt8} = scope_bits). Every feature of the
    union modes is in "both", so that case reads no scope bits at all (a third less to decompress)."""
    if scope == pb.SCOPE_BOTH and BOTH_IS_UNION[mode]:
        return "features"
    return "arrayFilter((f, s) -> bitAnd(s, {bits:UInt8}) != 0, features, scopes)"


@dataclass(frozen=True)
class FleetSide:
    """A set of requests: explicit keys (sorted unique rkeys), or the population minus `excluded` (keys None)."""

    keys: np.ndarray | None
    size: int
    incomplete: int
    request_ids: dict[int, str]
    excluded: FleetSide | None = None


@dataclass(frozen=True)
class Population:
    """The requests a contrast ranges over: arrival window, models, instances; always with codes."""

    start_ns: int
    end_ns: int  # 0: no upper bound
    models: tuple[str, ...]
    instances: tuple[str, ...]

    def where(self, arrival: str = "arrival") -> tuple[str, dict]:
        """A WHERE clause (over a table with arrival, model, instance) and its parameters."""
        clauses, params = (
            [f"{arrival} >= fromUnixTimestamp64Nano({{p_start:Int64}}, 'UTC')"],
            {"p_start": self.start_ns},
        )
        if self.end_ns:
            clauses.append(f"{arrival} <= fromUnixTimestamp64Nano({{p_end:Int64}}, 'UTC')")
            params["p_end"] = self.end_ns
        if self.models:
            clauses.append("model IN {p_models:Array(String)}")
            params["p_models"] = list(self.models)
        if self.instances:
            clauses.append("instance IN {p_instances:Array(String)}")
            params["p_instances"] = list(self.instances)
        return " AND ".join(clauses), params


def labels_clause(db: str, labels: list[str], params: dict) -> str:
    """Requests whose labels, as they now are (the latest request_labels row), include every one of `labels`."""
    params["l_first"], params["l_all"] = labels[0], labels
    return (
        f"rkey IN (SELECT rkey FROM {db}.request_labels WHERE rkey IN (SELECT rkey FROM {db}.request_labels "
        "WHERE has(labels, {l_first:String})) GROUP BY rkey "
        "HAVING hasAll(argMax(labels, version), {l_all:Array(String)}))"
    )


def fleet_registry(store: FleetStore, db: str) -> tuple[SaeRegistry, dict[str, int]]:
    """Every SAE in the store as a registry (term ids in producer-slot order, as one sidecar fed the same
    manifest numbers them), and sae id -> gslot."""
    rows = store.query(
        f"SELECT sae, min(slot) AS slot, any(name) AS name, any(architecture) AS architecture, any(layer) AS layer, "
        f"any(hook_point) AS hook_point, any(head) AS head, any(d_in) AS d_in, any(d_sae) AS d_sae, "
        f"any(weights_hash) AS weights_hash, any(selection) AS selection, any(source_format) AS source_format "
        f"FROM {db}.saes GROUP BY sae ORDER BY slot, layer, hook_point, head, name, weights_hash, sae"
    ).to_pylist()
    registry = SaeRegistry(max_total_features=MAX_FEATURES)
    gslots = {}
    for row in rows:
        identity = SaeIdentity(
            name=row["name"],
            architecture=row["architecture"],
            layer=row["layer"],
            hook_point=row["hook_point"],
            d_in=row["d_in"],
            d_sae=row["d_sae"],
            weights_hash=row["weights_hash"],
            selection=row["selection"],
            source_format=row["source_format"],
            head=None if row["head"] < 0 else row["head"],
        )
        gslots[row["sae"]] = registry.register(identity, row["slot"])
    return registry, gslots


def fleet_contrast(store: FleetStore, db: str, request: pb.ContrastRequest) -> pb.ContrastResponse:
    """The Contrast RPC's answer over every replica's requests in the store."""
    check_database(db)
    with store.held():
        registry, gslots = fleet_registry(store, db)
        population = Population(
            request.window.start_unix_nanos,
            request.window.end_unix_nanos,
            tuple(request.models),
            tuple(request.instances),
        )
        return contrast_over(request, FleetSource(store, db, population, registry, gslots), registry)


class FleetSource:
    """identify.ContrastSource over the fleet store's tables (see the module doc)."""

    def __init__(
        self, store: FleetStore, db: str, population: Population, registry: SaeRegistry, gslots: dict[str, int]
    ) -> None:
        self.store = store
        self.db = db
        self.population = population
        self.registry = registry
        self.gslots = gslots
        self.sae_by_gslot = {g: sae for sae, g in gslots.items()}
        self._cache: dict[tuple, np.ndarray] = {}
        self.bases = {sae: registry.term_bases[g] for sae, g in gslots.items()}

    # --- selecting requests ---------------------------------------------------------------------------

    def select(self, name: str, selector: pb.RequestSelector, response: pb.ContrastResponse) -> FleetSide:
        where, params = self.population.where()
        clauses = [f"has_codes AND {where}"]
        if selector.HasField("expression"):
            raise MonitorError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{name}.expression: the fleet store keeps each request's feature sets, not its token codes; "
                "select by ids, labels, circuit or window (expressions run on a sidecar's live index)",
            )
        if selector.request_ids:
            keys = self._named(name, list(dict.fromkeys(selector.request_ids)), response)
            clauses.append("rkey IN {s_keys:Array(UInt64)}")
            params["s_keys"] = keys
        if selector.labels:
            clauses.append(labels_clause(self.db, list(selector.labels), params))
        if selector.circuit:
            clauses.append("has(flags, {s_circuit:String})")
            params["s_circuit"] = selector.circuit
            known = self.store.column(
                f"SELECT count() FROM {self.db}.reports WHERE has(flags, {{c:String}})", {"c": selector.circuit}
            )
            if not known[0]:
                raise MonitorError(
                    grpc.StatusCode.NOT_FOUND,
                    f"{name}.circuit: {selector.circuit!r} flagged no request in the fleet store",
                )
        if selector.HasField("window"):
            clauses.append("arrival >= fromUnixTimestamp64Nano({s_start:Int64}, 'UTC')")
            params["s_start"] = selector.window.start_unix_nanos
            if selector.window.end_unix_nanos:
                clauses.append("arrival <= fromUnixTimestamp64Nano({s_end:Int64}, 'UTC')")
                params["s_end"] = selector.window.end_unix_nanos
        rows = self.store.query(
            f"SELECT rkey, request_id, complete FROM {self.db}.reports WHERE {' AND '.join(clauses)}", params
        )
        keys = np.asarray(rows.column("rkey").to_numpy(), dtype=np.uint64)
        keys, first = np.unique(keys, return_index=True)
        ids = rows.column("request_id").to_pylist()
        complete = np.asarray(rows.column("complete").to_numpy(zero_copy_only=False), dtype=bool)[first]
        return FleetSide(
            keys,
            len(keys),
            int(np.count_nonzero(~complete)),
            {int(k): ids[i] for k, i in zip(keys, first, strict=True)},
        )

    def _named(self, name: str, ids: list[str], response: pb.ContrastResponse) -> list[int]:
        """Keys of the requests these ids name (request id, else the response id of exactly one request);
        the others are listed unresolved with the reason."""
        where, params = self.population.where()
        rows = self.store.query(
            f"SELECT rkey, request_id, response_id, instance, has_codes AND {where} AS inside FROM {self.db}.reports "
            "WHERE request_id IN {ids:Array(String)} OR response_id IN {ids:Array(String)} LIMIT 1 BY rkey",
            {**params, "ids": ids},
        ).to_pylist()
        keys = []
        for asked in ids:
            named = [r for r in rows if r["request_id"] == asked] or [r for r in rows if r["response_id"] == asked]
            if len(named) > 1:
                instances = sorted({r["instance"] for r in named})
                reason = f"names {len(named)} requests (instances {', '.join(instances[:EXAMPLES])}): name one"
            elif not named:
                reason = "not in the fleet store"
            elif not named[0]["inside"]:
                reason = "outside the contrast's window or filters, or has no codes"
            else:
                keys.append(named[0]["rkey"])
                continue
            response.unresolved.add(request_id=asked, reason=f"{name}: {reason}")
        return keys

    def rest(self, positives: FleetSide) -> FleetSide:
        where, params = self.population.where()
        total, incomplete = (
            self.store.query(
                f"SELECT count() AS n, countIf(NOT complete) AS incomplete FROM {self.db}.reports "
                f"WHERE has_codes AND {where}",
                params,
            )
            .to_pylist()[0]
            .values()
        )
        return FleetSide(None, total - positives.size, incomplete - positives.incomplete, {}, excluded=positives)

    def overlap(self, positives: FleetSide, negatives: FleetSide) -> tuple[int, list[str]]:
        both = np.intersect1d(positives.keys, negatives.keys, assume_unique=True)
        return len(both), [positives.request_ids[int(k)] for k in both[:EXAMPLES]]

    def size(self, side: FleetSide) -> int:
        return side.size

    def incomplete(self, side: FleetSide) -> int:
        return side.incomplete

    # --- counting -------------------------------------------------------------------------------------

    def support(self, mode: int, scope: int, sides: list[FleetSide], num_terms: int) -> list[np.ndarray]:
        counts = []
        for side in sides:
            if side.keys is not None:
                counts.append(self._support_of_keys(mode, scope, side.keys, num_terms))
            else:
                total = self._support_of_population(mode, scope, num_terms)
                counts.append(total - self._support_of_keys(mode, scope, side.excluded.keys, num_terms))
        return counts

    def _support_of_keys(self, mode: int, scope: int, keys: np.ndarray, num_terms: int) -> np.ndarray:
        cache_key = ("support", mode, scope, keys.tobytes())
        if cache_key not in self._cache:  # the positives are counted for their side and again for "rest"
            self._cache[cache_key] = self._count_keys(mode, scope, keys, num_terms)
        return self._cache[cache_key]

    def _count_keys(self, mode: int, scope: int, keys: np.ndarray, num_terms: int) -> np.ndarray:
        rows = self.store.query(
            f"SELECT sae, feature, count() AS n FROM (SELECT sae, {_in_scope(mode, scope)} AS carried "
            f"FROM {self.db}.request_features WHERE mode = {{mode:UInt8}} AND rkey IN {{keys:Array(UInt64)}}) "
            "ARRAY JOIN carried AS feature GROUP BY sae, feature",
            {"mode": mode, "keys": keys.tolist(), "bits": scope_bits(scope, mode)},
        )
        return self._scatter(rows, "n", num_terms)

    def _support_of_population(self, mode: int, scope: int, num_terms: int) -> np.ndarray:
        """Totals over the population: whole hours from feature_counts, the window's partial edge hours from
        request_features."""
        column = {pb.SCOPE_PROMPT: "prompt", pb.SCOPE_GENERATED: "generated"}.get(
            scope, "either" if BOTH_IS_UNION[mode] else "pooled"
        )
        start, end = self.population.start_ns, self.population.end_ns
        first_whole = -(-start // HOUR_NS) * HOUR_NS  # hours starting at or after the window's start
        edges = [(start, first_whole - 1)] if start % HOUR_NS else []
        filters, params = Population(0, 0, self.population.models, self.population.instances).where("hour")
        clauses = [filters, "mode = {mode:UInt8}", "hour >= fromUnixTimestamp64Nano({w_from:Int64}, 'UTC')"]
        params.update(mode=mode, w_from=first_whole)
        if end:
            last_whole = (end + 1) // HOUR_NS * HOUR_NS  # hours ending at or before the window's end
            clauses.append("hour < fromUnixTimestamp64Nano({w_to:Int64}, 'UTC')")
            params["w_to"] = last_whole
            edges.append((max(last_whole, start), end))
            if last_whole <= first_whole:  # the whole window inside one hour: no whole hour, one edge
                clauses.append("0")
                edges = [(start, end)]
        rows = self.store.query(
            f"SELECT sae, feature, sum({column}) AS n FROM {self.db}.feature_counts WHERE {' AND '.join(clauses)} "
            "GROUP BY sae, feature",
            params,
        )
        total = self._scatter(rows, "n", num_terms)
        for edge_start, edge_end in edges:
            if edge_end < edge_start:
                continue
            where, params = Population(edge_start, edge_end, self.population.models, self.population.instances).where()
            rows = self.store.query(
                f"SELECT sae, feature, count() AS n FROM (SELECT sae, {_in_scope(mode, scope)} AS carried "
                f"FROM {self.db}.request_features WHERE mode = {{mode:UInt8}} AND {where}) "
                "ARRAY JOIN carried AS feature GROUP BY sae, feature",
                {**params, "mode": mode, "bits": scope_bits(scope, mode)},
            )
            total += self._scatter(rows, "n", num_terms)
        return total

    def _scatter(self, rows, column: str, num_terms: int) -> np.ndarray:
        """(sae, feature, count) rows -> counts by term id."""
        out = np.zeros(num_terms, np.int64)
        if not rows.num_rows:
            return out
        saes = rows.column("sae").to_pylist()
        base = np.array([self.bases[s] for s in saes], dtype=np.int64)
        terms = base + np.asarray(rows.column("feature").to_numpy(), dtype=np.int64)
        np.add.at(out, terms, np.asarray(rows.column(column).to_numpy(), dtype=np.int64))
        return out

    def _term_keys(self, terms: np.ndarray) -> tuple[list[str], list[int], list[int]]:
        """Term ids as the SQL below names them: the SAEs involved, and per term (SAE number << 32 | feature)."""
        gslots = np.searchsorted(np.asarray(self.registry.term_bases), terms, side="right") - 1
        saes = sorted({self.sae_by_gslot[int(g)] for g in gslots})
        keys = [
            (saes.index(self.sae_by_gslot[int(g)]) + 1) << 32 | (int(t) - self.registry.term_bases[int(g)])
            for t, g in zip(terms.tolist(), gslots.tolist(), strict=True)
        ]
        return saes, keys, sorted({k & 0xFFFFFFFF for k in keys})

    def _patterns(
        self, mode: int, scope: int, terms: np.ndarray, side_sql: str, params: dict, min_length: int, truth=None
    ) -> list[tuple[list[int], bool, int]]:
        """(the indices of `terms` a request carries, whether it is a truth request, how many requests) for
        the requests `side_sql` selects, one row per distinct pattern of at least `min_length` terms.

        A request's pattern is a 64-bit mask (the sum of 2^index over its terms, one row per SAE) while there are
        at most 63 terms. Rows without a term are dropped before grouping only when every row is read anyway: with
        a side given by keys ClickHouse would move that filter into PREWHERE and intersect every row of every
        granule read, not only the side's (4x slower, measured)."""
        saes, keys, features = self._term_keys(terms)
        absent = len(terms)
        indices = (
            f"arrayFilter(i -> i < {absent}, arrayMap(f -> transform(toUInt64(indexOf({{saes:Array(String)}}, sae)) "
            f"* 4294967296 + f, {{keys:Array(UInt64)}}, {{codes:Array(UInt32)}}, toUInt32({absent})), "
            f"arrayIntersect({_in_scope(mode, scope)}, {{features:Array(UInt32)}})))"
        )
        as_mask = absent <= 63
        per_row = f"arraySum(arrayMap(i -> intExp2(i), {indices}))" if as_mask else indices
        per_request = "sum(hits)" if as_mask else "arraySort(groupArrayArray(hits))"
        size = "bitCount(pattern)" if as_mask else "length(pattern)"
        nonempty = "hits != 0" if as_mask else "notEmpty(hits)"
        scan = "rkey IN" not in side_sql  # reading every row anyway: drop those without a term before grouping
        rows = self.store.query(
            f"SELECT pattern, is_true, count() AS n FROM ("
            f"  SELECT rkey, rkey IN {{truth:Array(UInt64)}} AS is_true, {per_request} AS pattern FROM ("
            f"    SELECT rkey, {per_row} AS hits FROM {self.db}.request_features"
            f"    WHERE mode = {{mode:UInt8}} AND sae IN {{saes:Array(String)}} AND {side_sql}"
            f"  ) {'WHERE ' + nonempty if scan else ''} GROUP BY rkey"
            f") WHERE {size} >= {min_length} GROUP BY pattern, is_true",
            {
                **params,
                "mode": mode,
                "bits": scope_bits(scope, mode),
                "saes": saes,
                "keys": keys,
                "codes": list(range(len(terms))),
                "features": features,
                "truth": [] if truth is None else truth.tolist(),
            },
        ).to_pylist()
        if as_mask:
            return [([i for i in range(absent) if r["pattern"] >> i & 1], bool(r["is_true"]), r["n"]) for r in rows]
        return [(r["pattern"], bool(r["is_true"]), r["n"]) for r in rows]

    def pair_counts(self, mode: int, scope: int, candidates: np.ndarray, sides: list[FleetSide]) -> list[np.ndarray]:
        counts = []
        for side in sides:
            if side.keys is not None:
                counts.append(self._pair_matrix(mode, scope, candidates, side.keys))
            else:
                total = self._pair_matrix(mode, scope, candidates, None)
                counts.append(total - self._pair_matrix(mode, scope, candidates, side.excluded.keys))
        return counts

    def _pair_matrix(self, mode: int, scope: int, candidates: np.ndarray, keys: np.ndarray | None) -> np.ndarray:
        """Requests carrying both of each candidate pair, among `keys` (None: the population)."""
        cache_key = ("pairs", mode, scope, candidates.tobytes(), None if keys is None else keys.tobytes())
        if cache_key not in self._cache:
            self._cache[cache_key] = self._count_pairs(mode, scope, candidates, keys)
        return self._cache[cache_key]

    def _count_pairs(self, mode: int, scope: int, candidates: np.ndarray, keys: np.ndarray | None) -> np.ndarray:
        if keys is None:
            side_sql, params = self.population.where()
        else:
            side_sql, params = "rkey IN {s_keys:Array(UInt64)}", {"s_keys": keys.tolist()}
        out = np.zeros((len(candidates), len(candidates)), np.int64)
        for pattern, _, n in self._patterns(mode, scope, candidates, side_sql, params, min_length=2):
            at = np.asarray(pattern, dtype=np.int64)
            out[np.ix_(at, at)] += n
        return out

    def carried(self, mode: int, scope: int, circuit: np.ndarray, truth: FleetSide) -> tuple[np.ndarray, np.ndarray]:
        """Per request of the population (in no particular order): circuit features carried, truth or not."""
        where, params = self.population.where()
        totals = self.store.query(
            f"SELECT count() AS n, countIf(rkey IN {{truth:Array(UInt64)}}) AS t FROM {self.db}.reports "
            f"WHERE has_codes AND {where}",
            {**params, "truth": truth.keys.tolist()},
        ).to_pylist()[0]
        carried, is_true = [np.zeros(0, np.int64)], [np.zeros(0, bool)]
        if len(circuit):
            for pattern, true, n in self._patterns(mode, scope, circuit, where, params, min_length=1, truth=truth.keys):
                carried.append(np.full(n, len(pattern), np.int64))
                is_true.append(np.full(n, true, bool))
        seen = sum(len(c) for c in carried)
        seen_true = sum(int(t.sum()) for t in is_true)
        zeros_true = totals["t"] - seen_true
        zeros_false = totals["n"] - seen - zeros_true
        carried.append(np.zeros(zeros_true + zeros_false, np.int64))
        is_true += [np.ones(zeros_true, bool), np.zeros(zeros_false, bool)]
        return np.concatenate(carried), np.concatenate(is_true)


@dataclass(frozen=True)
class ReportFilter:
    """What a fleet report listing selects (every criterion applies; empty ones select everything)."""

    start_ns: int = 0  # finalised in [start_ns, end_ns], as a sidecar's ListReports window
    end_ns: int = 0
    request_ids: tuple[str, ...] = ()  # request ids or response ids
    labels: tuple[str, ...] = ()  # carrying every one, as the labels now are
    circuit: str = ""
    flagged_only: bool = False
    models: tuple[str, ...] = ()
    instances: tuple[str, ...] = ()
    limit: int = 100


def fleet_reports(store: FleetStore, db: str, selection: ReportFilter) -> list[tuple[str, pb.Report]]:
    """(instance, report) newest (last finalised) first, each report with its label changes: what the sidecars'
    ListReports would list together."""
    check_database(db)
    population = Population(selection.start_ns, selection.end_ns, selection.models, selection.instances)
    where, params = population.where("finalized")
    clauses = [where]
    if selection.request_ids:
        clauses.append("(request_id IN {ids:Array(String)} OR response_id IN {ids:Array(String)})")
        params["ids"] = list(selection.request_ids)
    if selection.labels:
        clauses.append(labels_clause(db, list(selection.labels), params))
    if selection.circuit:
        clauses.append("has(flags, {circuit:String})")
        params["circuit"] = selection.circuit
    if selection.flagged_only:
        clauses.append("notEmpty(flags)")
    with store.held():
        rows = store.query(
            f"SELECT instance, request_id, rkey, hex(report) AS report FROM {db}.reports WHERE {' AND '.join(clauses)} "
            f"ORDER BY finalized DESC, instance, request_id LIMIT 1 BY instance, request_id "
            f"LIMIT {int(selection.limit)}",
            params,
        ).to_pylist()
        feedback = []
        if rows:
            feedback = store.query(
                f"SELECT instance, request_id, toUnixTimestamp64Nano(at) AS at, operation, label, author, note "
                f"FROM {db}.label_feedback WHERE rkey IN {{keys:Array(UInt64)}} ORDER BY at",
                {"keys": [r["rkey"] for r in rows]},
            ).to_pylist()
    changes: dict[tuple[str, str], list[dict]] = {}
    for change in feedback:
        changes.setdefault((change["instance"], change["request_id"]), []).append(change)
    out = []
    for row in rows:
        report = pb.Report.FromString(bytes.fromhex(row["report"]))  # hex: Arrow results carry strings as UTF-8
        for c in changes.get((row["instance"], row["request_id"]), []):
            report.feedback.add(
                unix_nanos=c["at"], operation=c["operation"], label=c["label"], author=c["author"], note=c["note"]
            )
        out.append((row["instance"], report))
    return out
