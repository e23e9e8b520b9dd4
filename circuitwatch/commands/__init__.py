"""The `circuitwatch` client commands that talk to a running sidecar: `identify` and `label`."""

from __future__ import annotations

import argparse
import sys

import grpc

from .connection import UsageError
from .identify import add_identify_parser, run_identify
from .label import add_label_parser, run_label

COMMANDS = {"identify": run_identify, "label": run_label}


def run(args: argparse.Namespace) -> int:
    """Run a client command; a bad command line or an RPC error is one line on stderr and a non-zero exit."""
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"circuitwatch {args.command}: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"circuitwatch {args.command}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except OSError as exc:  # an unreadable token or CA file, an unwritable circuit file
        print(f"circuitwatch {args.command}: {exc}", file=sys.stderr)
        return 1


__all__ = ["COMMANDS", "add_identify_parser", "add_label_parser", "run"]
