"""`circuitwatch sidecar --config FILE` as a real process: health, SIGHUP reload, graceful SIGTERM, bad configs."""

from __future__ import annotations

import importlib.util
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


def sidecar_process(tmp_path: Path, circuits: str | None, stdout=subprocess.DEVNULL, text: bool = True):
    """(`circuitwatch sidecar` on a free port with its evidence in tmp_path, its port); `circuits` is the text of
    tmp_path/circuits.yaml (None: no circuit file); stderr is piped for the test to read."""
    port = free_port()
    listed = ""
    if circuits is not None:
        (tmp_path / "circuits.yaml").write_text(circuits)
        listed = "circuits: [circuits.yaml]\n"
    config = tmp_path / "sidecar.yaml"
    config.write_text(f"listen: 127.0.0.1:{port}\n{listed}evidence_dir: evidence\n")
    command = [*CLI, "sidecar", "--config", str(config)]
    return subprocess.Popen(command, stdout=stdout, stderr=subprocess.PIPE, text=text), port


def test_process_lifecycle(tmp_path: Path) -> None:
    process, port = sidecar_process(
        tmp_path, "circuits:\n  - {name: first, when: {layer: 1, feature: 1}}\n", stdout=subprocess.PIPE
    )
    circuits = tmp_path / "circuits.yaml"
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


BAD_FILES = {
    # (sidecar config, extra files {name: content}), the reason expected on stderr
    "missing token file": ("auth_token_file: absent.token\n", {}, "absent.token: auth_token_file: cannot read"),
    "world-writable token file": ("auth_token_file: open.token\n", {"open.token": "s3cret"}, "writable by group"),
    "missing TLS certificate": (
        "tls: {cert_file: absent.pem, key_file: absent.key}\n",
        {},
        "absent.key: tls.key_file: cannot read",
    ),
    "tokens in clear on the network": (
        "listen: 0.0.0.0:0\nauth_token_file: t.token\n",
        {"t.token": "s3cret"},
        "cross the network in clear",
    ),
    "cyclic YAML alias in the config": ("a: &a [*a]\n", {}, "nested deeper than"),
    "cyclic YAML alias in a circuit file": (
        "circuits: [c.yaml]\n",
        {"c.yaml": "circuits: &c [{name: x, when: *c}]\n"},
        "nested deeper than",
    ),
    "3,000-deep not": (
        "circuits: [c.yaml]\n",
        {"c.yaml": "circuits: [{name: x, when: " + "{not: " * 3000 + "{layer: 1, feature: 1}" + "}" * 3002 + "]\n"},
        "nested deeper than",
    ),
    "alias bomb": (
        "circuits: [c.yaml]\n",
        {
            "c.yaml": "a: &a [x,x,x,x,x,x,x,x]\n"
            + "".join(f"{c}: &{c} [{','.join(['*' + p] * 8)}]\n" for p, c in zip("abcdef", "bcdefg", strict=True))
        },
        "alias bomb",
    ),
    "invalid UTF-8 in a circuit file": ("circuits: [c.yaml]\n", {"c.yaml": b"circuits: []\xff\n"}, "not UTF-8"),
    "feature past 2^28": (
        "circuits: [c.yaml]\n",
        {"c.yaml": "circuits: [{name: x, when: {layer: 1, feature: 4294967296}}]\n"},
        "feature",
    ),
    "huge window": (
        "circuits: [c.yaml]\n",
        {"c.yaml": "circuits: [{name: x, window: 100000000, when: {layer: 1, feature: 1}}]\n"},
        "window: expected an integer from 1 to 65536",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_every_bad_file_exits_2_with_one_line(tmp_path: Path, case: str) -> None:
    """Bad configurations and circuit files used to exit 1 with a traceback (or hang on an alias bomb)."""
    config, files, reason = BAD_FILES[case]
    for name, content in files.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        (tmp_path / name).chmod(0o666 if "writable" in case else 0o600)
    path = tmp_path / "sidecar.yaml"
    path.write_text(config + "evidence_dir: ev\n")
    result = subprocess.run([*CLI, "sidecar", "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, (case, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, (case, result.stderr[-2000:])
    assert reason in lines[0], (case, lines[0])


def test_sighup_never_kills_the_sidecar_and_keeps_its_circuits(tmp_path: Path) -> None:
    """A reload of a circuit file with an invalid UTF-8 byte or a cyclic alias used to kill the sidecar (open
    requests unreported); an empty file reloaded fine with zero circuits (monitoring silently off)."""
    process, port = sidecar_process(tmp_path, "circuits:\n  - {name: first, when: {layer: 1, feature: 1}}\n")
    circuits = tmp_path / "circuits.yaml"
    try:
        stub = pb_grpc.MonitorStub(wait_serving(port, process))
        for broken in (b"circuits: [\xff]\n", b"circuits: &c [{name: x, when: *c}]\n", b"# nothing here\n", b""):
            circuits.write_bytes(broken)
            process.send_signal(signal.SIGHUP)
            time.sleep(0.5)
            assert process.poll() is None, process.stderr.read()
            answer = stub.ReloadCircuits(pb.ReloadCircuitsRequest(), timeout=10)
            assert not answer.ok and list(answer.circuits) == ["first"], answer
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


def test_sigterm_stops_after_an_undecodable_frame(tmp_path: Path) -> None:
    """After an undecodable frame SIGTERM used to leave the process running; the good open request must still
    be finalised."""
    process, port = sidecar_process(tmp_path, None, text=False)
    try:
        channel = wait_serving(port, process)
        garbage = channel.stream_unary(
            "/circuitwatch.v1.Monitor/Ingest", request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.RpcError):
            garbage(iter([b"\xff\xff\xff\xff not a protobuf"]), timeout=10)
        stub = pb_grpc.MonitorStub(channel)
        request = SyntheticRequest(request_id="open", num_prompt=2, num_positions=3, tokens=[1, 2, 3])
        request.codes = {0: [{1: 1.0}] * 3, 1: [{2: 1.0}] * 3}
        first = pb.CodeBatch(step=1, slices=[request.slice(s, 0, 2) for s in (0, 1)])
        stub.Ingest(iter([pb.IngestMessage(manifest=manifest()), pb.IngestMessage(codes=first)]), timeout=10)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        assert time.monotonic() - started < 25
    finally:
        if process.poll() is None:
            process.kill()
    from circuitwatch.sidecar.store import EvidenceStore

    report = EvidenceStore(tmp_path / "evidence").get("open")
    assert report is not None and report.status == pb.REPORT_STATUS_INCOMPLETE


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is not None, reason="the full install: calibrate runs (tests/commands)"
)
def test_calibrate_in_the_sidecar_only_install_says_what_to_install(tmp_path: Path) -> None:
    """`make test` runs this file in the torch-free install, where calibrate cannot run the model."""
    done = subprocess.run(
        [*CLI, "calibrate", "--model", str(tmp_path), "--sae", str(tmp_path), "--layer", "1"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("circuitwatch calibrate: needs torch") and done.stderr.count("\n") == 1
    assert "pip install 'circuitwatch[cpu]'" in done.stderr
