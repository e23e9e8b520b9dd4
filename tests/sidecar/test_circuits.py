"""Circuit files: validation errors name file, path and reason; every operator, window, scope, min_tokens and
threshold evaluates exactly as an independent brute-force evaluator says, in reports and in index queries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.sidecar import ConfigError, SidecarConfig
from circuitwatch.sidecar.circuits import parse_circuits

from support.sidecar_harness import SyntheticRequest, brute_force_matches, messages, running_sidecar

CIRCUITS = {
    "single": {"when": {"layer": 1, "feature": 3}},
    "threshold": {"when": {"layer": 2, "feature": 5, "min_activation": 2.0}},
    "slot-term": {"when": {"slot": 1, "feature": 7}},
    "all-cross-layer": {"when": {"all": [{"layer": 1, "feature": 1}, {"layer": 2, "feature": 2}]}},
    "any": {"when": {"any": [{"layer": 1, "feature": 4}, {"layer": 2, "feature": 9, "min_activation": 1.0}]}},
    "not": {"when": {"all": [{"layer": 1, "feature": 6}, {"not": {"layer": 2, "feature": 6}}]}},
    "at-least": {
        "when": {
            "at_least": {
                "n": 2,
                "of": [{"layer": 1, "feature": 0}, {"layer": 1, "feature": 8}, {"layer": 2, "feature": 0}],
            }
        }
    },
    "window": {"window": 4, "when": {"all": [{"layer": 1, "feature": 10}, {"layer": 2, "feature": 11}]}},
    "prompt-only": {"scope": "prompt", "when": {"layer": 2, "feature": 12}},
    "generated-only": {"scope": "generated", "when": {"layer": 1, "feature": 12}},
    "min-tokens": {"min_tokens": 3, "when": {"any": [{"layer": 1, "feature": 13}, {"layer": 2, "feature": 13}]}},
    "windowed-not": {"window": 3, "scope": "generated", "when": {"not": {"layer": 1, "feature": 14}}},
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("circuits")
    document = {"circuits": [{"name": name, "severity": "high", **spec} for name, spec in CIRCUITS.items()]}
    (tmp / "circuits.yaml").write_text(yaml.safe_dump(document))
    rng = np.random.default_rng(7)
    requests = [SyntheticRequest.random(rng, f"req-{i}", d_sae=16) for i in range(40)]
    with running_sidecar(tmp, circuits=[tmp / "circuits.yaml"]) as (running, client):
        client.ingest(messages(requests, rng))
        reports = {r.request_id: client.report(r.request_id) for r in requests}
        yield client, requests, reports


@pytest.mark.parametrize("name", list(CIRCUITS))
def test_reports_flag_exactly_what_brute_force_finds(served, name: str) -> None:
    client, requests, reports = served
    spec = CIRCUITS[name]
    flagged_somewhere = False
    for request in requests:
        expected = brute_force_matches(spec["when"], request, spec.get("scope", "both"), spec.get("window", 1))
        flag = next((f for f in reports[request.request_id].flags if f.circuit == name), None)
        if len(expected) >= spec.get("min_tokens", 1):
            assert flag is not None, f"{request.request_id}: expected {name} at {expected}"
            assert flag.matching_tokens == len(expected)
            assert flag.severity == pb.SEVERITY_HIGH
            flagged_somewhere = True
        else:
            assert flag is None, f"{request.request_id}: {name} flagged, expected {expected}"
    assert flagged_somewhere, f"test data never triggers {name}: the case proves nothing"


@pytest.mark.parametrize("name", list(CIRCUITS))
def test_index_query_matches_brute_force(served, name: str) -> None:
    client, requests, _ = served
    spec = CIRCUITS[name]
    response = client.stub.QueryRequests(pb.QueryRequestsRequest(circuit=name))
    got = {m.request_id: list(m.positions) for m in response.matches}
    expected = {}
    for request in requests:
        positions = brute_force_matches(spec["when"], request, spec.get("scope", "both"), spec.get("window", 1))
        if len(positions) >= spec.get("min_tokens", 1):
            expected[request.request_id] = positions
    assert got == expected


def test_evidence_names_the_features_that_fired(served) -> None:
    _, requests, reports = served
    request = next(r for r in requests if any(f.circuit == "all-cross-layer" for f in reports[r.request_id].flags))
    flag = next(f for f in reports[request.request_id].flags if f.circuit == "all-cross-layer")
    for token in flag.evidence:
        assert token.token_id == request.tokens[token.position]
        assert token.phase == (pb.PHASE_PROMPT if token.position < request.num_prompt else pb.PHASE_GENERATED)
        got = {(h.slot, h.feature): h.activation for h in token.hits}
        assert got == {(0, 1): request.codes[0][token.position][1], (1, 2): request.codes[1][token.position][2]}


def test_ad_hoc_expression_query(served) -> None:
    client, requests, _ = served
    expr = pb.Expr(any=pb.ExprList(items=[pb.Expr(feature=pb.FeatureTerm(layer=1, feature=3, min_activation=1.5))]))
    response = client.stub.QueryRequests(pb.QueryRequestsRequest(expression=expr, min_tokens=1))
    expected = {
        r.request_id: brute_force_matches({"layer": 1, "feature": 3, "min_activation": 1.5}, r) for r in requests
    }
    assert {m.request_id: list(m.positions) for m in response.matches} == {k: v for k, v in expected.items() if v}


# --- validation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"circuits": [{"when": {"layer": 1, "feature": 1}}]}, r"circuits\[0\].name: a non-empty string is required"),
        ({"circuits": [{"name": "x"}]}, r"circuits\[0\].when: missing"),
        ({"circuits": [{"name": "x", "when": {"layer": 1}}]}, r"circuits\[0\].when: expected a feature term"),
        (
            {"circuits": [{"name": "x", "when": {"feature": 1}}]},
            r"circuits\[0\].when: a feature term needs exactly one of slot or layer",
        ),
        (
            {"circuits": [{"name": "x", "when": {"all": [{"layer": 1, "feature": -1}]}}]},
            r"circuits\[0\].when.all\[0\].feature: expected a feature id",
        ),
        ({"circuits": [{"name": "x", "when": {"all": []}}]}, r"circuits\[0\].when.all: expected a non-empty list"),
        ({"circuits": [{"name": "x", "when": {"xor": []}}]}, r"circuits\[0\].when: unknown operator 'xor'"),
        (
            {"circuits": [{"name": "x", "when": {"at_least": {"n": 3, "of": [{"layer": 1, "feature": 1}]}}}]},
            r"circuits\[0\].when.at_least.n: n=3 is more than the 1 items",
        ),
        (
            {"circuits": [{"name": "x", "severity": "urgent", "when": {"layer": 1, "feature": 1}}]},
            r"severity: expected one of info",
        ),
        (
            {"circuits": [{"name": "x", "scope": "all", "when": {"layer": 1, "feature": 1}}]},
            r"scope: expected one of prompt",
        ),
        (
            {"circuits": [{"name": "x", "window": 0, "when": {"layer": 1, "feature": 1}}]},
            r"window: expected an integer from 1 to 65536",
        ),
        (
            {"circuits": [{"name": "x", "min_tokens": "2", "when": {"layer": 1, "feature": 1}}]},
            r"min_tokens: expected an integer",
        ),
        (
            {"circuits": [{"name": "x", "action": "delete", "when": {"layer": 1, "feature": 1}}]},
            r"action: expected abort or none",
        ),
        (
            {"circuits": [{"name": "x", "when": {"layer": 1, "feature": 1, "min_activation": -1}}]},
            r"min_activation: expected a number >= 0",
        ),
        (
            {"circuits": [{"name": "x", "exec": "rm -rf /", "when": {"layer": 1, "feature": 1}}]},
            r"unknown keys \['exec'\]",
        ),
        (
            {"circuits": [{"name": "x", "when": {"layer": 1, "hook_point": "hook_z", "feature": 1}}]},
            r"circuits\[0\].when.hook_point: expected one of resid_pre, resid_post, attn_out, attn_z",
        ),
        (
            {"circuits": [{"name": "x", "when": {"layer": 1, "hook_point": "mlp_out", "head": 1, "feature": 1}}]},
            r"circuits\[0\].when.head: expected a head number >= 0 with hook_point attn_z",
        ),
        ({"rules": []}, r"\(top level\): expected a mapping with one key, 'circuits'"),
    ],
)
def test_validation_errors_name_file_path_and_reason(document, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_circuits(document, "policies/safety.yaml")
    assert str(info.value).startswith("policies/safety.yaml: ")


def test_duplicate_names_across_files(tmp_path: Path) -> None:
    from circuitwatch.sidecar.circuits import load_circuit_files

    for name in ("a.yaml", "b.yaml"):
        (tmp_path / name).write_text("circuits:\n  - {name: same, when: {layer: 1, feature: 1}}\n")
    with pytest.raises(ConfigError, match=r"circuit 'same' is already defined in .*a\.yaml"):
        load_circuit_files([tmp_path / "a.yaml", tmp_path / "b.yaml"])


def test_labels_and_defaults() -> None:
    [circuit] = parse_circuits(
        {"circuits": [{"name": "x", "labels": {"team": "safety"}, "when": {"layer": 1, "feature": 1}}]}, "f"
    )
    assert circuit.labels == ("team=safety",)
    assert (circuit.scope, circuit.window, circuit.min_tokens, circuit.action) == (pb.SCOPE_BOTH, 1, 1, "")


def random_expression(rng: np.random.Generator, depth: int = 0) -> dict:
    """Terms, all / any / at_least / not, nested up to two levels, over both layers and 16 features."""
    term = {"layer": int(rng.choice([1, 2])), "feature": int(rng.integers(0, 16))}
    if rng.random() < 0.3:
        term["min_activation"] = float(rng.choice([0.5, 1.5]))
    kind = rng.choice(["term", "all", "any", "at_least", "not"], p=[0.3, 0.25, 0.2, 0.15, 0.1])
    if kind == "term" or depth >= 2:
        return term
    if kind == "not":
        return {"not": random_expression(rng, depth + 1)}
    items = [random_expression(rng, depth + 1) for _ in range(int(rng.integers(1, 5)))]
    if kind == "at_least":
        return {"at_least": {"n": int(rng.integers(1, len(items) + 1)), "of": items}}
    return {kind: items}


def wide_any(rng: np.random.Generator) -> dict:
    """`any` or `at_least 2` of up to 9 terms, a few negated: counts run far past the largest need."""
    terms = [
        {"layer": int(rng.choice([1, 2])), "feature": int(rng.integers(0, 16))} for _ in range(rng.integers(2, 10))
    ]
    if rng.random() < 0.2:
        return (
            {"all": [{"any": terms[1:]}, {"not": terms[0]}]}
            if rng.random() < 0.5
            else {"all": [terms[0], {"not": terms[1]}]}
        )
    return {"any": terms} if rng.random() < 0.5 else {"at_least": {"n": 2, "of": terms}}


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((random_expression, 6, 20), id="nested, short requests"),
        pytest.param((wide_any, 200, 200), id="wide any, long windows over several words"),
    ],
)
def test_circuits_evaluated_together_equal_one_by_one(tmp_path: Path, shape) -> None:
    """The batched evaluation of flat circuits (request_state.FlatCircuits: bit-packed rows, bit-sliced counts)
    against the general per-circuit path, on 600 random circuits (windows, scopes, negations, nesting) over 30
    random open requests: short ones with windows up to 5, and requests over several 64-position words with
    windows up to 200 and circuits whose counts overflow the bits of the largest need."""
    from circuitwatch.sidecar.circuits import CircuitSet
    from circuitwatch.sidecar.core import SidecarCore
    from circuitwatch.sidecar.store import EvidenceStore

    expression, longest_window, most_generated = shape
    rng = np.random.default_rng(12)
    specs = []
    for i in range(600):
        spec = {"name": f"c{i}", "when": expression(rng)}
        if rng.random() < 0.3:
            spec["window"] = int(rng.integers(2, longest_window))
        if rng.random() < 0.3:
            spec["scope"] = str(rng.choice(["prompt", "generated"]))
        specs.append(spec)
    circuits = parse_circuits({"circuits": specs}, "random")
    core = SidecarCore(SidecarConfig(evidence_dir=tmp_path), EvidenceStore(tmp_path))
    core.set_circuits(CircuitSet(tuple(circuits)))
    requests = [SyntheticRequest.random(rng, f"req-{i}", d_sae=16, most_generated=most_generated) for i in range(30)]
    stream = None
    for message in messages(requests, rng):
        if message.HasField("manifest"):
            stream = core.open_stream(message.manifest)
        elif message.HasField("codes"):
            core.ingest(stream, message)
    flat_seen = 0
    for request in requests:
        state = core._open[request.request_id]
        state.ensure_plan(core._plan_for, core.circuits.version)
        flat_seen += len(state.plan.flat.index)
        evaluator = state.evaluator(request.num_prompt, np.arange(request.num_positions))
        together = evaluator.match_all(core.circuits)
        for circuit, positions in zip(core.circuits.circuits, together, strict=True):
            one = evaluator.matches(circuit)
            assert np.array_equal(positions, one), (request.request_id, circuit, positions, one)
    if expression is random_expression:
        assert 30 * 150 < flat_seen < 30 * 500, "too few flat or general circuits: a path would go untested"
    else:
        assert flat_seen > 30 * 500, "too few flat circuits"
        assert max(r.num_positions for r in requests) > 128, "no request spans three words"


def test_a_term_picks_one_of_several_taps_on_a_layer() -> None:
    """Three SAEs read layer 1 (the residual stream, every head's attn_z, head 2's attn_z): a term names which."""
    from circuitwatch.sidecar.registry import SaeIdentity, SaeRegistry

    registry = SaeRegistry()
    taps = [("resid_post", None), ("attn_z", None), ("attn_z", 2)]
    for slot, (hook_point, head) in enumerate(taps):
        identity = SaeIdentity(
            f"sae{slot}", "topk", 1, hook_point, 32, 64, f"blake2b:{slot}", "topk:k=4", "saelens", head
        )
        registry.register(identity, slot)
    [circuit] = parse_circuits(
        {
            "circuits": [
                {
                    "name": "three",
                    "when": {
                        "any": [
                            {"layer": 1, "feature": 5},
                            {"layer": 1, "hook_point": "attn_z", "feature": 5},
                            {"layer": 1, "hook_point": "attn_z", "head": 2, "feature": 5},
                            {"layer": 1, "hook_point": "resid_post", "feature": 5},
                        ]
                    },
                }
            ]
        },
        "taps.yaml",
    )
    resolved = [registry.resolve(term) for term in circuit.expression.items]
    assert resolved == [[0, 1, 2], [1, 2], [2], [0]]
