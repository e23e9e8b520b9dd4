"""Taps on decoder layers: the activations at each monitored hook point, captured on every real step.

A plain forward hook does nothing at run time under vLLM's compiled mode (Dynamo traces the hook once and
the graph keeps no Python). So the hook calls an opaque custom op, `circuitwatch::tap`, whose body runs on
every call, eager or compiled. The op returns nothing, so it is registered as side-effecting; otherwise the
compiler drops it as dead code. Dummy, profile and warm-up runs also call the model; the op only captures
while a real step is open (`TapState.begin_step`), which the worker patch does around `execute_model`.

Where each hook point is read on a vLLM decoder layer (kernels/hook_points.py names them):
  resid_pre   the layer's inputs, hidden_states + residual (layer 0: the embeddings, residual is None)
  resid_post  the layer's outputs, out[0] + out[1] (vLLM fuses the residual add into the next norm)
  attn_out    the attention module's output (Gemma 2/3: after post_attention_layernorm, as TransformerLens)
  attn_z      the input of the attention output projection: this rank's heads, concatenated
  mlp_in      the MLP module's input (already normalised)
  mlp_out     the MLP module's output (Gemma 2/3: after post_feedforward_layernorm)
Every capture is a new tensor: vLLM's fused add + norm kernels later overwrite their inputs in place.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable

import torch

from circuitwatch.kernels.hook_points import HookPoint

log = logging.getLogger(__name__)

Stream = tuple[int, HookPoint]  # (layer, hook point): one captured tensor per step
POINTS = list(HookPoint)  # the op carries a hook point as its index here


class TapState:
    """Per process: which (layer, hook point) streams are tapped and what the current step captured."""

    def __init__(self) -> None:
        self.streams: set[Stream] = set()
        self.captured: dict[Stream, torch.Tensor] = {}
        self._active = False

    def begin_step(self) -> None:
        self.captured = {}
        self._active = True

    def end_step(self) -> dict[Stream, torch.Tensor]:
        self._active = False
        captured, self.captured = self.captured, {}
        return captured

    def capture(self, layer: int, point: HookPoint, hidden: torch.Tensor, residual: torch.Tensor | None) -> None:
        stream = (layer, point)
        if self._active and stream in self.streams:
            self.captured[stream] = hidden + residual if residual is not None else hidden.clone()


TAPS = TapState()


@torch.library.custom_op("circuitwatch::tap", mutates_args=())
def tap(hidden: torch.Tensor, residual: torch.Tensor | None, layer: int, point: int) -> None:
    TAPS.capture(layer, POINTS[point], hidden, residual)


@tap.register_fake
def _(hidden: torch.Tensor, residual: torch.Tensor | None, layer: int, point: int) -> None:
    return None


torch.fx.node.has_side_effect(torch.ops.circuitwatch.tap.default)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None) if inner is not None else None
    if layers is None:
        raise RuntimeError(f"circuitwatch: cannot find decoder layers (model.model.layers) on {type(model).__name__}")
    return layers


def _child(module: torch.nn.Module, names: tuple[str, ...], what: str, layer: int) -> torch.nn.Module:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, torch.nn.Module):
            return child
    raise RuntimeError(
        f"circuitwatch: layer {layer} ({type(module).__name__}) has no {what} module (looked for {', '.join(names)}): "
        "this hook point cannot be tapped on this model"
    )


_ATTENTION = ("self_attn", "attn", "attention")
_MLP = ("mlp", "feed_forward")
_OUT_PROJECTION = ("o_proj", "out_proj", "dense")


def _argument(module: torch.nn.Module, name: str, position: int) -> Callable[[tuple, dict], torch.Tensor | None]:
    """Reads one argument of the module's forward from a pre-hook's (args, kwargs), by its name in the forward's
    signature (found once, here: nothing is inspected on the step path)."""
    try:
        parameters = list(inspect.signature(module.forward).parameters)
        position = parameters.index(name) if name in parameters else position
    except (TypeError, ValueError):
        pass

    def read(args: tuple, kwargs: dict) -> torch.Tensor | None:
        return args[position] if len(args) > position else kwargs.get(name)

    return read


def _install(block: torch.nn.Module, layer: int, point: HookPoint) -> None:
    index = POINTS.index(point)

    def emit(hidden: torch.Tensor, residual: torch.Tensor | None = None) -> None:
        torch.ops.circuitwatch.tap(hidden, residual, layer, index)

    def output_hook(_module, _inputs, output) -> None:
        if isinstance(output, tuple):
            emit(output[0], output[1] if len(output) == 2 and isinstance(output[1], torch.Tensor) else None)
        else:
            emit(output)

    if point is HookPoint.RESID_POST:
        block.register_forward_hook(output_hook)
    elif point is HookPoint.RESID_PRE:
        hidden, residual = _argument(block, "hidden_states", 1), _argument(block, "residual", 2)
        block.register_forward_pre_hook(
            lambda _m, args, kwargs: emit(hidden(args, kwargs), residual(args, kwargs)), with_kwargs=True
        )
    elif point is HookPoint.ATTN_OUT:
        # Gemma 2/3 normalise the attention output before the residual add; TransformerLens's hook_attn_out is
        # after that norm
        gemma_norm = getattr(block, "pre_feedforward_layernorm", None) is not None
        site = block.post_attention_layernorm if gemma_norm else _child(block, _ATTENTION, "attention", layer)
        site.register_forward_hook(lambda _m, _i, out: emit(out[0] if isinstance(out, tuple) else out))
    elif point is HookPoint.ATTN_Z:
        projection = _child(_child(block, _ATTENTION, "attention", layer), _OUT_PROJECTION, "output projection", layer)
        read = _argument(projection, "input_", 0)
        projection.register_forward_pre_hook(lambda _m, args, kwargs: emit(read(args, kwargs)), with_kwargs=True)
    elif point is HookPoint.MLP_IN:
        mlp = _child(block, _MLP, "MLP", layer)
        read = _argument(mlp, "x", 0)
        mlp.register_forward_pre_hook(lambda _m, args, kwargs: emit(read(args, kwargs)), with_kwargs=True)
    elif point is HookPoint.MLP_OUT:
        site = getattr(block, "post_feedforward_layernorm", None) or _child(block, _MLP, "MLP", layer)
        site.register_forward_hook(lambda _m, _i, out: emit(out[0] if isinstance(out, tuple) else out))


def install_taps(model: torch.nn.Module, streams: Iterable[Stream]) -> set[Stream]:
    """Hook the given (layer, hook point) streams; returns those present in this process (pipeline stages own a
    range of layers)."""
    modules = decoder_layers(model)
    installed: set[Stream] = set()
    for layer, point in sorted(set(streams)):
        if layer >= len(modules):
            raise ValueError(f"circuitwatch: layer {layer} does not exist (the model has {len(modules)} layers)")
        block = modules[layer]
        if type(block).__name__ == "PPMissingLayer":
            continue
        done = block.__dict__.setdefault("_circuitwatch_taps", set())
        if point not in done:
            _install(block, layer, point)
            done.add(point)
        installed.add((layer, point))
    TAPS.streams = installed
    return installed
