"""Shared pytest fixtures: the deterministic fixture model and SAEs, built by `make fixtures`."""

from __future__ import annotations

import os

import pytest

# vLLM on CPU reserves 92% of RAM for the KV cache unless told otherwise (VLLM_NOTES.md); engines in tests
# (in process or spawned) need only a little.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from circuitwatch.fixtures import FixturePaths, fixture_paths


@pytest.fixture(scope="session")
def fixtures() -> FixturePaths:
    paths = fixture_paths()
    if not paths.manifest.is_file():
        pytest.fail(f"fixtures not built in {paths.root}: run `make fixtures`")
    return paths
