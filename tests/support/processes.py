"""Real processes for tests: the `circuitwatch` CLI, a sidecar process, vLLM's OpenAI server, and stopping them
so that no EngineCore or worker is left holding memory."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# The installed console script, as users run it (`python -m` from the checkout would import the source folder
# instead of the installed package, and hide a broken install).
CLI = [str(Path(sys.executable).with_name("circuitwatch"))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(port: int, process: subprocess.Popen, timeout: float = 30) -> grpc.Channel:
    """A channel to the sidecar once its health service says SERVING; fails early if the process exits."""
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1]
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return channel
        except grpc.RpcError:
            time.sleep(0.2)
    raise TimeoutError("sidecar did not become healthy")


def start_sidecar(tmp_path: Path, port: int, extra_config: str = "", log_name: str | None = None) -> subprocess.Popen:
    """`circuitwatch sidecar` on 127.0.0.1:port with its evidence in tmp_path; `extra_config` is YAML appended to
    the config file; stderr goes to tmp_path/log_name (appended: restarts keep the earlier log) or nowhere."""
    config = tmp_path / "sidecar.yaml"
    config.write_text(f"listen: 127.0.0.1:{port}\nevidence_dir: evidence\n{extra_config}")
    stderr = open(tmp_path / log_name, "a") if log_name else subprocess.DEVNULL  # noqa: SIM115 - the process owns it
    process = subprocess.Popen([*CLI, "sidecar", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=stderr)
    wait_serving(port, process)
    return process


def start_vllm(
    model: Path, tmp_path: Path, port: int, plugin_config: Path | None, engine_args: tuple[str, ...] = ()
) -> subprocess.Popen:
    """vLLM's OpenAI server (multi-process: spawned engine core and worker) with the plugin configured (None: the
    plugin installed but not configured, so it does nothing)."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    env.pop("CIRCUITWATCH_CONFIG", None)
    if plugin_config is not None:
        env["CIRCUITWATCH_CONFIG"] = str(plugin_config)
    command = [
        sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry",
        "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", "512", "--max-num-batched-tokens", "64",
        "--max-num-seqs", "32", "--seed", "0", *engine_args,
    ]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=open(tmp_path / "vllm.log", "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vLLM exited: {(tmp_path / 'vllm.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return process
        except OSError:
            time.sleep(1)
    stop(process)
    raise TimeoutError("vLLM server did not start")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 30 s."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
