"""`circuitwatch` command line: run the sidecar; identify circuits, label requests and read SAE health through
it; calibrate an SAE's fidelity baseline."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from circuitwatch.commands import COMMANDS, PARSERS
from circuitwatch.commands import run as run_client_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="circuitwatch")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    sidecar = sub.add_parser("sidecar", help="run the gRPC sidecar (index, circuits, reports)")
    sidecar.add_argument("--config", type=Path, required=True, help="sidecar YAML configuration")
    for add_parser in PARSERS:
        add_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.command in COMMANDS:
        return run_client_command(args)
    if args.command == "sidecar":
        from circuitwatch.sidecar import ConfigError, load_config
        from circuitwatch.sidecar.server import serve

        try:
            config = load_config(args.config)
            serve(config)
        except ConfigError as exc:
            print(f"circuitwatch sidecar: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
