"""`circuitwatch probe`, the container health check: grpc.health.v1 Health.Check against a real sidecar on
127.0.0.1, run as a real CLI process. Exit 0 on SERVING; 1 with one line on stderr naming the address and the
reason when the sidecar is not serving, the service is unknown, or nothing answers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from grpc_health.v1 import health_pb2

from support.processes import CLI, free_port, start_sidecar, stop
from support.sidecar_harness import running_sidecar
from support.tls import self_signed

MONITOR = "circuitwatch.v1.Monitor"


def probe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, "probe", *args], capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}
    )


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_serving_sidecar_process(tmp_path: Path) -> None:
    port = free_port()
    process = start_sidecar(tmp_path, port)
    try:
        result = probe("--target", f"127.0.0.1:{port}")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"127.0.0.1:{port}: SERVING"
        assert result.stderr == ""
        result = probe("--target", f"127.0.0.1:{port}", "--service", MONITOR)
        assert result.returncode == 0, result.stderr
        result = probe("--target", f"127.0.0.1:{port}", "--service", "no.such.Service")
        assert result.returncode == 1
        line = one_line(result.stderr)
        assert line.startswith(f"circuitwatch probe: 127.0.0.1:{port} (service 'no.such.Service'): NOT_FOUND")
    finally:
        stop(process)


def test_not_serving(tmp_path: Path) -> None:
    """The sidecar's own health servicer says NOT_SERVING (as it does while it drains): exit 1 with the status."""
    with running_sidecar(tmp_path) as (running, _):
        target = f"127.0.0.1:{running.port}"
        assert probe("--target", target).returncode == 0
        running.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        result = probe("--target", target)
        assert result.returncode == 1
        assert one_line(result.stderr) == f"circuitwatch probe: {target}: NOT_SERVING"
        assert result.stdout == ""
        # the Monitor service's own status is checked separately
        assert probe("--target", target, "--service", MONITOR).returncode == 0
        running.health.set(MONITOR, health_pb2.HealthCheckResponse.NOT_SERVING)
        result = probe("--target", target, "--service", MONITOR)
        assert result.returncode == 1
        assert one_line(result.stderr) == f"circuitwatch probe: {target} (service '{MONITOR}'): NOT_SERVING"


def test_unreachable_fails_fast(tmp_path: Path) -> None:
    target = f"127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    result = probe("--target", target, "--timeout", "20")
    assert time.monotonic() - started < 15  # refused at once, not held for the whole timeout
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert line.startswith(f"circuitwatch probe: {target}: UNAVAILABLE: ")


def test_health_needs_no_token_but_a_given_one_is_sent(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    token.chmod(0o600)
    with running_sidecar(tmp_path, auth_token_file=token) as (running, _):
        target = f"127.0.0.1:{running.port}"
        assert probe("--target", target).returncode == 0
        assert probe("--target", target, "--token-file", str(token)).returncode == 0
        assert probe("--target", target, env={"CIRCUITWATCH_TOKEN": "wrong"}).returncode == 0
    missing = probe("--target", target, "--token-file", str(tmp_path / "absent"))
    assert missing.returncode == 1
    assert "absent" in one_line(missing.stderr)


def test_tls_with_server_name(tmp_path: Path) -> None:
    """A certificate issued for the sidecar's service name, probed on 127.0.0.1 inside its container."""
    cert, key = self_signed(tmp_path, "sidecar.circuitwatch.internal")
    with running_sidecar(tmp_path, tls={"cert_file": cert, "key_file": key}) as (running, _):
        target = f"127.0.0.1:{running.port}"
        ok = probe("--target", target, "--tls-ca", str(cert), "--tls-server-name", "sidecar.circuitwatch.internal")
        assert ok.returncode == 0, ok.stderr
        mismatch = probe("--target", target, "--tls-ca", str(cert))  # the certificate does not name 127.0.0.1
        assert mismatch.returncode == 1
        assert one_line(mismatch.stderr).startswith(f"circuitwatch probe: {target}: UNAVAILABLE")
        plaintext = probe("--target", target)
        assert plaintext.returncode == 1
        assert one_line(plaintext.stderr).startswith(f"circuitwatch probe: {target}: UNAVAILABLE")
    usage = probe("--tls-server-name", "x")
    assert usage.returncode == 2
    assert one_line(usage.stderr) == "circuitwatch probe: --tls-server-name needs --tls-ca"


def test_probe_imports_neither_torch_nor_the_sidecar_nor_the_plugin(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from circuitwatch.cli import main\n"
        f"rc = main(['probe', '--target', '127.0.0.1:{free_port()}', '--timeout', '2'])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'vllm', 'onnxruntime', 'triton')"
        " or m.startswith(('circuitwatch.sidecar', 'circuitwatch.plugin')))\n"
        "print(rc, heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "1 []", result.stdout + result.stderr
