"""Slots built from real fixture SAEs against the fixture model's shape (4 heads of 32, hidden 128): taps resolved
from the SAEs' files, widths checked, heads in range, and which tensor-parallel rank encodes which slot."""

from __future__ import annotations

import pytest
import torch

from circuitwatch.fixtures import FixturePaths
from circuitwatch.kernels.baseline import model_fingerprint
from circuitwatch.kernels.hook_points import HookPoint, ModelShape, Tap
from circuitwatch.plugin.config import PluginConfig, PluginConfigError
from circuitwatch.plugin.slots import Parallelism, build_slots

SHAPE = ModelShape(hidden_size=128, num_heads=4, head_dim=32)


SINGLE = Parallelism(0, 1, 4)


def slots(specs: list[dict], parallel: Parallelism = SINGLE, backend: str = "torch"):
    from transformers import AutoConfig

    from circuitwatch.fixtures import fixture_paths

    fingerprint = model_fingerprint(AutoConfig.from_pretrained(fixture_paths().model).to_dict())
    config = PluginConfig.model_validate(
        {"slots": specs, "wiring_check": {"enabled": False}, "encoder_backend": backend}
    )
    return build_slots(config, SHAPE, 4, fingerprint, torch.device("cpu"), parallel)


def test_taps_come_from_the_sae_files(fixtures: FixturePaths) -> None:
    built = slots(
        [
            {"layer": 1, "sae": str(fixtures.tap_sae("attn_z_head"))},
            {"layer": 1, "sae": str(fixtures.tap_sae("attn_z"))},
            {"layer": 2, "sae": str(fixtures.tap_sae("transcoder"))},
        ]
    )
    assert [s.tap for s in built] == [
        Tap(1, HookPoint.ATTN_Z, 2),
        Tap(1, HookPoint.ATTN_Z),
        Tap(2, HookPoint.MLP_IN),
    ]
    assert [s.describe().split(" at ")[1] for s in built] == ["L1.attn_z.h2)", "L1.attn_z)", "L2.mlp_in)"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        # a per-head SAE (d_in 32) told to read every head
        (
            {"layer": 1, "sae": "attn_z_head", "hook_point": "attn_z", "head": None, "check_sae_metadata": False},
            r"slots\[0\]\.sae: .*: d_in 32 does not fit L1.attn_z, which reads 4 heads x head_dim 32 = 128",
        ),
        (
            {"layer": 1, "sae": "attn_z_head", "hook_point": "attn_z", "head": 4, "check_sae_metadata": False},
            r"slots\[0\]\.head: 4, but the model has heads 0..3",
        ),
        # a residual-width SAE on one head
        (
            {"layer": 1, "sae": "attn_out", "hook_point": "attn_z", "head": 1, "check_sae_metadata": False},
            r"d_in 128 does not fit L1.attn_z.h1, which reads head_dim 32",
        ),
        ({"layer": 7, "sae": "attn_out"}, r"slots\[0\]\.layer: 7 does not exist \(the model has 4 layers\)"),
    ],
)
def test_a_slot_that_cannot_read_its_tap_is_refused(fixtures: FixturePaths, spec: dict, message: str) -> None:
    spec = {**spec, "sae": str(fixtures.tap_sae(spec["sae"]))}
    with pytest.raises(PluginConfigError, match=message):
        slots([spec])


def test_a_head_is_only_for_attn_z() -> None:
    with pytest.raises(ValueError, match="head: only attn_z slots read one head"):
        PluginConfig.model_validate({"slots": [{"layer": 1, "sae": "x", "hook_point": "mlp_out", "head": 0}]})


def test_each_rank_encodes_what_it_holds(fixtures: FixturePaths) -> None:
    """Tensor parallelism 2 over 4 heads: rank 0 holds heads 0-1 and encodes every slot but the per-head one of
    head 2, which rank 1 encodes from column 0 of its own attn_z (its local head 0)."""
    specs = [
        {"layer": 1, "sae": str(fixtures.topk_sae(1))},
        {"layer": 1, "sae": str(fixtures.tap_sae("attn_z_head"))},
        {"layer": 2, "sae": str(fixtures.tap_sae("mlp_out"))},
    ]
    rank0 = slots(specs, Parallelism(0, 2, 4))
    rank1 = slots(specs, Parallelism(1, 2, 4))
    assert [s.number for s in rank0] == [0, 2] and [s.number for s in rank1] == [1]
    (head,) = rank1
    assert head.columns == slice(0, 32)
    local = torch.arange(5 * 64, dtype=torch.float32).reshape(5, 64)  # rank 1's attn_z: its 2 heads of 32
    read = head.read({(1, HookPoint.ATTN_Z): local}, torch.tensor([4, 1]))
    torch.testing.assert_close(read, local[[4, 1], 0:32])
    # every row of the step monitored: a slice, never fewer rows than the step has
    torch.testing.assert_close(head.read({(1, HookPoint.ATTN_Z): local}, slice(0, 3)), local[0:3, 0:32])
    with pytest.raises(IndexError, match="5 captured rows, the step has 6"):
        head.read({(1, HookPoint.ATTN_Z): local}, slice(0, 6))
    assert Parallelism(0, 2, 4).owner(Tap(1, HookPoint.ATTN_Z, 1)) == 0
    assert Parallelism(0, 4, 4).owner(Tap(1, HookPoint.ATTN_Z, 3)) == 3


def test_every_head_at_once_is_refused_under_tensor_parallelism(fixtures: FixturePaths) -> None:
    with pytest.raises(
        PluginConfigError,
        match=r"slots\[0\]: L1.attn_z reads all 4 heads, but with tensor "
        r"parallelism 2 each rank holds 2: use per-head slots",
    ):
        slots([{"layer": 1, "sae": str(fixtures.tap_sae("attn_z"))}], Parallelism(1, 2, 4))


def test_the_compile_cache_key_follows_the_hook_point_the_sae_names(tmp_path) -> None:
    """A slot without hook_point reads where the SAE's cfg.json says: a changed cfg.json must change vLLM's
    config hash, or a graph compiled with another set of taps would be reused and one slot would get no codes."""
    import json

    from circuitwatch.fixtures.sae_writers import write_saelens

    from support.random_saes import random_tensors

    directory = write_saelens(
        tmp_path / "sae", "standard", random_tensors(1, "standard"), hook_name="blocks.1.hook_mlp_out"
    )
    config = PluginConfig.model_validate({"slots": [{"layer": 1, "sae": str(directory)}]})
    before = config.digest()
    cfg = json.loads((directory / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = "blocks.1.hook_attn_out"
    (directory / "cfg.json").write_text(json.dumps(cfg))
    changed = config.digest()
    assert changed != before
    (directory / "circuitwatch-baseline.json").write_text("{}")  # a new baseline changes no tap
    assert config.digest() == changed


def test_the_triton_backend_on_a_cpu_engine_is_refused_at_start_up(fixtures: FixturePaths, monkeypatch) -> None:
    """`encoder_backend: triton` is valid configuration, but the kernel needs CUDA: on this CPU engine start-up
    stops with the field, the slot and the reason, not at the first step."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(PluginConfigError, match=r"encoder_backend 'triton' for slots\[0\]: .*needs a CUDA device"):
        slots([{"layer": 1, "sae": str(fixtures.topk_sae(1))}], backend="triton")
