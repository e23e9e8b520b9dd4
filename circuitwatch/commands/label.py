"""`circuitwatch label`: attach or remove labels on requests after the fact (e.g. human review); the sidecar
keeps every change, with author and note, in its audit trail."""

from __future__ import annotations

import argparse
import os
import sys

from circuitwatch.proto import circuitwatch_pb2 as pb

from .connection import Connection, UsageError, add_connection_options


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
