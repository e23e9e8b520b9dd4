"""The sidecar image's process, without a container runtime: ENTRYPOINT + CMD and HEALTHCHECK parsed from the
Dockerfile, run from a venv's bin dir (the image's PATH starts with its venv) against the compose example's real
config laid out as the image's volumes in a temp dir. It serves, the health check passes, SIGTERM drains and exits 0.

The venv is $CIRCUITWATCH_VENV_BIN (default: the repository's .venv/bin), so the same test can run the commands from
a torch-free install (`pip install circuitwatch[sidecar]`). The test imports nothing but the standard library and
PyYAML."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from deploy.dockerfile import REPO, parse

VENV_BIN_ENV = "CIRCUITWATCH_VENV_BIN"
IMAGE_PATHS = ("/etc/circuitwatch", "/var/lib/circuitwatch")  # the sidecar image's volumes


@pytest.fixture
def venv_bin() -> Path:
    path = (REPO / os.environ.get(VENV_BIN_ENV, ".venv/bin")).resolve()  # relative: to the repository
    if not (path / "circuitwatch").is_file():
        pytest.fail(f"{path}/circuitwatch not found: set ${VENV_BIN_ENV} to the bin dir of a venv with circuitwatch")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_tmp(argv: list[str], root: Path, venv_bin: Path) -> list[str]:
    """The image's command with its executable taken from venv_bin and its volume paths moved under root."""
    out = []
    for i, word in enumerate(argv):
        for image_path in IMAGE_PATHS:
            if word.startswith(image_path):
                word = str(root) + word
        out.append(str(venv_bin / word) if i == 0 else word)
    return out


def test_sidecar_entrypoint_serves_probes_and_drains(tmp_path: Path, venv_bin: Path) -> None:
    stage = parse().stage("sidecar")
    command = stage.last("ENTRYPOINT").exec_form() + stage.last("CMD").exec_form()
    health = stage.last("HEALTHCHECK").exec_form()
    assert command[0] == health[0] == "circuitwatch"

    etc, data = tmp_path / "etc" / "circuitwatch", tmp_path / "var" / "lib" / "circuitwatch"
    shutil.copytree(REPO / "examples" / "compose" / "circuitwatch", etc)
    data.mkdir(parents=True)
    config = yaml.safe_load((etc / "sidecar.yaml").read_text())
    # what only the container gives: its own network namespace (so a free port here) and the volume mounts
    port, metrics_port = free_port(), free_port()
    config["listen"] = f"127.0.0.1:{port}"
    config["evidence_dir"] = str(tmp_path) + config["evidence_dir"]
    config["telemetry"].update(prometheus_port=metrics_port, prometheus_host="127.0.0.1")
    (etc / "sidecar.yaml").write_text(yaml.safe_dump(config))

    env = {
        "PATH": f"{venv_bin}{os.pathsep}/usr/bin:/bin",
        "HOME": str(data),
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }  # no OTEL_* endpoint: nothing is exported
    workdir = stage.last("WORKDIR").arguments
    process = subprocess.Popen(
        in_tmp(command, tmp_path, venv_bin),
        cwd=str(tmp_path) + workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    probe = [*in_tmp(health, tmp_path, venv_bin), "--target", f"127.0.0.1:{port}"]
    try:
        deadline, result = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()[1]
            result = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=30)
            if result.returncode == 0:
                break
            time.sleep(0.5)
        assert result is not None and result.returncode == 0, result and result.stderr
        assert result.stdout.strip() == f"127.0.0.1:{port}: SERVING"
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            assert response.status == 200
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert "3 circuits" in stderr and "SIGTERM: draining" in stderr and "sidecar stopped" in stderr
    assert (data / "evidence").is_dir()  # the evidence store lives in the data volume
    after = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=30)
    assert after.returncode == 1 and "UNAVAILABLE" in after.stderr
