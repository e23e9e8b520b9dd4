"""The `circuitwatch` commands besides `sidecar`: `identify`, `label`, `health`, `probe` and `reports` talk to a
running sidecar (`identify` and `reports` to the fleet store with --fleet); `fleet init` prepares the fleet store;
`calibrate` runs a model locally to write an SAE's fidelity baseline."""

from __future__ import annotations

import argparse
import sys

import grpc

from .calibrate import add_calibrate_parser, run_calibrate
from .connection import UsageError
from .fleet import add_fleet_parser, run_fleet
from .health import add_health_parser, run_health
from .identify import add_identify_parser, run_identify
from .label import add_label_parser, run_label
from .probe import add_probe_parser, run_probe
from .reports import add_reports_parser, run_reports

COMMANDS = {
    "identify": run_identify,
    "label": run_label,
    "health": run_health,
    "probe": run_probe,
    "calibrate": run_calibrate,
    "reports": run_reports,
    "fleet": run_fleet,
}
PARSERS = (
    add_identify_parser,
    add_label_parser,
    add_health_parser,
    add_probe_parser,
    add_calibrate_parser,
    add_reports_parser,
    add_fleet_parser,
)


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
    except Exception as exc:
        message = _fleet_failure(exc)
        if message is None:
            raise
        print(f"circuitwatch {args.command}: {message}", file=sys.stderr)
        return 1


def _fleet_failure(exc: Exception) -> str | None:
    """A fleet query the store refused or could not answer, as one line. Only --fleet commands import those
    modules (the others never import the sidecar), so an exception of theirs can only come from one."""
    errors = sys.modules.get("circuitwatch.sidecar.errors")
    connection = sys.modules.get("circuitwatch.sidecar.fleet.connection")
    if errors is not None and isinstance(exc, errors.MonitorError):
        return f"{exc.code.name}: {exc}"
    if connection is not None and isinstance(exc, connection.StoreUnavailableError):
        return str(exc)
    return None


__all__ = ["COMMANDS", "PARSERS", "run"]
