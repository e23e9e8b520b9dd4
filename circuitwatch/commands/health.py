"""`circuitwatch health`: each SAE's state in the sidecar (drift against its calibration, the producers'
wiring checks) with the numbers behind it. Exit code 0 when every SAE is OK or warming up, 3 when any is
drifting, mis-wired or uncalibrated, so a probe or a cron job can alert on it."""

from __future__ import annotations

import argparse
import json

from google.protobuf.json_format import MessageToDict

from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto.names import message_tap_label, slot_state_name

from .connection import Connection, add_connection_options

ALARM_EXIT = 3
QUIET_STATES = (pb.SLOT_STATE_OK, pb.SLOT_STATE_WARMING_UP)


def add_health_parser(sub) -> None:
    parser = sub.add_parser("health", help="each SAE's drift and wiring state, with the numbers")
    add_connection_options(parser)
    parser.add_argument("--json", action="store_true", help="print the response as JSON")


def run_health(args: argparse.Namespace) -> int:
    response = Connection(args).call("GetHealth", pb.GetHealthRequest())
    if args.json:
        print(json.dumps(MessageToDict(response, preserving_proto_field_name=True), indent=1))
    else:
        print(_table(response))
    return 0 if all(s.state in QUIET_STATES for s in response.slots) else ALARM_EXIT


def _table(response: pb.HealthResponse) -> str:
    if not response.slots:
        return "no SAE has reached the sidecar yet"
    lines = [
        f"{'sae':28} {'tap':15} {'state':12} {'tokens':>9} {'js':>6} {'err':>6} {'err x':>6} {'norm x':>6} "
        f"{'dead':>5} {'dense':>5}"
    ]
    for s in response.slots:
        state = slot_state_name(s.state)
        lines.append(
            f"{s.sae[:28]:28} {message_tap_label(s):15} {state:12} {s.tokens:>9.0f} {s.js_divergence:>6.3f} "
            f"{s.error_mean:>6.3f} "
            f"{s.error_ratio:>6.2f} {s.norm_ratio:>6.2f} {s.dead_fraction:>5.2f} {s.dense_fraction:>5.2f}"
        )
        lines += [f"    {reason}" for reason in s.reasons]
        for instance, check in sorted(s.wiring.items()):
            verdict = pb.WiringVerdict.Name(check.verdict).removeprefix("WIRING_VERDICT_").lower()
            lines.append(f"    wiring check on {instance}: {verdict}: {check.detail}")
    lines.append("")
    lines.append(response.rule)
    return "\n".join(lines)
