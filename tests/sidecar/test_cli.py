"""`circuitwatch sidecar --config FILE` as a real process: health, SIGHUP reload, graceful SIGTERM, bad configs."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto import circuitwatch_pb2_grpc as pb_grpc
from circuitwatch.sidecar import ConfigError, load_config

from support.processes import CLI, free_port, wait_serving
from support.sidecar_harness import SyntheticRequest, manifest


def test_process_lifecycle(tmp_path: Path) -> None:
    port = free_port()
    circuits = tmp_path / "circuits.yaml"
    circuits.write_text("circuits:\n  - {name: first, when: {layer: 1, feature: 1}}\n")
    config = tmp_path / "sidecar.yaml"
    config.write_text(f"listen: 127.0.0.1:{port}\ncircuits: [circuits.yaml]\nevidence_dir: evidence\n")
    process = subprocess.Popen(
        [*CLI, "sidecar", "--config", str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        channel = wait_serving(port, process)
        stub = pb_grpc.MonitorStub(channel)
        circuits.write_text("circuits:\n  - {name: second, when: {layer: 2, feature: 2}}\n")
        process.send_signal(signal.SIGHUP)
        request = SyntheticRequest(request_id="r", num_prompt=3, num_positions=3, tokens=[1, 2, 3])
        request.codes = {0: [{}, {}, {}], 1: [{2: 1.0}, {}, {}]}
        deadline = time.monotonic() + 10
        while True:  # SIGHUP reloads asynchronously: wait until the new circuit answers queries
            try:
                stub.QueryRequests(pb.QueryRequestsRequest(circuit="second"), timeout=5)
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND and time.monotonic() < deadline
                time.sleep(0.1)
        # one open request: SIGTERM must finalise it as incomplete before exiting
        stub.Ingest(
            iter(
                [
                    pb.IngestMessage(manifest=manifest()),
                    pb.IngestMessage(codes=pb.CodeBatch(step=1, slices=[request.slice(1, 0, 3)])),
                ]
            )
        )
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
        assert process.returncode == 0, stderr
        assert "circuits reloaded: second" in stderr
        assert "sidecar stopped" in stderr
    finally:
        if process.poll() is None:
            process.kill()
    from circuitwatch.sidecar.store import EvidenceStore

    store = EvidenceStore(tmp_path / "evidence")
    report = store.get("r")
    assert report is not None and report.status == pb.REPORT_STATUS_INCOMPLETE
    assert [f.circuit for f in report.flags] == ["second"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('listen: "8080"\n', r"listen: Value error, expected host:port"),
        ("index: {window_s: 0}\n", r"index.window_s: Input should be greater than 0"),
        ("circuit_files: [a.yaml]\n", r"circuit_files: Extra inputs are not permitted"),
        ("evidence_synchronous: OFF\n", r"evidence_synchronous"),
        ("[1, 2]\n", r"expected a mapping at the top level"),
        ("a: [\n", r"not valid YAML"),
    ],
)
def test_bad_config_names_file_and_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert str(info.value).startswith(str(path))


def test_cli_exits_2_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text("circuits: [missing.yaml]\nevidence_dir: ev\n")
    result = subprocess.run(
        [*CLI, "sidecar", "--config", str(path)], capture_output=True, text=True, timeout=60, env={**os.environ}
    )
    assert result.returncode == 2
    assert f"{tmp_path / 'missing.yaml'}: cannot read" in result.stderr
