"""Run the sidecar: gRPC server with the Monitor service, health and reflection, TLS, auth, graceful stop."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto import circuitwatch_pb2_grpc as pb_grpc

from .auth import RoleInterceptor
from .config import ConfigError, SidecarConfig
from .core import SidecarCore
from .fleet.exporter import FleetExporter, check_installed
from .service import MonitorServicer
from .store import EvidenceStore
from .telemetry import Telemetry

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Monitor"].full_name
TICK_S = 0.5
STOP_TIMEOUT_S = 10.0  # past the grace, stop() goes on without waiting for stuck calls


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
        if not self.server.stop(grace_s).wait(STOP_TIMEOUT_S):
            log.warning("gRPC calls still running %.0fs after the stop; finalising without them", STOP_TIMEOUT_S)
        self._ticker.join(timeout=2)
        self.core.shutdown()
        if self.core.fleet is not None:
            self.core.fleet.stop()  # after the drain: every final request is spooled, and delivered if it can be
        self.telemetry.shutdown()  # after the drain: spans of the reports finalised just now are flushed
        self.store.close()
        log.info("sidecar stopped")


def start(config: SidecarConfig) -> RunningSidecar:
    """Everything a configuration can get wrong (token files, TLS files, circuit files) fails here, before
    anything starts, with a ConfigError naming the file and the reason."""
    tokens = config.role_tokens()
    credentials = _server_credentials(config)
    if config.fleet.enabled:
        check_installed(config.fleet)
    store = EvidenceStore(config.evidence_dir, config.evidence_synchronous)
    try:
        core = SidecarCore(config, store)
        if config.fleet.enabled:
            core.fleet = FleetExporter(config.fleet, config.evidence_dir)
    except BaseException:
        store.close()
        raise
    host = config.listen.rpartition(":")[0]
    telemetry = Telemetry.start(config.telemetry)
    core.instruments = telemetry.instruments(
        core.producer_stats, core.health, core.fleet.snapshot if core.fleet is not None else None, core.counters
    )
    core.drift.listeners.append(
        lambda gslot, _drift, previous: telemetry.health_changed(core.slot_health(gslot), previous)
    )
    core.watchers.listeners.append(telemetry.report_finished)
    stopping = threading.Event()
    interceptors = [RoleInterceptor(tokens)] if tokens else []
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.thread_count, thread_name_prefix="circuitwatch-rpc"),
        interceptors=interceptors,
        options=[
            # refused by gRPC before the message is read into memory
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", max(config.max_message_bytes, 64 * 1024 * 1024)),
        ],
    )
    pb_grpc.add_MonitorServicer_to_server(MonitorServicer(core, stopping, config.limits), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    if credentials is not None:
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
    if core.fleet is not None:
        core.fleet.start()
        log.info("fleet export to %s (instance %r)", core.fleet.delivery.description, config.fleet.instance_name)
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


def _server_credentials(config: SidecarConfig) -> grpc.ServerCredentials | None:
    if config.tls is None:
        return None
    tls = config.tls
    return grpc.ssl_server_credentials(
        [(_read(tls.key_file, "tls.key_file"), _read(tls.cert_file, "tls.cert_file"))],
        root_certificates=_read(tls.client_ca_file, "tls.client_ca_file") if tls.client_ca_file else None,
        require_client_auth=tls.client_ca_file is not None,
    )


def _read(path, field: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: {field}: cannot read ({exc.strerror})") from None


def serve(config: SidecarConfig) -> None:
    """Run until SIGTERM/SIGINT; SIGHUP reloads the circuit files (a bad file never stops the sidecar)."""
    running = start(config)
    # The handlers only record the signal: a handler that took a lock (Event.set) could deadlock against the
    # main thread holding the same lock when the signal arrives.
    stop_requests: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _: stop_requests.append(signum))
    signal.signal(signal.SIGINT, lambda signum, _: stop_requests.append(signum))
    signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=running.core.reload_circuits, daemon=True).start())
    print(f"circuitwatch sidecar listening on port {running.port}", flush=True)
    while not stop_requests:
        time.sleep(0.2)
    log.info("%s: draining", signal.Signals(stop_requests[0]).name)
    running.stop()
    stuck = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if stuck:  # e.g. a gRPC thread wedged by a broken stream: everything is durable, do not wait for it
        log.warning("%d threads still running after the drain (%s); exiting anyway", len(stuck), stuck[0].name)
        logging.shutdown()
        os._exit(0)
