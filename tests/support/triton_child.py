"""Running a test file's Triton cases again in a child pytest under TRITON_INTERPRET=1: no GPU here, and the
interpreter must be chosen before Triton is first imported, so it cannot be switched on inside this process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CHILD_MARKER = "CIRCUITWATCH_TEST_BACKENDS"  # set in the child: the backends its parametrized cases cover


def in_child() -> bool:
    return os.environ.get(CHILD_MARKER) is not None


def assert_passes_under_interpreter(test_file: str, selector: str) -> None:
    """pytest `test_file -k selector` with the Triton interpreter; fails with the child's output tail."""
    env = {**os.environ, "TRITON_INTERPRET": "1", CHILD_MARKER: "triton"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", selector],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=Path(__file__).parents[2],
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
