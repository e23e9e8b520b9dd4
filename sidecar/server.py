"""Run the sidecar: gRPC server with the Monitor service, health and reflection, TLS, auth, graceful stop."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto import circuitwatch_pb2_grpc as pb_grpc

from .auth import RoleInterceptor
from .config import SidecarConfig
from .core import SidecarCore
from .service import MonitorServicer
from .store import EvidenceStore
from .telemetry import Telemetry

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Monitor"].full_name
HARD_MESSAGE_LIMIT = 256 * 1024 * 1024  # above config.max_message_bytes, so oversize gets our clearer error
TICK_S = 0.5


@dataclass
class RunningSidecar:
    server: grpc.Server
    core: SidecarCore
    store: EvidenceStore
    telemetry: Telemetry
    port: int
    health: health.HealthServicer
    stopping: threading.Event
    _ticker: threading.Thread

    def stop(self, grace_s: float = 5.0) -> None:
        """Drain: refuse new RPCs, let ingest streams finish, finalise open requests, flush the store."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()
        self._ticker.join(timeout=2)
        self.core.shutdown()
        self.telemetry.shutdown()  # after the drain: spans of the reports finalised just now are flushed
        self.store.close()
        log.info("sidecar stopped")


def start(config: SidecarConfig) -> RunningSidecar:
    store = EvidenceStore(config.evidence_dir, config.evidence_synchronous)
    core = SidecarCore(config, store)
    host = config.listen.rpartition(":")[0]
    telemetry = Telemetry.start(config.telemetry, host)
    core.instruments = telemetry.instruments(core.producer_stats)
    core.watchers.listeners.append(telemetry.report_finished)
    stopping = threading.Event()
    tokens = config.role_tokens()
    interceptors = [RoleInterceptor(tokens)] if tokens else []
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="circuitwatch-rpc"),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", HARD_MESSAGE_LIMIT),
            ("grpc.max_send_message_length", HARD_MESSAGE_LIMIT),
        ],
    )
    pb_grpc.add_MonitorServicer_to_server(MonitorServicer(core, stopping), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    if config.tls is not None:
        tls = config.tls
        credentials = grpc.ssl_server_credentials(
            [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
            root_certificates=tls.client_ca_file.read_bytes() if tls.client_ca_file else None,
            require_client_auth=tls.client_ca_file is not None,
        )
        port = server.add_secure_port(config.listen, credentials)
    else:
        port = server.add_insecure_port(config.listen)
    if port == 0:
        raise OSError(f"cannot listen on {config.listen}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    def tick() -> None:
        while not stopping.wait(TICK_S):
            try:
                core.tick()
            except Exception:
                log.exception("maintenance tick failed")

    ticker = threading.Thread(target=tick, name="circuitwatch-tick", daemon=True)
    ticker.start()
    log.info(
        "sidecar serving on %s:%d (%s, %s), %d circuits, evidence in %s",
        host,
        port,
        "TLS" if config.tls else "plaintext",
        ("role tokens" if config.auth else "one bearer token for every role") if tokens else "no auth",
        len(core.circuits.circuits),
        store.path,
    )
    return RunningSidecar(server, core, store, telemetry, port, health_servicer, stopping, ticker)


def serve(config: SidecarConfig) -> None:
    """Run until SIGTERM/SIGINT; SIGHUP reloads the circuit files."""
    running = start(config)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    signal.signal(signal.SIGHUP, lambda *_: running.core.reload_circuits())
    print(f"circuitwatch sidecar listening on port {running.port}", flush=True)
    done.wait()
    running.stop()
