"""Shared pytest fixtures: the deterministic fixture model and SAEs, built by `make fixtures`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

# vLLM on CPU reserves 92% of RAM for the KV cache unless told otherwise (VLLM_NOTES.md); engines in tests
# (in process or spawned) need only a little.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

if TYPE_CHECKING:
    from circuitwatch.fixtures import FixturePaths


@pytest.fixture(scope="session")
def fixtures() -> FixturePaths:
    from circuitwatch.fixtures import fixture_paths  # imports torch: not at collection, so sidecar-only installs run

    paths = fixture_paths()
    if not paths.manifest.is_file():
        pytest.fail(f"fixtures not built in {paths.root}: run `make fixtures`")
    return paths


# `make test` runs the sidecar's tests in the torch-free install (`pip install circuitwatch`) and the rest in the
# full one: `--suite torch-free` and `--suite rest`. These folders hold the sidecar's tests; the files named here
# load the fixture model, so they need the full install.
TORCH_FREE_FOLDERS = ("sidecar", "proto")
NEED_THE_MODEL = {"test_drift_on_real_activations.py"}
TESTS = Path(__file__).resolve().parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--suite",
        choices=("all", "torch-free", "rest"),
        default="all",
        help="torch-free: the sidecar's tests (they run in the sidecar-only install); rest: all others",
    )


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    suite = config.getoption("--suite")
    if suite == "all" or not collection_path.is_file() or not collection_path.name.startswith("test_"):
        return None
    parts = collection_path.resolve().relative_to(TESTS).parts
    torch_free = parts[0] in TORCH_FREE_FOLDERS and collection_path.name not in NEED_THE_MODEL
    return (suite == "torch-free") != torch_free or None


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`make test` runs the rest suite on two workers), give each worker's vLLM engines a
    core of their own. vLLM's CPU worker binds its OpenMP threads by default to the last core (the first ones are
    reserved for its scheduler), so two workers' engines would share one core while the other idled; the binding
    only places threads, it changes no result."""
    worker = getattr(config, "workerinput", None)
    if worker is None or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return
    cores = sorted(os.sched_getaffinity(0))
    index = int(worker["workerid"].removeprefix("gw"))
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(cores[-1 - index % len(cores)])
