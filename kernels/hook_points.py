"""Where in a decoder layer an SAE reads, in the plugin's names and in each SAE family's.

One vocabulary for the slot config, the taps, calibration baselines, the manifest and what the sidecar shows:

  resid_pre   the input of layer L (layer 0: the token embeddings)
  resid_post  the output of layer L (the residual stream after it)
  attn_out    the attention block's output, after its output projection
  attn_z      every head's attention output before the output projection, heads concatenated
              (TransformerLens `hook_z` flattened); with a head, that head's slice only
  mlp_in      the MLP's normalised input (what transcoders read)
  mlp_out     the MLP's output

SAE files name their hook point their own way (SAELens `blocks.L.attn.hook_z`, sparsify `layers.L.mlp`, Gemma
Scope's release names); `trained_tap` reads them into these terms so a slot can take its hook point from the SAE
and a mismatch is caught before any code is emitted.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the sidecar and the CLI read hook points without torch (which .spec imports)
    from .spec import SaeSpec


class HookPoint(enum.StrEnum):
    RESID_PRE = "resid_pre"
    RESID_POST = "resid_post"
    ATTN_OUT = "attn_out"
    ATTN_Z = "attn_z"
    MLP_IN = "mlp_in"
    MLP_OUT = "mlp_out"


HOOK_POINTS = tuple(point.value for point in HookPoint)


@dataclass(frozen=True)
class Tap:
    """One place the plugin reads: a layer, a hook point, and for attn_z optionally one head."""

    layer: int
    hook_point: HookPoint = HookPoint.RESID_POST
    head: int | None = None

    def __post_init__(self) -> None:
        if self.head is not None and self.hook_point is not HookPoint.ATTN_Z:
            raise ValueError(f"head {self.head}: only attn_z taps have heads, not {self.hook_point}")

    def label(self) -> str:
        """`L1.attn_z.h2`: how CLI output, span attributes and logs name a slot's tap."""
        head = f".h{self.head}" if self.head is not None else ""
        return f"L{self.layer}.{self.hook_point}{head}"

    def stream(self) -> tuple[int, HookPoint]:
        """The captured tensor this tap reads (a head is a slice of its layer's attn_z)."""
        return self.layer, self.hook_point

    def canonical(self) -> Tap:
        """The residual stream before layer L is the one after layer L - 1: both spellings compare equal."""
        if self.hook_point is HookPoint.RESID_PRE and self.layer > 0:
            return Tap(self.layer - 1, HookPoint.RESID_POST)
        return self


@dataclass(frozen=True)
class ModelShape:
    """The widths a tap can have, from the model's config (per tensor-parallel rank where heads are split)."""

    hidden_size: int
    num_heads: int
    head_dim: int

    def width(self, tap: Tap) -> int:
        if tap.hook_point is HookPoint.ATTN_Z:
            return self.head_dim if tap.head is not None else self.num_heads * self.head_dim
        return self.hidden_size

    def describe_width(self, tap: Tap) -> str:
        if tap.hook_point is HookPoint.ATTN_Z and tap.head is None:
            return f"{self.num_heads} heads x head_dim {self.head_dim} = {self.width(tap)}"
        if tap.hook_point is HookPoint.ATTN_Z:
            return f"head_dim {self.head_dim}"
        return f"hidden size {self.hidden_size}"

    def misfit(self, tap: Tap, d_in: int) -> tuple[str, str] | None:
        """Why an SAE of width `d_in` cannot read `tap` on this model, as (field, reason), or None if it can."""
        if tap.head is not None and tap.head >= self.num_heads:
            return "head", f"{tap.head}, but the model has heads 0..{self.num_heads - 1}"
        if d_in != self.width(tap):
            return "sae", f"d_in {d_in} does not fit {tap.label()}, which reads {self.describe_width(tap)}"
        return None

    @classmethod
    def from_hf_config(cls, config) -> ModelShape:
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(int(config.hidden_size), heads, int(head_dim))


@dataclass(frozen=True)
class TrainedTap:
    """Where an SAE's own files say it was trained; each part None where they do not say."""

    layer: int | None = None
    hook_point: HookPoint | None = None
    head: int | None = None
    source: str = ""  # the name or path it was read from, quoted in errors

    def conflicts(self, tap: Tap) -> list[str]:
        """What differs from a slot's tap, in words (empty: compatible). Unknown parts never conflict."""
        if self.layer is not None and self.hook_point is not None:
            trained = Tap(self.layer, self.hook_point, self.head).canonical()
            wanted = tap.canonical()
            if trained == wanted:
                return []
            if trained.stream() == wanted.stream():
                return [f"head {self.head}" if self.head is not None else "all heads"]
            return [Tap(self.layer, self.hook_point, self.head).label()]
        wrong = []
        if self.layer is not None and self.layer != tap.layer:
            wrong.append(f"layer {self.layer}")
        if self.hook_point is not None and self.hook_point is not tap.hook_point:
            wrong.append(f"hook point {self.hook_point}")
        if self.head is not None and self.head != tap.head:
            wrong.append(f"head {self.head}")
        return wrong


class UnknownHookPointError(ValueError):
    """An SAE names a hook point the plugin has no tap for (e.g. TransformerLens `hook_resid_mid`)."""


# TransformerLens / SAELens names, after `blocks.L.`
_TRANSFORMER_LENS = {
    "hook_resid_pre": HookPoint.RESID_PRE,
    "hook_resid_post": HookPoint.RESID_POST,
    "hook_attn_out": HookPoint.ATTN_OUT,
    "attn.hook_z": HookPoint.ATTN_Z,
    "hook_z": HookPoint.ATTN_Z,
    "hook_mlp_out": HookPoint.MLP_OUT,
    "ln2.hook_normalized": HookPoint.MLP_IN,
}
# Hugging Face module names (sparsify hookpoints, `model.layers.L.*`): the module's output, or for a
# transcoder its input
_MODULES = {
    None: HookPoint.RESID_POST,
    "self_attn": HookPoint.ATTN_OUT,
    "mlp": HookPoint.MLP_OUT,
    "post_attention_layernorm": HookPoint.MLP_IN,
    "pre_feedforward_layernorm": HookPoint.MLP_IN,
}
# Gemma Scope release names end in (or carry) the kind: gemma-scope-2b-pt-att, gemma-scope-9b-pt-res-canonical
_GEMMA_SCOPE_RELEASES = {
    "res": HookPoint.RESID_POST,
    "mlp": HookPoint.MLP_OUT,
    "att": HookPoint.ATTN_Z,
    "transcoders": HookPoint.MLP_IN,
}


def parse_hook_name(name: str, transcoder: bool = False) -> TrainedTap:
    """A SAELens/TransformerLens hook name or a Hugging Face module name (sparsify), in the plugin's terms.

    Raises UnknownHookPointError for a name that is recognisably a hook point the plugin cannot tap; returns an
    empty TrainedTap for names it does not recognise at all."""
    head = None
    head_match = re.fullmatch(r"(.+)\.h(\d+)", name)  # SAELens `get_hook_name` with a head index
    if head_match:
        name, head = head_match.group(1), int(head_match.group(2))
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if match:
        rest = match.group(2)
        if rest not in _TRANSFORMER_LENS:
            raise UnknownHookPointError(
                f"{name}: circuitwatch has no tap for {rest} (supported: {', '.join(_TRANSFORMER_LENS)})"
            )
        return TrainedTap(int(match.group(1)), _TRANSFORMER_LENS[rest], head, name)
    match = re.fullmatch(r"(?:model\.)?layers\.(\d+)(?:\.(.+))?", name)
    if match:
        rest = match.group(2)
        if rest not in _MODULES:
            raise UnknownHookPointError(
                f"{name}: circuitwatch has no tap for the module {rest} (supported: the layer itself, "
                f"{', '.join(m for m in _MODULES if m)})"
            )
        point = _MODULES[rest]
        if transcoder and rest == "mlp":
            point = HookPoint.MLP_IN  # a transcoder reads the MLP's input and predicts its output
        return TrainedTap(int(match.group(1)), point, head, name)
    return TrainedTap(source=name)


def trained_tap(spec: SaeSpec) -> TrainedTap:
    """Where the SAE was trained, as far as its files say (hook name, head index, Gemma Scope release path)."""
    if spec.hook_name:
        found = parse_hook_name(spec.hook_name, spec.transcoder)
        head = spec.hook_head if spec.hook_head is not None else found.head
        layer = found.layer if found.layer is not None else spec.layer
        return TrainedTap(layer, found.hook_point, head, found.source)
    if spec.source_format == "gemmascope":
        kinds = [re.search(r"-(res|mlp|att|transcoders)(?:-|$)", part) for part in spec.path.parts]
        point = next((_GEMMA_SCOPE_RELEASES[m.group(1)] for m in reversed(kinds) if m), None)
        return TrainedTap(spec.layer, point, None, str(spec.path))
    return TrainedTap(spec.layer, None, spec.hook_head, str(spec.path))


class TapMismatchError(ValueError):
    """A slot (or `circuitwatch calibrate`) taps elsewhere than the SAE's files say it was trained."""


def resolve_tap(spec: SaeSpec, layer: int, hook_point: str | None, head: int | None, check: bool = True) -> Tap:
    """The tap for an SAE at `layer`: the hook point and head as configured, else as the SAE's files say, else
    resid_post. With `check`, files that name another tap raise TapMismatchError naming both."""
    try:
        trained = trained_tap(spec)
    except UnknownHookPointError as exc:
        if check or hook_point is None:
            raise TapMismatchError(f"SAE {spec.path}: {exc}") from None
        trained = TrainedTap()
    point = HookPoint(hook_point) if hook_point is not None else trained.hook_point or HookPoint.RESID_POST
    if head is None and hook_point is None and point is HookPoint.ATTN_Z:
        head = trained.head
    try:
        tap = Tap(layer, point, head)
    except ValueError as exc:
        raise TapMismatchError(f"SAE {spec.path}: {exc}") from None
    wrong = trained.conflicts(tap)
    if wrong and check:
        raise TapMismatchError(
            f"SAE {spec.path} was trained on {' and '.join(wrong)} ({trained.source}), but the slot taps {tap.label()}"
        )
    return tap
