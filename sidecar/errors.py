"""Errors the sidecar's core raises for callers: each carries the gRPC status it maps to."""

from __future__ import annotations

import grpc


class MonitorError(Exception):
    """An error with the gRPC status it maps to; the message names the request or field and the reason."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def check_enum(value: int, enum, field: str) -> None:
    """A wire enum value this sidecar knows (0, unspecified, takes the default)."""
    if value not in enum.values():
        names = ", ".join(enum.keys())
        raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: unknown value {value} (known: {names})")
