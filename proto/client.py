"""Connecting to the sidecar as a client: channel with optional TLS, bearer-token metadata, and the back-off
that every reconnect loop uses. One home for the plugin's emitter and report fetcher and for the CLI."""

from __future__ import annotations

from pathlib import Path

import grpc


def open_channel(
    address: str, tls_ca_file: Path | None = None, *, aio: bool = False, tls_server_name: str | None = None
):
    """A channel to host:port, TLS-verified against `tls_ca_file` when given; `aio` for asyncio callers.
    `tls_server_name`: the name the certificate must carry when the address does not (a probe on 127.0.0.1)."""
    module = grpc.aio if aio else grpc
    if tls_ca_file is not None:
        credentials = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca_file).read_bytes())
        options = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else None
        return module.secure_channel(address, credentials, options=options)
    return module.insecure_channel(address)


def read_token(token_file: Path | None) -> str | None:
    """The bearer token in a file (surrounding whitespace dropped), or None without a file."""
    return Path(token_file).read_text().strip() if token_file is not None else None


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """Call metadata carrying the token; None when there is no token."""
    return (("authorization", f"Bearer {token}"),) if token else None


class Backoff:
    """Exponential back-off between reconnect attempts: min_s, doubling up to max_s, reset on success."""

    def __init__(self, min_s: float, max_s: float) -> None:
        self.min_s, self.max_s = min_s, max_s
        self.current = min_s

    def reset(self) -> None:
        self.current = self.min_s

    def next(self) -> float:
        """The delay to wait now; the following one doubles."""
        delay = self.current
        self.current = min(self.current * 2, self.max_s)
        return delay
