from __future__ import annotations

import pytest

from circuitwatch.fixtures import FixturePaths, fixture_paths


@pytest.fixture(scope="session")
def fixtures() -> FixturePaths:
    paths = fixture_paths()
    if not paths.manifest.is_file():
        pytest.fail(f"fixtures not built in {paths.root}: run `make fixtures`")
    return paths
