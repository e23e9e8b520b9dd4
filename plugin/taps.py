"""Taps on decoder layers: the residual stream after each monitored layer, captured on every real step.

A plain forward hook does nothing at run time under vLLM's compiled mode (Dynamo traces the hook once and
the graph keeps no Python). So the hook calls an opaque custom op, `circuitwatch::tap`, whose body runs on
every call, eager or compiled. The op returns nothing, so it is registered as side-effecting; otherwise the
compiler drops it as dead code. Dummy, profile and warm-up runs also call the model; the op only captures
while a real step is open (`TapState.begin_step`), which the worker patch does around `execute_model`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

import torch

log = logging.getLogger(__name__)


class TapState:
    """Per process: which layers are tapped and what the current step captured."""

    def __init__(self) -> None:
        self.layers: set[int] = set()
        self.captured: dict[int, torch.Tensor] = {}
        self._active = False
        self._lock = threading.Lock()

    def begin_step(self) -> None:
        self.captured = {}
        self._active = True

    def end_step(self) -> dict[int, torch.Tensor]:
        self._active = False
        captured, self.captured = self.captured, {}
        return captured

    def capture(self, layer: int, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        if self._active and layer in self.layers:
            # vLLM decoder layers return (mlp output, residual): the stream is their sum. A new tensor, so
            # in-place kernels of the next layer cannot change what was captured.
            self.captured[layer] = hidden + residual


TAPS = TapState()


@torch.library.custom_op("circuitwatch::tap", mutates_args=())
def tap(hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
    TAPS.capture(layer, hidden, residual)


@tap.register_fake
def _(hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
    return None


torch.fx.node.has_side_effect(torch.ops.circuitwatch.tap.default)


def _hook_for(layer: int):
    def hook(_module: torch.nn.Module, _inputs, output) -> None:
        if isinstance(output, tuple) and len(output) == 2 and output[1] is not None:
            torch.ops.circuitwatch.tap(output[0], output[1], layer)
        else:  # a layer that returns the full stream (no fused residual)
            hidden = output[0] if isinstance(output, tuple) else output
            torch.ops.circuitwatch.tap(hidden, torch.zeros_like(hidden), layer)

    return hook


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None) if inner is not None else None
    if layers is None:
        raise RuntimeError(f"circuitwatch: cannot find decoder layers (model.model.layers) on {type(model).__name__}")
    return layers


def install_taps(model: torch.nn.Module, layers: Iterable[int]) -> list[int]:
    """Hook the given layers; returns those present in this process (pipeline stages own a range)."""
    modules = decoder_layers(model)
    installed = []
    for layer in sorted(set(layers)):
        if layer >= len(modules):
            raise ValueError(f"circuitwatch: layer {layer} does not exist (the model has {len(modules)} layers)")
        module = modules[layer]
        if type(module).__name__ == "PPMissingLayer":
            continue
        if getattr(module, "_circuitwatch_tapped", False):
            installed.append(layer)
            continue
        module.register_forward_hook(_hook_for(layer))
        module._circuitwatch_tapped = True
        installed.append(layer)
    TAPS.layers = set(installed)
    return installed
