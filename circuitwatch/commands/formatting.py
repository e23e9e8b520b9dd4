"""The identify command's human-readable answer: ranked features, pairs, evaluation and unresolved ids."""

from __future__ import annotations

import math

from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto.names import MODE_NAMES, SCOPE_NAMES, message_tap_label


def _number(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def format_contrast(response: pb.ContrastResponse, top: int, cut: int) -> str:
    lines = [
        f"positives {response.positives} ({response.positives_incomplete} incomplete), negatives "
        f"{response.negatives} ({response.negatives_incomplete} incomplete); scope {SCOPE_NAMES[response.scope]}, "
        f"mode {MODE_NAMES[response.mode]}; {response.features_seen} features seen; {response.elapsed_ms:.1f} ms",
        "",
        f"{'rank':>4} {'tap':<15} {'slot':>4} {'sae':<16} {'feature':>7} {'pos':>6} {'neg':>6} {'recall':>7} "
        f"{'precis':>7} {'fpr':>7} {'exclus':>7}",
    ]
    for f in response.features[:top]:
        lines.append(
            f"{f.rank:>4} {message_tap_label(f):<15} {f.slot:>4} {f.sae[:16]:<16} {f.feature:>7} {f.positives:>6} "
            f"{f.negatives:>6} "
            f"{f.recall:>7.3f} {f.precision:>7.3f} {f.false_positive_rate:>7.3f} {f.exclusivity:>7.3f}"
            + ("  exclusive" if f.exclusive else "")
            + ("  <- cut" if f.rank == cut else "")
        )
    if response.pairs:
        lines += ["", "cross-layer pairs (upstream -> downstream, both on the same request)"]
        for p in response.pairs:
            lines.append(
                f"  {message_tap_label(p.upstream)}:{p.upstream.feature} -> "
                f"{message_tap_label(p.downstream)}:{p.downstream.feature}  "
                f"pos {p.positives} neg {p.negatives}  edge {p.edge_score:.3f}"
            )
    if response.HasField("evaluation"):
        e = response.evaluation
        lines.append("")
        if e.truth_features:
            lines.append(
                f"truth features {e.truth_features} of {e.features_ranked}: ROC AUC {_number(e.feature_auc)}, "
                f"precision@{e.cut} {_number(e.feature_precision_at_cut)}, "
                f"recall@{e.cut} {_number(e.feature_recall_at_cut)}"
            )
        if e.requests_evaluated:
            lines.append(
                f"truth requests {e.truth_requests} of {e.requests_evaluated}: ROC AUC {_number(e.request_auc)}, "
                f"precision@{e.cut} {_number(e.request_precision_at_cut)}, "
                f"recall@{e.cut} {_number(e.request_recall_at_cut)}"
            )
    if response.unresolved:
        lines += ["", f"{len(response.unresolved)} request ids not used:"]
        lines += [f"  {u.request_id}: {u.reason}" for u in response.unresolved[:20]]
    return "\n".join(lines)
