"""Circuit expressions (data, never code) and their evaluation over sorted sets of token keys (keys.py), so
one evaluator serves a single request's report and a query over the whole index: both just supply the keys
where each feature term fires.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto.names import HOOK_POINT_NAMES

from .keys import KEY_DTYPE, KeyRuns, concat_ranges, intersect_sorted, run_starts, sorted_unique, subtract_sorted


@dataclass(frozen=True)
class Term:
    """A feature firing at a token: activation >= min_activation in the SAE chosen by slot or layer (+ sae)."""

    feature: int
    slot: int | None = None
    layer: int | None = None
    sae: str | None = None
    min_activation: float = 0.0
    hook_point: str | None = None  # with a layer: which of its taps
    head: int | None = None

    def describe(self) -> str:
        where = f"slot {self.slot}" if self.slot is not None else f"layer {self.layer}"
        if self.hook_point is not None:
            where += f" {self.hook_point}" + (f" head {self.head}" if self.head is not None else "")
        pin = f" sae {self.sae}" if self.sae else ""
        return f"{where}{pin} feature {self.feature} >= {self.min_activation:g}"


@dataclass(frozen=True)
class All:
    items: tuple[Expr, ...]


@dataclass(frozen=True)
class AnyOf:
    items: tuple[Expr, ...]


@dataclass(frozen=True)
class Not:
    item: Expr


@dataclass(frozen=True)
class AtLeast:
    n: int
    items: tuple[Expr, ...]


Expr = Term | All | AnyOf | Not | AtLeast


def terms_of(expr: Expr) -> list[Term]:
    """Distinct feature terms, in first-seen order."""
    found: dict[Term, None] = {}

    def walk(node: Expr) -> None:
        if isinstance(node, Term):
            found.setdefault(node)
        elif isinstance(node, Not):
            walk(node.item)
        else:
            for item in node.items:
                walk(item)

    walk(expr)
    return list(found)


class KeySource(Protocol):
    """Where an evaluation reads its facts; both sets are sorted, unique and already restricted to scope."""

    def term_keys(self, term: Term) -> np.ndarray: ...

    def universe(self) -> np.ndarray: ...

    def universe_runs(self) -> KeyRuns: ...


def evaluate(expr: Expr, source: KeySource, window: int = 1) -> np.ndarray:
    """Keys of the tokens where `expr` holds. With window W > 1 a term holds at position p when its feature
    fired anywhere in [p - W + 1, p], so `all` means co-occurrence inside a W-token window."""
    if window > 1:
        return evaluate_windowed(expr, source, window)
    cache: dict[Term, np.ndarray] = {}
    universe = functools.cache(source.universe)  # every token in scope: costly, so fetched only by a `not`

    def leaf(term: Term) -> np.ndarray:
        if term not in cache:
            cache[term] = source.term_keys(term)
        return cache[term]

    def walk(node: Expr) -> np.ndarray:
        if isinstance(node, Term):
            return leaf(node)
        if isinstance(node, Not):
            return subtract_sorted(universe(), walk(node.item))
        parts = [walk(item) for item in node.items]
        if isinstance(node, All):
            result = parts[0]
            for part in sorted(parts[1:], key=len):
                result = intersect_sorted(result, part)
            return result
        if isinstance(node, AnyOf):
            return sorted_unique(np.concatenate(parts))
        merged = np.sort(np.concatenate(parts), kind="stable")
        if not len(merged):
            return merged
        starts = run_starts(merged)
        counts = np.diff(np.append(starts, len(merged)))
        return merged[starts[counts >= node.n]]

    return walk(expr).astype(KEY_DTYPE, copy=False)


Intervals = tuple[np.ndarray, np.ndarray]  # (starts, ends), inclusive, sorted, disjoint and not adjacent


def evaluate_windowed(expr: Expr, source: KeySource, window: int) -> np.ndarray:
    """`evaluate` with a token window, on intervals of keys: a term that fired at k holds on [k, k + W - 1], so
    each term is a few runs rather than W keys per firing, and `all`/`any`/`at_least` count how many of their
    items cover each stretch. Keys become explicit only at a `not` and at the end, where the result is cut to
    the tokens that exist (a window reaching past a request's last token, or into the other phase)."""
    universe = functools.cache(source.universe)
    runs = functools.cache(source.universe_runs)
    step = KEY_DTYPE(window - 1)

    def walk(node: Expr) -> Intervals:
        if isinstance(node, Term):
            keys = source.term_keys(node)
            if not len(keys):
                return keys, keys
            first = np.concatenate(([True], keys[1:] - keys[:-1] > step + KEY_DTYPE(1)))
            last = np.concatenate((first[1:], [True]))
            return keys[first], keys[last] + step
        if isinstance(node, Not):
            keys = subtract_sorted(universe(), _keys_in(walk(node.item), universe(), runs()))
            return keys, keys
        parts = [walk(item) for item in node.items]
        needed = len(parts) if isinstance(node, All) else node.n if isinstance(node, AtLeast) else 1
        return _covered_by(parts, needed)

    return _keys_in(walk(expr), universe(), runs()).astype(KEY_DTYPE, copy=False)


def _covered_by(parts: list[Intervals], needed: int) -> Intervals:
    """Where at least `needed` of the interval sets overlap: a sweep over their starts (+1) and ends (-1)."""
    points = np.concatenate([p for starts, ends in parts for p in (starts, ends + KEY_DTYPE(1))])
    if not len(points):
        return points, points
    lengths = [len(starts) for starts, _ in parts for _ in (1, -1)]
    steps = np.repeat(np.tile(np.array([1, -1], np.int64), len(parts)), lengths)
    order = np.argsort(points, kind="stable")
    points, steps = points[order], steps[order]
    first = run_starts(points)
    at = points[first]
    depth = np.cumsum(steps)[np.append(first[1:], len(points)) - 1]  # after every step at the same point
    inside = depth >= needed  # on [at[i], at[i + 1] - 1]
    before = np.concatenate(([False], inside[:-1]))
    return at[inside & ~before], at[~inside & before] - KEY_DTYPE(1)


def _keys_in(intervals: Intervals, universe: np.ndarray, runs: KeyRuns) -> np.ndarray:
    """The keys of `universe` inside the intervals (sorted and disjoint, as every node yields them): each
    interval is a run of universe indices, found by counting the universe's keys below its ends among the
    universe's runs of consecutive keys, so the cost is the answer's size plus a search among runs per interval,
    never a lookup per universe key."""
    starts, ends = intervals
    if not len(starts) or not len(universe):
        return universe[:0]
    first = runs.count_below(starts)
    return universe[concat_ranges(first, runs.count_below(ends + KEY_DTYPE(1)) - first)]


def evaluate_dense(
    expr: Expr, term_mask: Callable[[Term], np.ndarray], universe: np.ndarray, window: int = 1
) -> np.ndarray:
    """`evaluate` over one request's positions as bool masks (position p at index p): the same semantics, at
    the cost of a few vectorised operations on short arrays per node. `term_mask` gives where a term fired
    (already in scope); `universe` is every position in scope."""

    def leaf(term: Term) -> np.ndarray:
        mask = term_mask(term)
        if window > 1 and mask.any():  # fired anywhere in [p - W + 1, p]
            fired = np.concatenate(([0], np.cumsum(mask, dtype=np.int64)))
            spread = fired[1:] - fired[np.maximum(np.arange(1, len(mask) + 1) - window, 0)] > 0
            mask = spread & universe
        return mask

    def walk(node: Expr) -> np.ndarray:
        if isinstance(node, Term):
            return leaf(node)
        if isinstance(node, Not):
            return universe & ~walk(node.item)
        parts = [walk(item) for item in node.items]
        if isinstance(node, All):
            return np.logical_and.reduce(parts)
        if isinstance(node, AnyOf):
            return np.logical_or.reduce(parts)
        return np.sum(parts, axis=0) >= node.n

    return walk(expr)


def is_monotone(expr: Expr) -> bool:
    """Without `not`: the expression can hold only where one of its terms fired."""
    if isinstance(expr, Term):
        return True
    if isinstance(expr, Not):
        return False
    return all(is_monotone(item) for item in expr.items)


# --- wire form -------------------------------------------------------------------------------------------


class ExpressionError(ValueError):
    pass


def from_proto(message: pb.Expr, path: str = "expression") -> Expr:
    kind = message.WhichOneof("node")
    if kind == "feature":
        term = message.feature
        target = term.WhichOneof("target")
        if target is None:
            raise ExpressionError(f"{path}.feature: needs slot or layer")
        if term.min_activation < 0:
            raise ExpressionError(f"{path}.feature: min_activation must be >= 0")
        if term.hook_point and term.hook_point not in HOOK_POINT_NAMES:
            raise ExpressionError(
                f"{path}.feature.hook_point: {term.hook_point[:40]!r} is not one of {HOOK_POINT_NAMES}"
            )
        if term.HasField("head") and term.hook_point != "attn_z":
            raise ExpressionError(f"{path}.feature.head: only with hook_point attn_z")
        return Term(
            feature=term.feature,
            slot=term.slot if target == "slot" else None,
            layer=term.layer if target == "layer" else None,
            sae=term.sae or None,
            min_activation=term.min_activation,
            hook_point=term.hook_point or None,
            head=term.head if term.HasField("head") else None,
        )
    if kind in ("all", "any"):
        items = getattr(message, kind).items
        if not items:
            raise ExpressionError(f"{path}.{kind}: needs at least one item")
        parsed = tuple(from_proto(item, f"{path}.{kind}[{i}]") for i, item in enumerate(items))
        return All(parsed) if kind == "all" else AnyOf(parsed)
    if kind == "not":
        return Not(from_proto(getattr(message, "not"), f"{path}.not"))
    if kind == "at_least":
        node = message.at_least
        if not node.items or not 1 <= node.n <= len(node.items):
            raise ExpressionError(f"{path}.at_least: n must be in 1..{len(node.items)} (number of items)")
        return AtLeast(node.n, tuple(from_proto(item, f"{path}.at_least[{i}]") for i, item in enumerate(node.items)))
    raise ExpressionError(f"{path}: empty expression")


def to_proto(expr: Expr) -> pb.Expr:
    if isinstance(expr, Term):
        term = pb.FeatureTerm(feature=expr.feature, min_activation=expr.min_activation, sae=expr.sae or "")
        if expr.slot is not None:
            term.slot = expr.slot
        else:
            term.layer = expr.layer or 0
        term.hook_point = expr.hook_point or ""
        if expr.head is not None:
            term.head = expr.head
        return pb.Expr(feature=term)
    if isinstance(expr, All):
        return pb.Expr(all=pb.ExprList(items=[to_proto(i) for i in expr.items]))
    if isinstance(expr, AnyOf):
        return pb.Expr(any=pb.ExprList(items=[to_proto(i) for i in expr.items]))
    if isinstance(expr, Not):
        return pb.Expr(**{"not": to_proto(expr.item)})
    return pb.Expr(at_least=pb.AtLeast(n=expr.n, items=[to_proto(i) for i in expr.items]))
