"""`circuitwatch probe`: ask the sidecar's standard gRPC health service (grpc.health.v1 Health.Check) whether it
serves. Exit code 0 on SERVING, 1 otherwise (not serving, unknown service, unreachable, timed out), with one line
on stderr naming the address and the reason, so a container HEALTHCHECK or an exec probe can run it. The health
service is open without a token; a token given anyway is sent. Imports neither torch nor the sidecar."""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from circuitwatch.proto.client import bearer_metadata, open_channel

from .connection import UsageError, add_connection_options, command_token

PROBE_TIMEOUT_S = 5.0


def add_probe_parser(sub) -> None:
    parser = sub.add_parser("probe", help="exit 0 when the sidecar's gRPC health service says SERVING, else 1")
    add_connection_options(parser)
    parser.set_defaults(timeout=PROBE_TIMEOUT_S)
    parser.add_argument(
        "--service",
        default="",
        help="health service name to check, e.g. circuitwatch.v1.Monitor (default: '', the whole server)",
    )
    parser.add_argument(
        "--tls-server-name",
        help="with --tls-ca: the name the sidecar's certificate carries, when the target address is not it",
    )


def run_probe(args: argparse.Namespace) -> int:
    if args.tls_server_name and not args.tls_ca:
        raise UsageError("--tls-server-name needs --tls-ca")
    metadata = bearer_metadata(command_token(args))
    channel = open_channel(args.target, args.tls_ca, tls_server_name=args.tls_server_name)
    where = f"{args.target}" + (f" (service {args.service!r})" if args.service else "")
    try:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=args.service), metadata=metadata, timeout=args.timeout
        )
    except grpc.RpcError as exc:
        code = exc.code()
        reason = "no such health service" if code == grpc.StatusCode.NOT_FOUND else exc.details()
        print(f"circuitwatch probe: {where}: {code.name}: {reason}", file=sys.stderr)
        return 1
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"circuitwatch probe: {where}: {status}", file=sys.stderr)
        return 1
    print(f"{where}: {status}")
    return 0
