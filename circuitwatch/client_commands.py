"""`circuitwatch identify` and `circuitwatch label`: sidecar clients for circuit identification.

identify asks the sidecar which features separate positive requests from negative ones, prints the ranked
features and cross-layer pairs (or JSON), and with --save-circuit writes the top candidates as a circuit entry
(the query that produced it goes in its labels) and can ask the sidecar to reload, so the circuit is monitored
from the next request on. label attaches or removes labels on requests after the fact (e.g. human review).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import grpc
import yaml
from google.protobuf import json_format

from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto import circuitwatch_pb2_grpc as pb_grpc

MODES = {
    "codes": pb.CODE_MODE_CODES,
    "argmax-token": pb.CODE_MODE_ARGMAX_TOKEN,
    "argmax-mean": pb.CODE_MODE_ARGMAX_MEAN,
}
SCOPES = {"prompt": pb.SCOPE_PROMPT, "generated": pb.SCOPE_GENERATED, "both": pb.SCOPE_BOTH}
SCOPE_NAMES = {v: k for k, v in SCOPES.items()}
QUERY_IDS_KEPT = 50  # request ids quoted in a saved circuit's query label, per side
MODE_NAMES = {v: k for k, v in MODES.items()}


class UsageError(Exception):
    """A bad command line: the message names the option and the reason."""


# --- connection ----------------------------------------------------------------------------------------------


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="127.0.0.1:50061", help="sidecar host:port (default %(default)s)")
    parser.add_argument("--token-file", type=Path, help="file holding the sidecar's bearer token")
    parser.add_argument("--tls-ca", type=Path, help="CA certificate: connect with TLS and verify the sidecar")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call (default %(default)s)")


class Connection:
    def __init__(self, args: argparse.Namespace) -> None:
        if args.tls_ca:
            credentials = grpc.ssl_channel_credentials(root_certificates=args.tls_ca.read_bytes())
            self.channel = grpc.secure_channel(args.target, credentials)
        else:
            self.channel = grpc.insecure_channel(args.target)
        token = args.token_file.read_text().strip() if args.token_file else os.environ.get("CIRCUITWATCH_TOKEN")
        self.metadata = [("authorization", f"Bearer {token}")] if token else None
        self.timeout = args.timeout
        self.stub = pb_grpc.MonitorStub(self.channel)

    def call(self, method: str, request):
        return getattr(self.stub, method)(request, metadata=self.metadata, timeout=self.timeout)


# --- identify ------------------------------------------------------------------------------------------------


def add_identify_parser(sub) -> None:
    parser = sub.add_parser(
        "identify",
        help="which features separate some requests from others (circuit identification over live traffic)",
        description="Contrast positive requests against negative ones over the sidecar's index window. Each side "
        "is chosen by ids, labels, a flagged circuit, an expression and/or a time window (all criteria apply); "
        "negatives default to every other request.",
    )
    add_connection_options(parser)
    for side in ("positive", "negative", "truth"):
        group = parser.add_argument_group(f"{side} requests")
        group.add_argument(f"--{side}-id", action="append", default=[], metavar="ID", help="request id (repeat)")
        group.add_argument(f"--{side}-ids-file", type=Path, help="file with one request id per line")
        group.add_argument(f"--{side}-label", action="append", default=[], metavar="LABEL", help="label (repeat)")
        group.add_argument(f"--{side}-circuit", metavar="NAME", help="requests this circuit flagged")
        group.add_argument(
            f"--{side}-expression", metavar="YAML", help="requests whose codes match this expression, e.g. "
            "'{all: [{layer: 2, feature: 7}, {layer: 3, feature: 1}]}'"
        )  # fmt: skip
        group.add_argument(f"--{side}-since", type=float, metavar="SECONDS", help="arrived in the last SECONDS")
    parser.add_argument("--since", type=float, metavar="SECONDS", help="both sides: arrived in the last SECONDS")
    parser.add_argument("--scope", choices=SCOPES, default="both")
    parser.add_argument("--mode", choices=MODES, default="codes", help="codes (every active feature), argmax-token "
                        "(each token's strongest feature) or argmax-mean (mean-pooled argmax per slot)")  # fmt: skip
    parser.add_argument("--slot", type=int, action="append", default=[], help="only this producer slot (repeat)")
    parser.add_argument("--top", type=int, default=20, help="features listed (default %(default)s)")
    parser.add_argument("--pairs", type=int, default=10, help="cross-layer pairs listed; 0: none (default %(default)s)")
    parser.add_argument("--pair-candidates", type=int, default=16, help="best features per slot paired")
    parser.add_argument("--min-support", type=int, default=1, help="listed features fire on >= this many positives")
    parser.add_argument("--cut", type=int, default=5, help="top features forming the candidate circuit")
    parser.add_argument(
        "--truth-feature", action="append", default=[], metavar="LAYER:FEATURE",
        help="a feature known to be the answer (repeat): adds ROC AUC and precision/recall at the cut",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the sidecar's answer as JSON")
    save = parser.add_argument_group("saving the candidate circuit")
    save.add_argument("--save-circuit", metavar="NAME", help="write the top --cut features as circuit NAME")
    save.add_argument("--circuits-file", type=Path, help="circuit file to write (one the sidecar loads)")
    save.add_argument("--severity", default="medium", choices=("info", "low", "medium", "high", "critical"))
    save.add_argument("--match", default="any", help="any | all | at_least:N over the saved features (default any)")
    save.add_argument("--replace", action="store_true", help="overwrite a circuit of the same name")
    save.add_argument("--reload", action="store_true", help="ask the sidecar to reload its circuit files afterwards")


def _selector(args: argparse.Namespace, side: str, now_ns: int) -> pb.RequestSelector:
    selector = pb.RequestSelector(labels=getattr(args, f"{side}_label"))
    ids = list(getattr(args, f"{side}_id"))
    ids_file = getattr(args, f"{side}_ids_file")
    if ids_file:
        try:
            ids += [line.strip() for line in ids_file.read_text().splitlines() if line.strip()]
        except OSError as exc:
            raise UsageError(f"--{side}-ids-file {ids_file}: cannot read ({exc.strerror})") from None
    selector.request_ids.extend(ids)
    if getattr(args, f"{side}_circuit"):
        selector.circuit = getattr(args, f"{side}_circuit")
    expression = getattr(args, f"{side}_expression")
    if expression:
        selector.expression.CopyFrom(parse_expression(expression, f"--{side}-expression"))
    since = getattr(args, f"{side}_since")
    if since is not None:
        selector.window.start_unix_nanos = now_ns - int(since * 1e9)
    return selector


def parse_expression(text: str, option: str) -> pb.Expr:
    """A circuit expression in the circuit files' YAML form, validated the same way."""
    from circuitwatch.sidecar import ConfigError
    from circuitwatch.sidecar.circuits import parse_circuits
    from circuitwatch.sidecar.expressions import to_proto

    try:
        node = yaml.safe_load(text)
        (circuit,) = parse_circuits({"circuits": [{"name": option, "when": node}]}, option)
    except (yaml.YAMLError, ConfigError) as exc:
        raise UsageError(f"{option}: {exc}") from None
    return to_proto(circuit.expression)


def _truth_features(values: list[str]) -> list[pb.FeatureTerm]:
    out = []
    for value in values:
        layer, sep, feature = value.partition(":")
        if not sep or not layer.isdigit() or not feature.isdigit():
            raise UsageError(f"--truth-feature {value!r}: expected LAYER:FEATURE, e.g. 3:814")
        out.append(pb.FeatureTerm(layer=int(layer), feature=int(feature)))
    return out


def build_contrast(args: argparse.Namespace, now_ns: int) -> pb.ContrastRequest:
    request = pb.ContrastRequest(
        positives=_selector(args, "positive", now_ns),
        negatives=_selector(args, "negative", now_ns),
        scope=SCOPES[args.scope],
        mode=MODES[args.mode],
        slots=args.slot,
        top=max(args.top, args.cut),
        top_pairs=args.pairs,
        pair_candidates=args.pair_candidates if args.pairs else 0,
        min_support=args.min_support,
        cut=args.cut,
    )
    if args.since is not None:
        request.window.start_unix_nanos = now_ns - int(args.since * 1e9)
    truth_requests = _selector(args, "truth", now_ns)
    if args.truth_feature or truth_requests.ListFields():
        request.truth.features.extend(_truth_features(args.truth_feature))
        request.truth.requests.CopyFrom(truth_requests)
    return request


def run_identify(args: argparse.Namespace) -> int:
    if args.save_circuit and not args.circuits_file:
        raise UsageError("--save-circuit needs --circuits-file (a circuit file the sidecar loads)")
    _match_rule(args.match, args.cut)  # fail before asking the sidecar
    request = build_contrast(args, time.time_ns())
    connection = Connection(args)
    response = connection.call("Contrast", request)
    if args.json:
        print(json_format.MessageToJson(response, preserving_proto_field_name=True))
    else:
        print(format_contrast(response, args.top, args.cut))
    if args.save_circuit:
        features = list(response.features[: args.cut])
        if not features:
            raise UsageError("no feature fires on the positives: nothing to save")
        entry = circuit_entry(args.save_circuit, features, request, response, args.severity, args.match)
        from circuitwatch.sidecar import ConfigError
        from circuitwatch.sidecar.circuits import save_circuit

        try:
            replaced = save_circuit(args.circuits_file, entry, replace=args.replace)
        except ConfigError as exc:  # the file's problem, e.g. the name is taken: one line, exit 1
            print(f"circuitwatch identify: {exc}", file=sys.stderr)
            return 1
        verb = "replaced" if replaced else "saved"
        print(f"{verb} circuit {args.save_circuit!r} ({args.match} of {len(features)} features) in", args.circuits_file)
        if args.reload:
            reloaded = connection.call("ReloadCircuits", pb.ReloadCircuitsRequest())
            if not reloaded.ok:
                print(f"sidecar refused the reload: {reloaded.error}", file=sys.stderr)
                return 1
            if args.save_circuit not in reloaded.circuits:
                print(
                    f"sidecar reloaded but does not monitor {args.save_circuit!r}: is {args.circuits_file} among "
                    "the circuit files in its configuration?",
                    file=sys.stderr,
                )
                return 1
            print(f"sidecar reloaded: monitoring {len(reloaded.circuits)} circuits")
    return 0


def _match_rule(rule: str, cut: int) -> tuple[str, int]:
    if rule in ("any", "all"):
        return rule, 0
    kind, _, n = rule.partition(":")
    if kind != "at_least" or not n.isdigit() or not 1 <= int(n) <= cut:
        raise UsageError(f"--match {rule!r}: expected any, all or at_least:N with 1 <= N <= --cut ({cut})")
    return kind, int(n)


def circuit_entry(
    name: str,
    features: list[pb.FeatureScore],
    request: pb.ContrastRequest,
    response: pb.ContrastResponse,
    severity: str,
    match: str,
) -> dict:
    """A circuit file entry: the features pinned to their SAE's weights hash, the query in the labels."""
    terms = [{"layer": f.layer, "feature": f.feature, "sae": f.weights_hash} for f in features]
    kind, n = _match_rule(match, len(features))
    when = {"at_least": {"n": n, "of": terms}} if kind == "at_least" else {kind: terms}
    query = pb.ContrastRequest()
    query.CopyFrom(request)
    summarised = {}
    for side in ("positives", "negatives"):
        ids = list(getattr(query, side).request_ids)
        if len(ids) > QUERY_IDS_KEPT:  # a label is no place for thousands of ids: keep a count and a digest
            del getattr(query, side).request_ids[:]
            digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]
            summarised[f"{side}_ids"] = f"{len(ids)} ids, sha256 {digest} (newline-joined)"
    text = json_format.MessageToJson(query, preserving_proto_field_name=True, indent=None)
    return {
        "name": name,
        "description": f"identified by circuitwatch identify on {datetime.now(UTC).isoformat(timespec='seconds')}",
        "severity": severity,
        "scope": SCOPE_NAMES[response.scope],
        "labels": {
            "identified_by": "circuitwatch identify",
            "query": text,
            **summarised,
            "mode": MODE_NAMES[response.mode],
            "positives": response.positives,
            "negatives": response.negatives,
            "exclusivity": ",".join(f"{f.exclusivity:.3f}" for f in features),
        },
        "when": when,
    }


def _number(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def format_contrast(response: pb.ContrastResponse, top: int, cut: int) -> str:
    lines = [
        f"positives {response.positives} ({response.positives_incomplete} incomplete), negatives "
        f"{response.negatives} ({response.negatives_incomplete} incomplete); scope {SCOPE_NAMES[response.scope]}, "
        f"mode {MODE_NAMES[response.mode]}; {response.features_seen} features seen; {response.elapsed_ms:.1f} ms",
        "",
        f"{'rank':>4} {'layer':>5} {'slot':>4} {'sae':<16} {'feature':>7} {'pos':>6} {'neg':>6} {'recall':>7} "
        f"{'precis':>7} {'fpr':>7} {'exclus':>7}",
    ]
    for f in response.features[:top]:
        lines.append(
            f"{f.rank:>4} {f.layer:>5} {f.slot:>4} {f.sae[:16]:<16} {f.feature:>7} {f.positives:>6} {f.negatives:>6} "
            f"{f.recall:>7.3f} {f.precision:>7.3f} {f.false_positive_rate:>7.3f} {f.exclusivity:>7.3f}"
            + ("  exclusive" if f.exclusive else "")
            + ("  <- cut" if f.rank == cut else "")
        )
    if response.pairs:
        lines += ["", "cross-layer pairs (upstream -> downstream, both on the same request)"]
        for p in response.pairs:
            lines.append(
                f"  L{p.upstream.layer}:{p.upstream.feature} -> L{p.downstream.layer}:{p.downstream.feature}  "
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


# --- label ---------------------------------------------------------------------------------------------------


def add_label_parser(sub) -> None:
    parser = sub.add_parser("label", help="attach or remove labels on requests after the fact (audited)")
    add_connection_options(parser)
    parser.add_argument("--id", action="append", default=[], metavar="ID", required=True, help="request id (repeat)")
    parser.add_argument("--add", action="append", default=[], metavar="LABEL")
    parser.add_argument("--remove", action="append", default=[], metavar="LABEL")
    parser.add_argument("--author", default=os.environ.get("USER", ""), help="who says so (default: $USER)")
    parser.add_argument("--note", default="")


def run_label(args: argparse.Namespace) -> int:
    if not args.add and not args.remove:
        raise UsageError("give --add LABEL and/or --remove LABEL")
    request = pb.LabelRequest(request_ids=args.id, add=args.add, remove=args.remove, author=args.author, note=args.note)
    response = Connection(args).call("Label", request)
    print(f"labelled {response.updated} requests")
    for u in response.unresolved:
        print(f"  {u.request_id}: {u.reason}", file=sys.stderr)
    return 1 if response.unresolved else 0


def run(args: argparse.Namespace) -> int:
    """Run a client command; a bad command line or an RPC error is one line on stderr and a non-zero exit."""
    try:
        return run_identify(args) if args.command == "identify" else run_label(args)
    except UsageError as exc:
        print(f"circuitwatch {args.command}: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"circuitwatch {args.command}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except OSError as exc:  # an unreadable token or CA file, an unwritable circuit file
        print(f"circuitwatch {args.command}: {exc}", file=sys.stderr)
        return 1


__all__ = ["add_identify_parser", "add_label_parser", "run"]
