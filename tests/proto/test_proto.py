"""The wire contract: a batch with mixed prompt/generated slices survives serialisation bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from circuitwatch.proto import CONTRACT_VERSION
from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto.codec import WireFormatError, join_slices, pack_slice, unpack_slice


def random_slice(rng: np.random.Generator, request_id: str, phase: int, first: int, rows: int, d_sae: int):
    counts = rng.integers(0, 6, size=rows)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.uint32)
    return {
        "request_id": request_id,
        "slot": int(rng.integers(0, 3)),
        "first_position": first,
        "phase": phase,
        "token_ids": rng.integers(0, 2048, size=rows).astype(np.uint32),
        "row_offsets": offsets,
        "feature_ids": rng.integers(0, d_sae, size=int(offsets[-1])).astype(np.uint32),
        "activations": rng.random(int(offsets[-1])).astype(np.float16) * 8,
    }


def test_manifest_and_mixed_batch_round_trip() -> None:
    rng = np.random.default_rng(0)
    slices = [
        random_slice(rng, "cmpl-a", pb.PHASE_PROMPT, 0, 37, 1024),
        random_slice(rng, "cmpl-b", pb.PHASE_GENERATED, 120, 1, 1024),
        random_slice(rng, "cmpl-a", pb.PHASE_GENERATED, 37, 4, 1024),
        random_slice(rng, "chatcmpl-c-1", pb.PHASE_PROMPT, 256, 0, 1024),  # an empty slice is legal
    ]
    manifest = pb.IngestMessage(
        manifest=pb.Manifest(
            contract_version=CONTRACT_VERSION,
            producer="test",
            model="tiny",
            instance_id="host:1:0",
            slots=[
                pb.SaeSlot(
                    slot=0,
                    name="l1",
                    architecture="topk",
                    layer=1,
                    hook_point="resid_post",
                    d_in=128,
                    d_sae=1024,
                    weights_hash="blake2b:00",
                    selection="topk:k=16",
                )
            ],
        )
    )
    batch = pb.IngestMessage(codes=pb.CodeBatch(step=7, slices=[pack_slice(**s) for s in slices]))
    finish = pb.IngestMessage(
        finish=pb.RequestFinish(
            request_id="cmpl-a",
            num_prompt_tokens=37,
            num_generated_tokens=5,
            num_positions=41,
            gaps=[pb.Gap(slot=0, start=0, end=3, reason=pb.GAP_REASON_PREFIX_CACHE)],
            trace=pb.TraceContext(traceparent="00-" + "1" * 32 + "-" + "2" * 16 + "-01"),
        )
    )
    for message in (manifest, batch, finish):
        assert pb.IngestMessage.FromString(message.SerializeToString()) == message

    decoded = pb.IngestMessage.FromString(batch.SerializeToString()).codes
    assert decoded.step == 7
    for original, wire in zip(slices, decoded.slices, strict=True):
        arrays = unpack_slice(wire, d_sae=1024)
        assert arrays.request_id == original["request_id"]
        assert arrays.phase == original["phase"]
        assert arrays.first_position == original["first_position"]
        for field in ("token_ids", "row_offsets", "feature_ids"):
            assert np.array_equal(getattr(arrays, field), original[field]), field
        assert arrays.activations.tobytes() == original["activations"].tobytes()
        assert arrays.positions.tolist() == list(
            range(original["first_position"], original["first_position"] + len(original["token_ids"]))
        )


def test_bytes_are_little_endian_uint32_and_fp16() -> None:
    wire = pack_slice("r", 0, 5, pb.PHASE_PROMPT, [1], [0, 2], [3, 258], np.array([1.0, -2.0], dtype=np.float32))
    assert wire.feature_ids == b"\x03\x00\x00\x00\x02\x01\x00\x00"
    assert wire.activations == b"\x00\x3c\x00\xc0"  # fp16 1.0, -2.0


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: setattr(m, "num_rows", 3), "token_ids holds 2 values, expected 3"),
        (lambda m: setattr(m, "feature_ids", m.feature_ids[:-1]), "feature_ids has 7 bytes"),
        (lambda m: setattr(m, "row_offsets", np.array([0, 2, 1], "<u4").tobytes()), "never decrease"),
        (lambda m: setattr(m, "phase", pb.PHASE_UNSPECIFIED), "phase must be PROMPT or GENERATED"),
        (
            lambda m: setattr(m, "feature_ids", np.array([1, 4096], "<u4").tobytes()),
            "feature id 4096 >= d_sae 1024",
        ),
    ],
)
def test_malformed_slices_name_request_and_field(mutate, message: str) -> None:
    wire = pack_slice("cmpl-x", 0, 0, pb.PHASE_PROMPT, [1, 2], [0, 1, 2], [5, 6], [0.5, 0.25])
    mutate(wire)
    with pytest.raises(WireFormatError, match=message) as info:
        unpack_slice(wire, d_sae=1024)
    assert "cmpl-x" in str(info.value)


def _fidelity_slice(request_id: str, rows: int, errors=None, norms=None) -> pb.RequestSlice:
    offsets = np.arange(rows + 1, dtype=np.uint32)
    return pack_slice(
        request_id,
        0,
        0,
        pb.PHASE_PROMPT,
        np.arange(rows),
        offsets,
        np.arange(rows),
        np.ones(rows),
        errors,
        norms,
    )


def test_fidelity_round_trips_and_batches_mark_unmeasured_rows() -> None:
    from circuitwatch.proto.codec import unpack_batch

    measured = _fidelity_slice("a", 3, np.array([0.1, 0.2, 0.3]), np.array([5.0, 6.0, 7.0]))
    arrays = unpack_slice(pb.RequestSlice.FromString(measured.SerializeToString()))
    assert arrays.errors.tolist() == pytest.approx([0.1, 0.2, 0.3]) and arrays.norms.tolist() == [5.0, 6.0, 7.0]
    assert measured.reconstruction_errors == np.array([0.1, 0.2, 0.3], "<f4").tobytes()
    plain = _fidelity_slice("b", 2)
    assert unpack_slice(plain).errors is None
    batch = unpack_batch([measured, plain], {0: 8})
    assert batch.errors[:3].tolist() == pytest.approx([0.1, 0.2, 0.3]) and np.isnan(batch.errors[3:]).all()
    assert unpack_batch([plain], {0: 8}).errors is None  # an old producer: no fidelity at all


@pytest.mark.parametrize(
    ("errors", "norms", "message"),
    [
        (np.array([0.1, -0.5]), np.array([1.0, 1.0]), r"slices\[0\] request 'a': reconstruction_errors holds negative"),
        (np.array([0.1, np.inf]), np.array([1.0, 1.0]), "reconstruction_errors holds negative or infinite"),
        (np.array([0.1, 0.1]), np.array([1.0, -np.inf]), "input_norms holds negative or infinite"),
    ],
)
def test_bad_fidelity_values_are_refused(errors, norms, message: str) -> None:
    from circuitwatch.proto.codec import unpack_batch

    with pytest.raises(WireFormatError, match=message):
        unpack_batch([_fidelity_slice("a", 2, errors, norms)], {0: 8})


def test_fidelity_of_the_wrong_length_is_refused() -> None:
    from circuitwatch.proto.codec import unpack_batch

    message = _fidelity_slice("a", 3, np.array([0.1, 0.2, 0.3]))
    message.reconstruction_errors = message.reconstruction_errors[:8]
    with pytest.raises(WireFormatError, match=r"reconstruction_errors has 8 bytes, expected 12"):
        unpack_batch([message], {0: 8})
    with pytest.raises(ValueError, match="2 reconstruction_errors for 3 rows"):
        _fidelity_slice("a", 3, np.array([0.1, 0.2]))


def test_joined_slices_carry_the_same_rows_and_keep_apart_what_does_not_continue() -> None:
    """join_slices (a producer sending several engine steps in one batch): each request's pieces of a slot that
    continue one another become one slice whose rows, codes and fidelity are the pieces' in order; a change of
    phase, a missing position, fidelity measured in one piece only, or another request or slot starts a new one."""
    rng = np.random.default_rng(8)

    def piece(request_id: str, slot: int, first: int, rows: int, phase: int, fidelity: bool) -> pb.RequestSlice:
        counts = rng.integers(0, 5, rows)
        nnz = int(counts.sum())
        return pack_slice(
            request_id,
            slot,
            first,
            phase,
            rng.integers(0, 50_000, rows),
            np.concatenate(([0], np.cumsum(counts))),
            rng.integers(0, 4096, nnz),
            rng.random(nnz).astype(np.float16),
            rng.random(rows).astype(np.float32) if fidelity else None,
            rng.random(rows).astype(np.float32) if fidelity else None,
        )

    prompt, generated = pb.PHASE_PROMPT, pb.PHASE_GENERATED
    pieces = [
        piece("a", 0, 0, 6, prompt, True),
        piece("b", 0, 0, 3, prompt, False),
        piece("a", 1, 0, 6, prompt, True),
        piece("a", 0, 6, 1, prompt, True),  # continues a/0
        piece("a", 0, 7, 1, generated, True),  # phase changes: new slice
        piece("b", 0, 3, 1, prompt, False),  # continues b/0 across the other pieces
        piece("a", 0, 8, 1, generated, True),  # continues the generated a/0
        piece("a", 1, 7, 1, prompt, True),  # position 6 missing: new slice
        piece("a", 0, 9, 1, generated, False),  # no fidelity where the piece before had it: new slice
    ]
    joined = join_slices(pieces)
    shape = [(s.request_id, s.slot, s.first_position, s.num_rows, s.phase) for s in joined]
    assert shape == [
        ("a", 0, 0, 7, prompt),
        ("b", 0, 0, 4, prompt),
        ("a", 1, 0, 6, prompt),
        ("a", 0, 7, 2, generated),
        ("a", 1, 7, 1, prompt),
        ("a", 0, 9, 1, generated),
    ]

    def rows(slices) -> dict[tuple[str, int, int], tuple]:
        out = {}
        for s in slices:
            arrays = unpack_slice(s, d_sae=4096)
            for i, position in enumerate(arrays.positions.tolist()):
                a, b = arrays.row_offsets[i], arrays.row_offsets[i + 1]
                fidelity = None if arrays.errors is None else (arrays.errors[i], arrays.norms[i])
                out[(s.request_id, s.slot, position)] = (
                    int(arrays.token_ids[i]),
                    arrays.feature_ids[a:b].tolist(),
                    arrays.activations[a:b].tolist(),
                    fidelity,
                    s.phase,
                )
        return out

    assert rows(joined) == rows(pieces) and len(rows(pieces)) == sum(s.num_rows for s in pieces)
    assert join_slices(pieces[:1]) == pieces[:1]
