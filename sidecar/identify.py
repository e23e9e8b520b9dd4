"""Circuit identification: which features separate one set of recent requests from another.

After arXiv 2405.12522 (O'Neill & Bui): a feature's code present on positive examples and absent from negative
ones marks a component of the circuit, and pairs of such features in different layers mark its edges. Here the
examples are production requests chosen by id, label, flag, expression or time, and every count comes from
the request-level index (request_index.py) with whole-array set operations: no forward passes, no Python loop
over postings.

Scores, per feature (and per pair, for "both present"):
  recall = positives carrying it / |positives|, false_positive_rate = negatives carrying it / |negatives|,
  precision = positives / (positives + negatives), exclusivity = recall - false_positive_rate (1: on every
  positive, on no negative), exclusive = on some positive and on no negative (the paper's "unique" code).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import grpc
import numpy as np
from pyroaring import BitMap

from circuitwatch.proto import circuitwatch_pb2 as pb

from .errors import MonitorError
from .expressions import Term
from .registry import SaeRegistry
from .request_index import IndexView

DEFAULT_TOP = 50
DEFAULT_TOP_PAIRS = 20
DEFAULT_PAIR_CANDIDATES = 16
DEFAULT_CUT = 5
MAX_LISTED = 10_000
EXAMPLES = 5  # request ids quoted in an error


@dataclass(frozen=True)
class Resolved:
    """What the core looked up under its lock for one contrast."""

    not_indexed: dict[str, str]  # request id named by a selector -> why it is not in the request index
    expressions: dict[str, np.ndarray]  # selector name -> sorted ridx whose codes match its expression
    loaded_circuits: frozenset[str]
    instance: str = ""  # this sidecar's fleet.instance, for ContrastRequest.instances


@dataclass(frozen=True)
class Scored:
    """Counts and scores for every term id (arrays of length registry.num_terms)."""

    positives: np.ndarray
    negatives: np.ndarray
    num_positives: int
    num_negatives: int

    @cached_property
    def recall(self) -> np.ndarray:
        return self.positives / self.num_positives

    @cached_property
    def false_positive_rate(self) -> np.ndarray:
        return self.negatives / self.num_negatives

    @cached_property
    def exclusivity(self) -> np.ndarray:
        return self.recall - self.false_positive_rate


class ContrastSource(Protocol):
    """Where a contrast reads its requests and counts. The live request-level index (IndexSource, below) and
    the fleet store (fleet/queries.py) both answer it, so selection rules, scores, ranks, pairs and evaluation
    are this module's alone and the two answers cannot drift apart. A "side" is whatever the source uses to
    name a set of requests."""

    def select(self, name: str, selector: pb.RequestSelector, response: pb.ContrastResponse): ...

    def rest(self, positives): ...

    def overlap(self, positives, negatives) -> tuple[int, list[str]]: ...

    def size(self, side) -> int: ...

    def incomplete(self, side) -> int: ...

    def support(self, mode: int, scope: int, sides: list, num_terms: int) -> list[np.ndarray]: ...

    def pair_counts(self, mode: int, scope: int, candidates: np.ndarray, sides: list) -> list[np.ndarray]: ...

    def carried(self, mode: int, scope: int, circuit: np.ndarray, truth) -> tuple[np.ndarray, np.ndarray]: ...


def contrast(
    request: pb.ContrastRequest, view: IndexView, registry: SaeRegistry, resolved: Resolved, now_ns: int
) -> pb.ContrastResponse:
    """Answer one contrast from a view of the request-level index (no lock held: the view is a copy)."""
    population = view.live(now_ns, request.window.start_unix_nanos, request.window.end_unix_nanos)
    if request.models:
        population = _both(population, _as_array(_union(view.models, request.models)))
    if request.instances and resolved.instance not in request.instances:
        population = population[:0]
    return contrast_over(request, IndexSource(view, resolved, population), registry)


def contrast_over(request: pb.ContrastRequest, source: ContrastSource, registry: SaeRegistry) -> pb.ContrastResponse:
    """The contrast itself, over any source of requests and counts."""
    scope = request.scope or pb.SCOPE_BOTH
    mode = request.mode or pb.CODE_MODE_CODES
    top = _limit(request.top, DEFAULT_TOP, "top")
    _limit(request.top_pairs, DEFAULT_TOP_PAIRS, "top_pairs")
    _limit(request.pair_candidates, DEFAULT_PAIR_CANDIDATES, "pair_candidates")
    cut = _limit(request.cut, DEFAULT_CUT, "cut")
    gslots = _gslots(request.slots, registry)
    response = pb.ContrastResponse(scope=scope, mode=mode)

    check_selector("positives", request.positives)
    positives = source.select("positives", request.positives, response)
    if request.negatives.rest or _is_empty(request.negatives):
        if request.negatives.rest and not _is_empty(_without_rest(request.negatives)):
            raise MonitorError(
                grpc.StatusCode.INVALID_ARGUMENT, "negatives: rest means every other request; give no other criteria"
            )
        negatives = source.rest(positives)
    else:
        check_selector("negatives", request.negatives)
        negatives = source.select("negatives", request.negatives, response)
        count, examples = source.overlap(positives, negatives)
        if count:
            names = ", ".join(repr(e) for e in examples[:EXAMPLES])
            raise MonitorError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{count} requests are selected as both positive and negative (e.g. {names}): "
                "make the selectors disjoint",
            )
    for name, side in (("positives", positives), ("negatives", negatives)):
        if not source.size(side):
            raise MonitorError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{name}: no finished request in the index window matches the selector "
                f"({_describe(request.positives if name == 'positives' else request.negatives)})",
            )
    response.positives, response.negatives = source.size(positives), source.size(negatives)
    response.positives_incomplete = source.incomplete(positives)
    response.negatives_incomplete = source.incomplete(negatives)

    counts = source.support(mode, scope, [positives, negatives], registry.num_terms)
    scored = Scored(counts[0], counts[1], response.positives, response.negatives)
    in_slots = _term_mask(gslots, registry)
    response.features_seen = int(np.count_nonzero(in_slots & ((scored.positives > 0) | (scored.negatives > 0))))
    ranked = _rank(scored, in_slots & (scored.positives >= max(1, request.min_support)))
    term_space = _Terms(registry)
    for rank, term in enumerate(ranked[:top].tolist(), start=1):
        response.features.append(term_space.score(term, scored, rank))

    top_pairs = request.top_pairs if request.HasField("top_pairs") else DEFAULT_TOP_PAIRS
    per_slot = request.pair_candidates or DEFAULT_PAIR_CANDIDATES
    if top_pairs:
        candidates = _pair_candidates(ranked, gslots, term_space, per_slot)
        pairs = []
        if len(candidates) >= 2:
            both = source.pair_counts(mode, scope, candidates, [positives, negatives])
            pairs = _pairs(candidates, both, scored, term_space, request.min_support)
        for i, j, count_p, count_n, edge in pairs[:top_pairs]:
            response.pairs.add(
                upstream=term_space.score(i, scored),
                downstream=term_space.score(j, scored),
                positives=count_p,
                negatives=count_n,
                edge_score=edge,
            )
    if request.HasField("truth"):
        response.evaluation.CopyFrom(
            _evaluate(request, ranked[:cut], scored, in_slots, gslots, registry, source, response)
        )
    return response


class IndexSource:
    """A contrast over the live request-level index: sides are sorted ridx arrays of the population."""

    def __init__(self, view: IndexView, resolved: Resolved, population: np.ndarray) -> None:
        self.view = view
        self.resolved = resolved
        self.population = population

    def select(self, name: str, selector: pb.RequestSelector, response: pb.ContrastResponse) -> np.ndarray:
        return _select(name, selector, self.view, self.resolved, self.population, response)

    def rest(self, positives: np.ndarray) -> np.ndarray:
        return np.setdiff1d(self.population, positives, assume_unique=True)

    def overlap(self, positives: np.ndarray, negatives: np.ndarray) -> tuple[int, list[str]]:
        both = np.intersect1d(positives, negatives, assume_unique=True)
        return len(both), [self.view.request_id(int(r)) for r in both[:EXAMPLES]]

    def size(self, side: np.ndarray) -> int:
        return len(side)

    def incomplete(self, side: np.ndarray) -> int:
        return int(np.count_nonzero(~self.view.complete[side - self.view.first_ridx]))

    def support(self, mode: int, scope: int, sides: list[np.ndarray], num_terms: int) -> list[np.ndarray]:
        return self.view.support(mode, scope, sides, num_terms)

    def pair_counts(self, mode: int, scope: int, candidates: np.ndarray, sides: list[np.ndarray]) -> list[np.ndarray]:
        """[candidates, candidates] per side: requests carrying both (co-occurrence = on the same request)."""
        carried = self.view.term_words(mode, scope, candidates)  # [candidates, words]
        counts = []
        for side in sides:
            both = carried[:, None, :] & carried[None, :, :] & self.view.side_words(side)
            counts.append(np.bitwise_count(both).sum(axis=2, dtype=np.int64))
        return counts

    def carried(self, mode: int, scope: int, circuit: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per request of the population: how many circuit features it carries, and whether it is a truth one."""
        carried = self.view.presence(mode, scope, circuit, self.population).sum(axis=0)
        return carried, np.isin(self.population, truth)


# --- selecting requests ------------------------------------------------------------------------------------


def _is_empty(selector: pb.RequestSelector) -> bool:
    return not (
        selector.request_ids
        or selector.labels
        or selector.circuit
        or selector.HasField("expression")
        or selector.HasField("window")
        or selector.rest
    )


def _without_rest(selector: pb.RequestSelector) -> pb.RequestSelector:
    copy = pb.RequestSelector()
    copy.CopyFrom(selector)
    copy.rest = False
    return copy


def _describe(selector: pb.RequestSelector) -> str:
    parts = []
    if selector.request_ids:
        parts.append(f"{len(selector.request_ids)} request ids")
    if selector.labels:
        parts.append(f"labels {list(selector.labels)}")
    if selector.circuit:
        parts.append(f"circuit {selector.circuit!r}")
    if selector.HasField("expression"):
        parts.append("an expression")
    if selector.HasField("window"):
        parts.append("a time window")
    if selector.rest:
        parts.append("rest")
    return ", ".join(parts) or "empty"


def check_selector(name: str, selector: pb.RequestSelector) -> None:
    if _is_empty(selector):
        raise MonitorError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{name}: give request ids, labels, a circuit, an expression or a window",
        )
    if selector.rest:
        raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, f"{name}: rest applies to negatives only")


def _select(
    name: str,
    selector: pb.RequestSelector,
    view: IndexView,
    resolved: Resolved,
    population: np.ndarray,
    response: pb.ContrastResponse,
) -> np.ndarray:
    """Sorted ridx of the population that meet every criterion of the selector."""
    check_selector(name, selector)
    chosen = population
    if selector.request_ids:
        ids = list(dict.fromkeys(selector.request_ids))
        found = np.array([view.ridx_by_id.get(rid, -1) for rid in ids], dtype=np.int64)
        inside = np.isin(found, population)
        for i in np.flatnonzero(~inside).tolist():
            reason = resolved.not_indexed.get(ids[i], "outside the contrast's time window")
            response.unresolved.add(request_id=ids[i], reason=f"{name}: {reason}")
        chosen = _both(chosen, found[inside])
    for label in selector.labels:
        carriers = view.labels.get(label)
        chosen = _both(chosen, _as_array(carriers))
    if selector.circuit:
        flagged = view.flags.get(selector.circuit)
        if flagged is None and selector.circuit not in resolved.loaded_circuits:
            raise MonitorError(
                grpc.StatusCode.NOT_FOUND,
                f"{name}.circuit: {selector.circuit!r} is not loaded and flagged no request in the window",
            )
        chosen = _both(chosen, _as_array(flagged))
    if selector.HasField("expression"):
        chosen = _both(chosen, resolved.expressions.get(name, np.empty(0, np.int64)))
    if selector.HasField("window"):
        end = selector.window.end_unix_nanos or np.iinfo(np.int64).max
        arrival = view.arrival[chosen - view.first_ridx]
        chosen = chosen[(arrival >= selector.window.start_unix_nanos) & (arrival <= end)]
    return chosen


def _both(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection of two sorted unique ridx arrays."""
    return np.intersect1d(a, b, assume_unique=True)


def _union(bitmaps: dict[str, BitMap], names) -> BitMap:
    return BitMap.union(BitMap(), *(bitmaps[n] for n in names if n in bitmaps))


def _as_array(bitmap) -> np.ndarray:
    if not bitmap:
        return np.empty(0, np.int64)
    return np.frombuffer(bitmap.to_array(), dtype=np.uint32).astype(np.int64)


# --- scoring -------------------------------------------------------------------------------------------------


def _limit(value: int, default: int, field: str) -> int:
    if value > MAX_LISTED:
        raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {value} is more than {MAX_LISTED}")
    return value or default


def _gslots(slots, registry: SaeRegistry) -> list[int]:
    every = registry.live()
    if not slots:
        return every
    chosen = []
    for slot in slots:
        found = [g for g in every if registry.producer_slot[g] == slot]
        if not found:
            raise MonitorError(grpc.StatusCode.NOT_FOUND, f"slots: no SAE registered as slot {slot}")
        chosen += found
    return sorted(set(chosen))


def _term_mask(gslots: list[int], registry: SaeRegistry) -> np.ndarray:
    mask = np.zeros(registry.num_terms, dtype=bool)
    for g in gslots:
        mask[registry.term_bases[g] : registry.term_bases[g] + registry.identities[g].d_sae] = True
    return mask


def _rank(scored: Scored, eligible: np.ndarray) -> np.ndarray:
    """Term ids, best first: exclusivity, then support on positives, then the lower term id."""
    terms = np.flatnonzero(eligible)
    order = np.lexsort((terms, -scored.positives[terms], -scored.exclusivity[terms]))
    return terms[order]


class _Terms:
    """Term ids back to their SAE (gslot), layer and feature id."""

    def __init__(self, registry: SaeRegistry) -> None:
        self.registry = registry
        self.bases = np.asarray(registry.term_bases, dtype=np.int64)

    def gslots(self, terms: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.bases, terms, side="right") - 1

    def layers(self, terms: np.ndarray) -> np.ndarray:
        return np.array([self.registry.identities[g].layer for g in self.gslots(terms).tolist()], dtype=np.int64)

    def score(self, term: int, scored: Scored, rank: int = 0) -> pb.FeatureScore:
        """The answer's entry for one feature, with its SAE named."""
        gslot = int(self.gslots(np.int64(term)))
        identity = self.registry.identities[gslot]
        a, b = int(scored.positives[term]), int(scored.negatives[term])
        score = pb.FeatureScore(
            slot=self.registry.producer_slot[gslot],
            layer=identity.layer,
            hook_point=identity.hook_point,
            sae=identity.name,
            weights_hash=identity.weights_hash,
            feature=term - int(self.bases[gslot]),
            positives=a,
            negatives=b,
            recall=scored.recall[term],
            precision=a / (a + b) if a + b else 0.0,
            false_positive_rate=scored.false_positive_rate[term],
            exclusivity=scored.exclusivity[term],
            exclusive=a > 0 and b == 0,
            rank=rank,
        )
        if identity.head is not None:
            score.head = identity.head
        return score


def _pair_candidates(ranked: np.ndarray, gslots: list[int], terms: _Terms, per_slot: int) -> np.ndarray:
    """The best `per_slot` ranked terms of each slot (pairs are formed among these)."""
    owner = terms.gslots(ranked)
    return np.concatenate([ranked[owner == g][:per_slot] for g in gslots] or [np.empty(0, np.int64)])


def _pairs(
    candidates: np.ndarray,
    both: list[np.ndarray],
    scored: Scored,
    terms: _Terms,
    min_support: int,
) -> list[tuple[int, int, int, int, float]]:
    """(upstream term, downstream term, positives, negatives, edge score) for candidate pairs in different
    layers, best first (edge score, then the weaker member's exclusivity). `both` holds, per side, how many
    requests carry both members of each candidate pair."""
    layers = terms.layers(candidates)
    upstream, downstream = np.nonzero(layers[:, None] < layers[None, :])
    count_p, count_n = both[0][upstream, downstream], both[1][upstream, downstream]
    keep = count_p >= max(1, min_support)
    upstream, downstream, count_p, count_n = upstream[keep], downstream[keep], count_p[keep], count_n[keep]
    edge = count_p / scored.num_positives - count_n / scored.num_negatives
    # a feature on every request pairs with an exclusive one at that one's score: among equal edges, pairs
    # whose weaker member is itself more exclusive come first
    weaker = np.minimum(scored.exclusivity[candidates[upstream]], scored.exclusivity[candidates[downstream]])
    order = np.lexsort((candidates[downstream], candidates[upstream], -count_p, -weaker, -edge))
    return [
        (int(candidates[upstream[k]]), int(candidates[downstream[k]]), int(count_p[k]), int(count_n[k]), float(edge[k]))
        for k in order.tolist()
    ]


# --- evaluation against ground truth -----------------------------------------------------------------------


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied scores counted half); NaN without both classes."""
    labels = np.asarray(labels, dtype=bool)
    num_true = int(labels.sum())
    num_false = len(labels) - num_true
    if not num_true or not num_false:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    below = np.concatenate(([0], np.cumsum(counts)[:-1]))
    average_rank = below + (counts + 1) / 2  # 1-based ranks, ties averaged
    rank_sum = average_rank[inverse][labels].sum()
    return float((rank_sum - num_true * (num_true + 1) / 2) / (num_true * num_false))


def _evaluate(
    request: pb.ContrastRequest,
    circuit: np.ndarray,
    scored: Scored,
    in_slots: np.ndarray,
    gslots: list[int],
    registry: SaeRegistry,
    source: ContrastSource,
    response: pb.ContrastResponse,
) -> pb.Evaluation:
    evaluation = pb.Evaluation(cut=len(circuit))
    truth = request.truth
    if truth.features:
        wanted = np.zeros(registry.num_terms, dtype=bool)
        for i, feature in enumerate(truth.features):
            term = Term(
                feature=feature.feature,
                slot=feature.slot if feature.WhichOneof("target") == "slot" else None,
                layer=feature.layer if feature.WhichOneof("target") == "layer" else None,
                sae=feature.sae or None,
                hook_point=feature.hook_point or None,
                head=feature.head if feature.HasField("head") else None,
            )
            found = [g for g in registry.resolve(term, among=gslots) if feature.feature < registry.identities[g].d_sae]
            if not found:
                raise MonitorError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"truth.features[{i}]: no SAE among the contrast's slots has feature {feature.feature} there",
                )
            wanted[[registry.term_bases[g] + feature.feature for g in found]] = True
        terms = np.flatnonzero(in_slots)
        evaluation.truth_features = int(wanted.sum())
        evaluation.features_ranked = len(terms)
        evaluation.feature_auc = roc_auc(scored.exclusivity[terms], wanted[terms])
        hits = int(wanted[circuit].sum())
        evaluation.feature_precision_at_cut = hits / len(circuit) if len(circuit) else 0.0
        evaluation.feature_recall_at_cut = hits / evaluation.truth_features
    if not _is_empty(truth.requests):
        check_selector("truth.requests", truth.requests)
        truth_side = source.select("truth.requests", truth.requests, response)
        mode, scope = request.mode or pb.CODE_MODE_CODES, request.scope or pb.SCOPE_BOTH
        carried, is_true = source.carried(mode, scope, circuit, truth_side)
        flagged = carried > 0
        evaluation.truth_requests = int(is_true.sum())
        evaluation.requests_evaluated = len(carried)
        evaluation.request_auc = roc_auc(carried, is_true)
        hits = int((flagged & is_true).sum())
        evaluation.request_precision_at_cut = hits / int(flagged.sum()) if flagged.any() else 0.0
        evaluation.request_recall_at_cut = hits / evaluation.truth_requests if evaluation.truth_requests else 0.0
    return evaluation
