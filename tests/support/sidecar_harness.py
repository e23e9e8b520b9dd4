"""Helpers for tests that drive a real sidecar over 127.0.0.1 with a real gRPC client."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from circuitwatch.proto import CONTRACT_VERSION
from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto import circuitwatch_pb2_grpc as pb_grpc
from circuitwatch.proto.codec import pack_slice, unpack_slice
from circuitwatch.sidecar import SidecarConfig
from circuitwatch.sidecar.server import RunningSidecar, start

LAYERS = (1, 2)  # producer slot i taps layer LAYERS[i]
D_SAE = 64


def manifest(layers: tuple[int, ...] = LAYERS, d_sae: int = D_SAE, hash_prefix: str = "h") -> pb.Manifest:
    return pb.Manifest(
        contract_version=CONTRACT_VERSION,
        producer="tests",
        model="tiny",
        instance_id="test-producer",
        slots=[
            pb.SaeSlot(
                slot=i,
                name=f"sae-l{layer}",
                architecture="topk",
                layer=layer,
                hook_point="resid_post",
                d_in=16,
                d_sae=d_sae,
                weights_hash=f"blake2b:{hash_prefix}{layer:02d}",
                selection="topk:k=4",
            )
            for i, layer in enumerate(layers)
        ],
    )


@dataclass
class SyntheticRequest:
    """Codes per slot per position: codes[slot][position] = {feature: activation}."""

    request_id: str
    num_prompt: int
    num_positions: int
    codes: dict[int, list[dict[int, float]]] = field(default_factory=dict)
    tokens: list[int] = field(default_factory=list)

    @classmethod
    def random(
        cls, rng: np.random.Generator, request_id: str, slots: int = 2, d_sae: int = D_SAE, most_generated: int = 20
    ) -> SyntheticRequest:
        num_prompt = int(rng.integers(3, 40))
        num_positions = num_prompt + int(rng.integers(0, most_generated))
        request = cls(request_id, num_prompt, num_positions, tokens=rng.integers(0, 2048, num_positions).tolist())
        for slot in range(slots):
            rows = []
            for _ in range(num_positions):
                features = rng.choice(d_sae, size=int(rng.integers(0, 5)), replace=False)
                # fp16-exact activations so expectations need no tolerance
                rows.append({int(f): float(np.float16(rng.uniform(0.05, 4.0))) for f in features})
            request.codes[slot] = rows
        return request

    def slice(
        self, slot: int, start: int, end: int, errors: np.ndarray | None = None, norms: np.ndarray | None = None
    ) -> pb.RequestSlice:
        """Positions start..end of one slot; with `errors` and `norms`, per-token fidelity too."""
        rows = self.codes[slot][start:end]
        phase = pb.PHASE_PROMPT if start < self.num_prompt else pb.PHASE_GENERATED
        assert end <= self.num_prompt or start >= self.num_prompt, "a slice has one phase"
        offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.uint32)
        ids = np.array([f for r in rows for f in r], dtype=np.uint32)
        acts = np.array([a for r in rows for a in r.values()], dtype=np.float16)
        return pack_slice(
            self.request_id, slot, start, phase, self.tokens[start:end], offsets, ids, acts, errors, norms
        )

    def chunks(self, size: int) -> list[tuple[int, int]]:
        """Position ranges in the order the model would compute them, split at the prompt boundary."""
        bounds = sorted(
            {*range(0, self.num_prompt, size), self.num_prompt, *range(self.num_prompt, self.num_positions, size)}
        )
        bounds = [b for b in bounds if b < self.num_positions] + [self.num_positions]
        return [(a, b) for a, b in itertools.pairwise(bounds) if a < b]

    def finish(self, **kwargs) -> pb.RequestFinish:
        return pb.RequestFinish(
            request_id=self.request_id,
            num_prompt_tokens=self.num_prompt,
            num_generated_tokens=self.num_positions - self.num_prompt + 1,
            num_positions=self.num_positions,
            **kwargs,
        )


def messages(requests: list[SyntheticRequest], rng: np.random.Generator, chunk: int = 7) -> list[pb.IngestMessage]:
    """Manifest, then every request's slices interleaved across requests at random, then finishes."""
    pending = {r.request_id: [(slot, a, b) for a, b in r.chunks(chunk) for slot in r.codes] for r in requests}
    by_id = {r.request_id: r for r in requests}
    out, step = [pb.IngestMessage(manifest=manifest())], 0
    while pending:
        ids = list(pending)
        batch = []
        for request_id in rng.choice(ids, size=min(len(ids), 4), replace=False):
            slot, a, b = pending[request_id].pop(0)
            batch.append(by_id[request_id].slice(slot, a, b))
            if not pending[request_id]:
                del pending[request_id]
                out.append(pb.IngestMessage(codes=pb.CodeBatch(step=(step := step + 1), slices=batch)))
                out.append(pb.IngestMessage(finish=by_id[request_id].finish()))
                batch = []
        if batch:
            out.append(pb.IngestMessage(codes=pb.CodeBatch(step=(step := step + 1), slices=batch)))
    return out


@dataclass
class Client:
    channel: grpc.Channel
    stub: pb_grpc.MonitorStub

    def ingest(self, items: Iterable[pb.IngestMessage], metadata=None) -> pb.IngestAck:
        return self.stub.Ingest(iter(list(items)), metadata=metadata, timeout=60)

    def report(self, request_id: str, wait_ms: int = 2000) -> pb.Report:
        return self.stub.GetReport(pb.GetReportRequest(request_id=request_id, wait_ms=wait_ms), timeout=30)


@contextmanager
def running_sidecar(
    tmp_path: Path, circuits: list[Path] | None = None, **overrides
) -> Iterator[tuple[RunningSidecar, Client]]:
    config = SidecarConfig(
        listen="127.0.0.1:0", evidence_dir=tmp_path / "evidence", circuits=circuits or [], **overrides
    )
    running = start(config)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield running, Client(channel, pb_grpc.MonitorStub(channel))
    finally:
        channel.close()
        running.stop(grace_s=1)


# --- an independent, obviously-correct circuit evaluator for expectations -----------------------------


def brute_force_matches(expr: dict, request: SyntheticRequest, scope: str = "both", window: int = 1) -> list[int]:
    """Positions where a YAML-form expression holds, by direct per-position recursion over Python sets."""
    layer_to_slot = {layer: slot for slot, layer in enumerate(LAYERS)}
    positions = range(request.num_positions)
    if scope == "prompt":
        positions = [p for p in positions if p < request.num_prompt]
    elif scope == "generated":
        positions = [p for p in positions if p >= request.num_prompt]
    allowed = set(positions)

    def fires(term: dict, p: int) -> bool:
        slot = term["slot"] if "slot" in term else layer_to_slot[term["layer"]]
        for q in range(max(0, p - window + 1), p + 1):
            act = request.codes[slot][q].get(term["feature"])
            if q in allowed and act is not None and act >= term.get("min_activation", 0.0):
                return True
        return False

    def holds(node: dict, p: int) -> bool:
        if "feature" in node:
            return fires(node, p)
        ((op, value),) = node.items()
        if op == "all":
            return all(holds(v, p) for v in value)
        if op == "any":
            return any(holds(v, p) for v in value)
        if op == "not":
            return not holds(value, p)
        return sum(holds(v, p) for v in value["of"]) >= value["n"]

    return [p for p in positions if holds(expr, p)]


def codes_in_sidecar(stub, request_id: str) -> dict[tuple[int, int], tuple[int, dict[int, float]]]:
    """{(slot, position): (token id, {feature: activation})} as the sidecar's GetCodes returns them."""
    out = {}
    for wire in stub.GetCodes(pb.GetCodesRequest(request_id=request_id), timeout=30).slices:
        arrays = unpack_slice(wire)
        for i, position in enumerate(arrays.positions.tolist()):
            a, b = arrays.row_offsets[i], arrays.row_offsets[i + 1]
            row = dict(
                zip(arrays.feature_ids[a:b].tolist(), arrays.activations[a:b].astype(float).tolist(), strict=True)
            )
            out[(arrays.slot, position)] = (int(arrays.token_ids[i]), row)
    return out
