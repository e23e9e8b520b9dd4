"""What the plugin remembers in one process, in one object instead of module globals.

vLLM runs the plugin in several processes (API server, engine core, workers); each holds one PluginProcess.
Fields belong to the process kind that sets them; the others stay at their defaults.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .emitter import Emitter
    from .engine import FinishNotifier
    from .responses import ActionListener, ReportFetcher


@dataclass
class PluginProcess:
    applied: bool = False  # the seams are in place (register() is called once per process, but may repeat)
    # the accepting process (API server or offline LLM): the configuration its InputProcessor runs under
    frontend_additional_config: dict | None = None
    # engine core: the engine's --additional-config and served model name, captured when EngineCore starts
    engine_additional_config: dict | None = None
    engine_model: str = ""
    finish_notifier: FinishNotifier | None = None
    # worker: the stream of a worker that encodes every configured slot; an engine core in the same process
    # sends its finish markers on it, inside the code batches (emitter.Emitter.engine_step_done)
    code_emitter: Emitter | None = None
    # API server: report fetching for responses and the circuit-action listener, created at first use
    engine_client: object | None = None  # what aborts go through (vLLM's AsyncLLM)
    report_fetcher: ReportFetcher | None = None
    action_listener: ActionListener | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


PROCESS = PluginProcess()
