"""Every encoder backend returns exactly the reference codes: random and fixture SAEs, every architecture and
normalisation, exact ties, all-negative rows, k larger than the active features, empty batches."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from circuitwatch.fixtures import FixturePaths
from circuitwatch.fixtures.sae_writers import write_saelens
from circuitwatch.kernels import CodeSelection, ReferenceEncoder, SelectionMode, load_sae
from circuitwatch.kernels.encoders import make_encoder

from support.random_saes import random_tensors
from support.triton_child import assert_passes_under_interpreter, in_child

# The Triton kernel is checked by the same cases in a child process (see test_triton_kernel_...): its
# interpreter must be on before Triton is first imported, and must not leak into vLLM in this process.
BACKENDS = [b for b in os.environ.get("CIRCUITWATCH_TEST_BACKENDS", "onnx").split(",") if b]
# On a GPU machine (bench/gpu_checks.sh) the same cases run with the backends on CUDA, the reference on CPU.
DEVICE = os.environ.get("CIRCUITWATCH_TEST_DEVICE", "cpu")


def same_codes(sae, selection, x, backend: str, tol: float = 1e-5) -> None:
    expected = ReferenceEncoder(sae, selection).encode(x)
    got = make_encoder(sae, selection, backend, DEVICE).encode(x.to(DEVICE))
    assert got.ids.shape == expected.ids.shape
    assert torch.equal(got.ids.cpu(), expected.ids), (got.ids[:3], expected.ids[:3])
    assert torch.allclose(got.values.cpu(), expected.values, atol=tol, rtol=1e-5)


def inputs(rows: int = 64, d_in: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(rows, d_in)).astype(np.float32) * 1.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "gated", "topk"])
@pytest.mark.parametrize("normalize", ["none", "constant_norm_rescale", "layer_norm"])
def test_architectures_and_normalisations(tmp_path: Path, backend: str, architecture: str, normalize: str) -> None:
    k = 7 if architecture == "topk" else None
    path = write_saelens(
        tmp_path / "sae", architecture, random_tensors(1, architecture), k=k, normalize_activations=normalize
    )
    sae = load_sae(path)
    rows = 16 if backend == "triton" else 64  # one Triton program under the interpreter; the ties case runs two
    for selection in (None, CodeSelection(SelectionMode.THRESHOLD, 5), CodeSelection(SelectionMode.ARGMAX)):
        same_codes(sae, selection, inputs(rows), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_all_negative_rows_wide_k_and_empty_batches(tmp_path: Path, backend: str) -> None:
    # integer-valued weights and inputs: every summation order is exact, so ties are real in every backend
    g = torch.Generator().manual_seed(2)
    tensors = random_tensors(2, "standard")
    tensors["W_enc"] = torch.randint(-3, 4, (24, 80), generator=g).float()
    tensors["b_enc"] = torch.randint(-2, 3, (80,), generator=g).float()
    tensors["b_dec"] = torch.zeros(24)
    for column in (10, 40, 77):  # features 10, 40 and 77 tie with feature 3 on every input
        tensors["W_enc"][:, column] = tensors["W_enc"][:, 3]
        tensors["b_enc"][column] = tensors["b_enc"][3]
    sae = load_sae(write_saelens(tmp_path / "sae", "standard", tensors))
    x = torch.randint(-2, 3, (32, 24), generator=g).float()
    x[5] = 0.0
    acts = ReferenceEncoder(sae).activations(x)
    assert ((acts[:, 3] > 0) & (acts[:, 3] == acts[:, 10])).any(), "the data must contain active ties"
    for selection in (
        CodeSelection(SelectionMode.TOPK, 2),
        CodeSelection(SelectionMode.TOPK, 1),
        CodeSelection(SelectionMode.ARGMAX),
        CodeSelection(SelectionMode.THRESHOLD, 6),
    ):
        same_codes(sae, selection, x, backend)
    # all-negative rows: a large negative bias silences every feature
    tensors["b_enc"] = torch.full_like(tensors["b_enc"], -1000.0)
    silent = load_sae(write_saelens(tmp_path / "silent", "standard", tensors))
    codes = make_encoder(silent, CodeSelection(SelectionMode.TOPK, 4), backend, DEVICE).encode(x.to(DEVICE))
    assert (codes.ids == -1).all() and (codes.values == 0).all()
    # k larger than the features that fire, and than d_sae itself
    same_codes(sae, CodeSelection(SelectionMode.THRESHOLD, 200), x, backend)
    empty = make_encoder(sae, CodeSelection(SelectionMode.TOPK, 4), backend, DEVICE).encode(
        torch.zeros(0, 24, device=DEVICE)
    )
    assert empty.ids.shape == (0, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixture_saes_on_real_activations(fixtures: FixturePaths, backend: str) -> None:
    from support.random_saes import fixture_cases

    rng = np.random.default_rng(3)
    kinds_seen = set()
    for path, _, _ in fixture_cases(fixtures):
        sae = load_sae(path)
        kind = (sae.spec.architecture, sae.spec.apply_b_dec_to_input)
        if backend == "triton" and kind in kinds_seen:
            continue  # the Triton interpreter is slow: one SAE of each kind (shapes: the random-SAE cases)
        kinds_seen.add(kind)
        # residual-stream-like rows: scaled like the fixture model's activations
        rows = 8 if backend == "triton" else 48
        x = torch.from_numpy(rng.normal(size=(rows, sae.spec.d_in)).astype(np.float32) * 2.0)
        same_codes(sae, None, x, backend, tol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_up_to_128(tmp_path: Path, backend: str) -> None:
    tensors = random_tensors(8, "standard")
    tensors["b_enc"] = tensors["b_enc"] + 2.0  # most of the 80 features fire
    sae = load_sae(write_saelens(tmp_path / "sae", "standard", tensors))
    same_codes(sae, CodeSelection(SelectionMode.THRESHOLD, 128), inputs(rows=8), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_column_view_reads_like_its_copy(tmp_path: Path, backend: str) -> None:
    """A slot reading one attention head gets its columns as a strided view of the captured rows."""
    sae = load_sae(write_saelens(tmp_path / "sae", "standard", random_tensors(9, "standard")))
    wide = inputs(rows=6, d_in=3 * 24)
    view = wide[:, 24:48]
    assert not view.is_contiguous()
    same_codes(sae, None, view, backend)
    view = view.to(DEVICE)
    got = make_encoder(sae, None, backend, DEVICE).encode(view)
    copy = make_encoder(sae, None, backend, DEVICE).encode(view.contiguous())
    assert torch.equal(got.ids, copy.ids) and torch.equal(got.errors, copy.errors)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "gated", "topk"])
@pytest.mark.parametrize("normalize", ["none", "constant_norm_rescale", "layer_norm"])
def test_a_bf16_sae_reads_bf16_rows(tmp_path: Path, backend: str, architecture: str, normalize: str) -> None:
    """An SAE stored in bf16 reading a bf16 model's rows: the Triton kernel then multiplies on bf16 tensor cores
    (b_dec folded into the bias, the rescale after the dot); codes still equal the float32 reference's."""
    tensors = {name: t.to(torch.bfloat16).float() for name, t in random_tensors(11, architecture).items()}
    if architecture == "gated":
        tensors["r_mag"] = torch.zeros_like(tensors["r_mag"])  # W_mag = W_enc * exp(r_mag) stays bf16-exact
    k = 7 if architecture == "topk" else None
    sae = load_sae(write_saelens(tmp_path / "sae", architecture, tensors, k=k, normalize_activations=normalize))
    encoder = make_encoder(sae, None, backend, DEVICE)
    if backend == "triton":  # layer norm centres the rows in float32 first, so it keeps the float32 path
        assert (encoder.bf16 is None) == (normalize == "layer_norm")
    rows = 16 if backend == "triton" else 64
    same_codes(sae, None, inputs(rows).to(torch.bfloat16), backend, tol=1e-4)
    if backend == "triton" and encoder.bf16 is not None:  # the other source of pre-activations: torch's matmul
        from circuitwatch.kernels.triton_encoder import LaunchConfig

        x = inputs(rows).to(torch.bfloat16)
        picked = LaunchConfig.for_shape(rows, sae.spec.d_sae, encoder.k, True, encoder.device)
        expected = ReferenceEncoder(sae).encode(x)
        for gemm in ("triton", "torch"):
            got = encoder.encode(x.to(DEVICE), dataclasses.replace(picked, gemm=gemm))
            assert torch.equal(got.ids.cpu(), expected.ids), gemm
            assert torch.allclose(got.values.cpu(), expected.values, atol=1e-4, rtol=1e-5), gemm


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "gated", "topk"])
def test_onnx_device_finish_equals_the_host_finish(tmp_path: Path, architecture: str) -> None:
    """On CUDA the session's outputs are masked and reconstructed in torch on the device (no GPU here: the same
    torch code on CPU tensors); it must give exactly what the numpy path gives, unreadable rows included."""
    k = 7 if architecture == "topk" else None
    sae = load_sae(write_saelens(tmp_path / "sae", architecture, random_tensors(10, architecture), k=k))
    encoder = make_encoder(sae, None, "onnx")
    x = inputs(rows=10)
    x[2, 1] = float("nan")
    x[3] = 0.0
    on_host = encoder.encode(x)
    names = ["ids", "values", "norms"]
    outputs = {
        name: torch.from_numpy(a) for name, a in zip(names, encoder.session.run(names, {"x": x.numpy()}), strict=True)
    }
    on_device = encoder._finish_on_device(x, outputs)
    assert torch.equal(on_device.ids, on_host.ids) and torch.equal(on_device.values, on_host.values)
    torch.testing.assert_close(on_device.errors, on_host.errors, atol=1e-6, rtol=1e-5)
    assert (on_host.ids[[2, 3]] == -1).all() and (on_host.errors[[2, 3]] == 0).all()


def test_onnx_file_is_cached_next_to_the_sae(tmp_path: Path) -> None:
    sae = load_sae(write_saelens(tmp_path / "sae", "jumprelu", random_tensors(4, "jumprelu")))
    first = make_encoder(sae, None, "onnx")
    assert first.path.parent == tmp_path / "sae" / ".circuitwatch" and first.path.is_file()
    stamp = first.path.stat().st_mtime_ns
    second = make_encoder(sae, None, "onnx")
    assert second.path == first.path and second.path.stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_auto_picks_a_backend_by_measuring(tmp_path: Path, caplog) -> None:
    sae = load_sae(write_saelens(tmp_path / "sae", "topk", random_tensors(5, "topk"), k=8))
    with caplog.at_level("INFO"):
        encoder = make_encoder(sae, None, "auto")
    assert encoder.name in ("torch", "onnx")
    assert "calibration" in caplog.text
    same_codes(sae, None, inputs(), encoder.name)


@pytest.mark.skipif(in_child(), reason="already the child run")
def test_triton_kernel_matches_the_reference_under_the_interpreter() -> None:
    """No GPU here: every equivalence case above, for the fused Triton kernel, under TRITON_INTERPRET=1."""
    assert_passes_under_interpreter(__file__, "triton")


def test_triton_on_cpu_needs_the_interpreter(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    sae = load_sae(write_saelens(tmp_path / "sae", "standard", random_tensors(7, "standard")))
    with pytest.raises(ValueError, match="needs a CUDA device"):
        make_encoder(sae, None, "triton")


def test_unknown_backend_is_a_clear_error(tmp_path: Path) -> None:
    sae = load_sae(write_saelens(tmp_path / "sae", "standard", random_tensors(6, "standard")))
    with pytest.raises(ValueError, match="unknown encoder backend 'cuda-magic'"):
        make_encoder(sae, None, "cuda-magic")


def test_onnx_on_cuda_without_onnxruntime_gpu_says_so(tmp_path: Path) -> None:
    """Seen on a GPU machine with the CPU build of onnxruntime: the session fell back to the CPU provider and the
    first encode failed inside IO binding. It must refuse at construction instead (auto then skips it)."""
    import onnxruntime as ort

    assert "CUDAExecutionProvider" not in ort.get_available_providers()  # this machine's CPU build
    sae = load_sae(write_saelens(tmp_path / "sae", "standard", random_tensors(12, "standard")))
    with pytest.raises(ImportError, match=r"onnx backend on cuda needs onnxruntime-gpu.*CPUExecutionProvider"):
        make_encoder(sae, None, "onnx", "cuda")


@pytest.mark.skipif("triton" not in BACKENDS, reason="the Triton kernels' own launch shapes (child run)")
@pytest.mark.parametrize(
    ("gemm", "group", "candidate_block", "keep"),
    [("triton", 16, 1, None), ("triton", 32, 2, 4), ("torch", 16, 2, None), ("torch", 8, 32, 2)],
)
def test_triton_selection_with_ties_across_groups(
    tmp_path: Path, monkeypatch, gemm: str, group: int, candidate_block: int, keep: int | None
) -> None:
    """Integer weights make features in different groups tie, so group maxima tie at the k-th place and more
    than k groups are candidates, gathered one, two or 32 groups at a time; with few `keep` slots most rows
    take the slow path. The lower id must win every tie, with the pre-activations from the Triton GEMM (fp32
    rows) and from torch's matmul (bf16 rows: integers, so exact) alike. d_sae is no multiple of the group
    size (the last group is partial), and the scratch limit cuts the 40 rows into chunks of 16."""
    from circuitwatch.kernels import triton_encoder
    from circuitwatch.kernels.triton_encoder import LaunchConfig, TritonEncoder

    g = torch.Generator().manual_seed(13)
    d_in, d_sae = 24, 330
    monkeypatch.setattr(triton_encoder, "SCRATCH_BYTES", 4 * d_sae * 16)
    tensors = {
        "W_enc": torch.randint(-3, 4, (d_in, d_sae), generator=g).float(),
        "b_enc": torch.randint(-2, 3, (d_sae,), generator=g).float(),
        "W_dec": torch.randn(d_sae, d_in, generator=g),
        "b_dec": torch.zeros(d_in),
    }
    for copy, original in ((40, 3), (200, 3), (310, 3), (95, 64), (250, 64)):  # ties in other groups
        tensors["W_enc"][:, copy] = tensors["W_enc"][:, original]
        tensors["b_enc"][copy] = tensors["b_enc"][original]
    sae = load_sae(write_saelens(tmp_path / "sae", "standard", tensors))
    x = torch.randint(-2, 3, (40, d_in), generator=g).float()
    acts = ReferenceEncoder(sae).activations(x)
    assert ((acts[:, 3] > 0) & (acts[:, 3] == acts[:, 310])).any(), "the data must contain active ties"
    assert ((acts[:, 3] > 0) & (acts[:, 3] == acts[:, 40]))[32:].any(), "ties in the last chunk too"
    config = LaunchConfig(16, 32, 16, group=group, candidate_block=candidate_block, keep=keep, gemm=gemm)
    rows = x.to(torch.bfloat16) if gemm == "torch" else x
    for selection in (CodeSelection(SelectionMode.TOPK, 5), CodeSelection(SelectionMode.THRESHOLD, 40)):
        expected = ReferenceEncoder(sae, selection).encode(x)
        encoder = TritonEncoder(sae, selection, DEVICE)
        got = encoder.encode(rows.to(DEVICE), config)
        assert torch.equal(got.ids.cpu(), expected.ids), (gemm, group, candidate_block, selection)
        assert torch.equal(got.values.cpu(), expected.values)


def test_triton_launch_config_refuses_what_the_kernels_cannot_run(tmp_path: Path, monkeypatch) -> None:
    from circuitwatch.kernels import triton_encoder
    from circuitwatch.kernels.triton_encoder import LaunchConfig, TritonEncoder

    with pytest.raises(ValueError, match=r"gemm must be one of \('triton', 'torch'\), got 'cublas'"):
        LaunchConfig(16, 32, 16, gemm="cublas")
    with pytest.raises(ValueError, match=r"group \(64\) must divide block_n \(32\)"):
        LaunchConfig(16, 32, 16, group=64)
    for field in ("group", "candidate_block", "select_warps"):
        with pytest.raises(ValueError, match=f"{field} must be a power of two, got 48"):
            LaunchConfig(16, 96, 16, **{field: 48})
    # more groups a row than the selection's 16-bit counts hold (the limit lowered here, so the SAE stays small)
    monkeypatch.setattr(triton_encoder, "MAX_GROUPS", 16)
    sae = load_sae(write_saelens(tmp_path / "sae", "standard", random_tensors(3, "standard")))
    with pytest.raises(ValueError, match=r"encoder sae: d_sae 80 in groups of 4 is 20 groups a row.*at most 15"):
        TritonEncoder(sae).select(inputs(2), LaunchConfig(16, 32, 16, group=4))
    with pytest.raises(ValueError, match="keep must be a power of two, got 24"):
        LaunchConfig(16, 32, 16, keep=24)


@pytest.mark.skipif("triton" not in BACKENDS, reason="a Triton helper (child run)")
@pytest.mark.parametrize("k", [1, 5, 64, 100])
def test_triton_radix_select_finds_the_kth_largest_level(k: int) -> None:
    """The selection's k-th largest group maximum (order-preserving int32 levels, ties counted), against a
    sort; too few values (k > 64) must give a level below every positive one. A larger result than the
    k-th would drop codes; a smaller one only costs time, so it is checked here, not by the codes."""
    from support.triton_probes import kth_largest_level_kernel

    g = torch.Generator().manual_seed(k)
    full_range = torch.randint(-(2**31), 2**31, (4, 64), generator=g)
    tied = torch.randint(-3, 4, (4, 64), generator=g) * 1_000_003
    for level in (full_range, tied, torch.full((4, 64), 7)):
        out = torch.empty(4, dtype=torch.int64, device=DEVICE)
        kth_largest_level_kernel[(1,)](level.to(DEVICE), out, N=64, K=k, R=4)
        out = out.cpu()
        if k <= 64:
            assert torch.equal(out, level.sort(dim=1, descending=True).values[:, k - 1])
        else:
            assert (out <= 0).all()
