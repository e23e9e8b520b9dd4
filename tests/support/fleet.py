"""The fleet tests need the [fleet] extra (chdb, clickhouse-connect). `make test` installs it in the sidecar venv
and sets CIRCUITWATCH_REQUIRE_FLEET, so there a missing extra fails the suite instead of skipping its tests."""

from __future__ import annotations

import importlib.util
import os

import pytest


def require_fleet() -> None:
    """Skip the calling test module without the extra, unless the suite requires it."""
    if importlib.util.find_spec("chdb") is not None and importlib.util.find_spec("clickhouse_connect") is not None:
        return
    if os.environ.get("CIRCUITWATCH_REQUIRE_FLEET"):
        raise RuntimeError("CIRCUITWATCH_REQUIRE_FLEET is set but the [fleet] extra is not installed in this venv")
    pytest.skip("the fleet tests need the [fleet] extra (make test installs it)", allow_module_level=True)
