"""Errors the sidecar's core raises for callers: each carries the gRPC status it maps to."""

from __future__ import annotations

import grpc


class MonitorError(Exception):
    """An error with the gRPC status it maps to; the message names the request or field and the reason."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
