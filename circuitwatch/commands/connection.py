"""How a client command reaches the sidecar: target, TLS, bearer token and per-call timeout from the command
line, and the one way a command fails (a line on stderr, a non-zero exit)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from circuitwatch.proto import circuitwatch_pb2_grpc as pb_grpc
from circuitwatch.proto.client import bearer_metadata, open_channel, read_token

TOKEN_ENV = "CIRCUITWATCH_TOKEN"


class UsageError(Exception):
    """A bad command line: the message names the option and the reason."""


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="127.0.0.1:50061", help="sidecar host:port (default %(default)s)")
    parser.add_argument("--token-file", type=Path, help=f"file holding the sidecar's bearer token (or ${TOKEN_ENV})")
    parser.add_argument("--tls-ca", type=Path, help="CA certificate: connect with TLS and verify the sidecar")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call (default %(default)s)")


def command_token(args: argparse.Namespace) -> str | None:
    """The bearer token: --token-file, else $CIRCUITWATCH_TOKEN, else none."""
    return read_token(args.token_file) if args.token_file else os.environ.get(TOKEN_ENV)


class Connection:
    def __init__(self, args: argparse.Namespace) -> None:
        self.channel = open_channel(args.target, args.tls_ca)
        self.metadata = bearer_metadata(command_token(args))
        self.timeout = args.timeout
        self.stub = pb_grpc.MonitorStub(self.channel)

    def call(self, method: str, request):
        return getattr(self.stub, method)(request, metadata=self.metadata, timeout=self.timeout)
