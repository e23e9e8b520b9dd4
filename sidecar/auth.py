"""Who may call what: bearer tokens mapped to roles, checked on every RPC except the standard health check
(probes carry no secrets).

Roles (one token file each): `ingest` for producers (the plugin's workers and engine core: Ingest only),
`read` for dashboards and the API-server side (reports, queries, watches, contrasts), `admin` for changing
what the sidecar monitors or believes (Label, ReloadCircuits) plus everything `read` may do. A read token
cannot forge a report through Ingest; an ingest token cannot read evidence or relabel it. Tokens are compared
in constant time, every configured token on every call.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

import grpc

SERVICE = "/circuitwatch.v1.Monitor/"
OPEN_METHODS = ("/grpc.health.v1.Health/",)
INGEST, READ, ADMIN = "ingest", "read", "admin"
ROLES = (INGEST, READ, ADMIN)
# The role each RPC needs; admin may also call every read RPC. Server reflection reveals only the schema: read.
METHOD_ROLES = {
    "Ingest": INGEST,
    "GetReport": READ,
    "ListReports": READ,
    "WatchReports": READ,
    "QueryRequests": READ,
    "FeatureStats": READ,
    "GetCodes": READ,
    "WatchActions": READ,
    "Contrast": READ,
    "GetHealth": READ,
    "Label": ADMIN,
    "ReloadCircuits": ADMIN,
}
ALLOWED = {INGEST: {INGEST}, READ: {READ, ADMIN}, ADMIN: {ADMIN}}


def required_role(method: str) -> str:
    """The role a full method name needs (unknown Monitor methods and other services: admin)."""
    if method.startswith(SERVICE):
        return METHOD_ROLES.get(method[len(SERVICE) :], ADMIN)
    if method.startswith("/grpc.reflection."):
        return READ
    return ADMIN


class RoleInterceptor(grpc.ServerInterceptor):
    def __init__(self, tokens: Mapping[str, str]) -> None:
        """`tokens`: role -> token. One token for several roles (single-token mode) grants all of them."""
        self._tokens = [(role, f"Bearer {token}".encode()) for role, token in tokens.items()]

        def deny_unauthenticated(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (authorization metadata)")

        def deny_role(request, context):
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "this token's role may not call this method")

        self._deny = {
            grpc.StatusCode.UNAUTHENTICATED: _handlers(deny_unauthenticated),
            grpc.StatusCode.PERMISSION_DENIED: _handlers(deny_role),
        }

    def roles_of(self, metadata) -> set[str]:
        given = dict(metadata or ()).get("authorization", "").encode()
        matches = [role for role, expected in self._tokens if hmac.compare_digest(given, expected)]
        return set(matches)

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(OPEN_METHODS):
            return continuation(handler_call_details)
        roles = self.roles_of(handler_call_details.invocation_metadata)
        if roles & ALLOWED[required_role(method)]:
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        code = grpc.StatusCode.PERMISSION_DENIED if roles else grpc.StatusCode.UNAUTHENTICATED
        deny = self._deny[code]
        if handler.request_streaming:
            return deny["stream_unary"]
        if handler.response_streaming:
            return deny["unary_stream"]
        return deny["unary_unary"]


def _handlers(deny) -> dict[str, grpc.RpcMethodHandler]:
    return {
        "unary_unary": grpc.unary_unary_rpc_method_handler(deny),
        "stream_unary": grpc.stream_unary_rpc_method_handler(lambda it, ctx: deny(None, ctx)),
        "unary_stream": grpc.unary_stream_rpc_method_handler(deny),
    }
