"""The example circuit files (examples/circuits/) load as the sidecar loads them, together, and say what their
comments say they do."""

from __future__ import annotations

from pathlib import Path

from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.sidecar.circuits import load_circuit_files

from support.sidecar_harness import running_sidecar

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples" / "circuits").glob("*.yaml"))


def test_every_example_loads_together_and_reads_as_commented() -> None:
    assert {p.name for p in EXAMPLES} >= {
        "single-feature.yaml",
        "co-occurrence-window.yaml",
        "abort.yaml",
        "pinned-by-weights-hash.yaml",
    }
    circuits = {c.name: c for c in load_circuit_files(EXAMPLES).circuits}
    aborting = {name for name, c in circuits.items() if c.action == "abort"}
    assert aborting == {"prompt-injection-attempt", "leaking-system-prompt"}
    assert circuits["prompt-injection-attempt"].scope == pb.SCOPE_PROMPT
    assert circuits["instructions-for-evasion"].window == 8
    assert not circuits["instructions-for-evasion"].monotone  # it has an `unless` term
    assert sorted(circuits["instructions-for-evasion"].labels) == ["policy=evasion", "team=trust-and-safety"]
    pinned = [t.sae for t in circuits["attention-head-pattern"].terms]
    assert pinned == ["9c41e2", None] and circuits["credentials-v2-sae-only"].terms[0].sae == "blake2b:9c41e2"
    assert circuits["strong-credentials-signal"].min_tokens == 3


def test_a_sidecar_starts_with_all_of_them(tmp_path: Path) -> None:
    with running_sidecar(tmp_path, circuits=EXAMPLES) as (running, _):
        assert running.port > 0
