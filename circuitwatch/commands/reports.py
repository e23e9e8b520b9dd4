"""`circuitwatch reports`: list finished reports, from one sidecar (ListReports) or from the fleet store (every
replica, with selectors a single sidecar's listing lacks: labels, circuit, model, instance)."""

from __future__ import annotations

import argparse
import json
import time

from google.protobuf import json_format

from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto.names import severity_name, status_name

from .connection import Connection, UsageError, add_connection_options
from .fleet import add_store_options, open_fleet


def add_reports_parser(sub) -> None:
    parser = sub.add_parser("reports", help="list finished reports (one sidecar, or the whole fleet with --fleet)")
    add_connection_options(parser)
    add_store_options(parser)
    parser.add_argument("--since", type=float, metavar="SECONDS", help="finalised in the last SECONDS")
    parser.add_argument("--id", action="append", default=[], metavar="ID", help="request or response id (repeat)")
    parser.add_argument("--flagged", action="store_true", help="only reports with a flag")
    parser.add_argument("--limit", type=int, default=20, help="latest first, at most this many (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    fleet_only = parser.add_argument_group("fleet selectors (with --fleet)")
    fleet_only.add_argument("--label", action="append", default=[], metavar="LABEL", help="carrying it (repeat)")
    fleet_only.add_argument("--circuit", metavar="NAME", help="flagged by this circuit")
    fleet_only.add_argument("--model", action="append", default=[], metavar="MODEL")
    fleet_only.add_argument("--instance", action="append", default=[], metavar="NAME", help="sidecar instance")


def run_reports(args: argparse.Namespace) -> int:
    if not 0 < args.limit <= 10_000:
        raise UsageError(f"--limit {args.limit}: expected 1..10000")
    start = time.time_ns() - int(args.since * 1e9) if args.since is not None else 0
    if args.fleet:
        from circuitwatch.sidecar.fleet.queries import ReportFilter, fleet_reports

        selection = ReportFilter(
            start_ns=start,
            request_ids=tuple(args.id),
            labels=tuple(args.label),
            circuit=args.circuit or "",
            flagged_only=args.flagged,
            models=tuple(args.model),
            instances=tuple(args.instance),
            limit=args.limit,
        )
        found = fleet_reports(open_fleet(args), args.fleet_database, selection)
    else:
        if args.label or args.circuit or args.model or args.instance:
            raise UsageError("--label, --circuit, --model and --instance select in the fleet store: add --fleet STORE")
        request = pb.ListReportsRequest(limit=args.limit, flagged_only=args.flagged)
        request.window.start_unix_nanos = start
        request.request_ids.extend(args.id)
        request.response_ids.extend(args.id)
        found = [("", r) for r in Connection(args).call("ListReports", request).reports]
    for instance, report in found:
        if args.json:
            answer = json_format.MessageToDict(report, preserving_proto_field_name=True)
            print(json.dumps({"instance": instance, **answer} if instance else answer))
        else:
            flags = ", ".join(f"{f.circuit} ({severity_name(f.severity)})" for f in report.flags) or "-"
            where = f"{instance}/" if instance else ""
            print(
                f"{where}{report.request_id}  {status_name(report.status)}  {report.model}  "
                f"labels [{', '.join(report.labels)}]  flags: {flags}"
            )
    return 0
