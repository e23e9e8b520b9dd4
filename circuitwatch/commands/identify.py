"""`circuitwatch identify`: ask the sidecar which features separate positive requests from negative ones, print
the ranked features and cross-layer pairs (or JSON), and with --save-circuit write the top candidates as a
circuit entry (saved_circuits.py) and optionally have the sidecar reload, so the circuit is monitored from the
next request on."""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import yaml
from google.protobuf import json_format

from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto.names import HOOK_POINT_NAMES, MODES, SCOPES

from .connection import Connection, UsageError, add_connection_options
from .fleet import add_store_options, open_fleet
from .formatting import format_contrast


def add_identify_parser(sub) -> None:
    parser = sub.add_parser(
        "identify",
        help="which features separate some requests from others (circuit identification over live traffic)",
        description="Contrast positive requests against negative ones over the sidecar's index window (or, with "
        "--fleet, over every replica's requests in the fleet store). Each side is chosen by ids, labels, a flagged "
        "circuit, an expression and/or a time window (all criteria apply); negatives default to every other request.",
    )
    add_connection_options(parser)
    add_store_options(parser)
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
    parser.add_argument("--model", action="append", default=[], help="both sides: only this model's requests (repeat)")
    parser.add_argument(
        "--instance", action="append", default=[], help="both sides: only this sidecar instance's requests (repeat)"
    )
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
        help="a feature known to be the answer (repeat; 3:814, or L1.attn_z.h2:814 for one tap of the layer): "
             "adds ROC AUC and precision/recall at the cut",
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


# LAYER:FEATURE, or a tap as identify prints it (L1.attn_z.h2:FEATURE)
_TRUTH_FEATURE = re.compile(r"(?:(\d+)|L(\d+)\.([a-z_]+?)(?:\.h(\d+))?):(\d+)")


def _truth_features(values: list[str]) -> list[pb.FeatureTerm]:
    out = []
    for value in values:
        match = _TRUTH_FEATURE.fullmatch(value)
        if not match or (match.group(3) is not None and match.group(3) not in HOOK_POINT_NAMES):
            raise UsageError(
                f"--truth-feature {value!r}: expected LAYER:FEATURE (3:814) or TAP:FEATURE (L1.attn_z.h2:814)"
            )
        bare_layer, layer, hook_point, head, feature = match.groups()
        term = pb.FeatureTerm(layer=int(bare_layer or layer), feature=int(feature), hook_point=hook_point or "")
        if head is not None:
            term.head = int(head)
        out.append(term)
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
        models=args.model,
        instances=args.instance,
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
    check_match_rule(args.match, args.cut)  # fail before asking the sidecar
    request = build_contrast(args, time.time_ns())
    connection = Connection(args)
    if args.fleet:  # every replica's requests, counted in the fleet store
        from circuitwatch.sidecar.fleet.queries import fleet_contrast

        started = time.perf_counter()
        response = fleet_contrast(open_fleet(args), args.fleet_database, request)
        response.elapsed_ms = (time.perf_counter() - started) * 1e3
    else:
        response = connection.call("Contrast", request)
    if args.json:
        print(json_format.MessageToJson(response, preserving_proto_field_name=True))
    else:
        print(format_contrast(response, args.top, args.cut))
    if args.save_circuit:
        features = list(response.features[: args.cut])
        if not features:
            raise UsageError("no feature fires on the positives: nothing to save")
        from circuitwatch.sidecar import ConfigError
        from circuitwatch.sidecar.saved_circuits import circuit_entry, save_circuit

        entry = circuit_entry(args.save_circuit, features, request, response, args.severity, args.match)

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


def check_match_rule(rule: str, cut: int) -> None:
    from circuitwatch.sidecar.saved_circuits import match_rule

    try:
        match_rule(rule, cut)
    except ValueError as exc:
        raise UsageError(f"--match {exc} (--cut)") from None
