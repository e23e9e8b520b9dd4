"""Names of the wire enums as users write and read them (lower case, no prefix): circuit files, the CLI,
responses, spans and metrics all use these tables, so a name means the same thing everywhere."""

from __future__ import annotations

from .circuitwatch_pb2 import CodeMode, GapReason, ReportStatus, Scope, Severity, SlotState

SCOPES = {"prompt": Scope.SCOPE_PROMPT, "generated": Scope.SCOPE_GENERATED, "both": Scope.SCOPE_BOTH}
MODES = {
    "codes": CodeMode.CODE_MODE_CODES,
    "argmax-token": CodeMode.CODE_MODE_ARGMAX_TOKEN,
    "argmax-mean": CodeMode.CODE_MODE_ARGMAX_MEAN,
}
SEVERITIES = {
    "info": Severity.SEVERITY_INFO,
    "low": Severity.SEVERITY_LOW,
    "medium": Severity.SEVERITY_MEDIUM,
    "high": Severity.SEVERITY_HIGH,
    "critical": Severity.SEVERITY_CRITICAL,
}
SCOPE_NAMES = {value: name for name, value in SCOPES.items()}
MODE_NAMES = {value: name for name, value in MODES.items()}


HOOK_POINT_NAMES = ("resid_pre", "resid_post", "attn_out", "attn_z", "mlp_in", "mlp_out")


def tap_label(layer: int, hook_point: str, head: int | None = None) -> str:
    """`L1.attn_z.h2`: how the CLI, spans and metrics name where an SAE reads (kernels/hook_points.Tap.label)."""
    return f"L{layer}.{hook_point or 'resid_post'}" + (f".h{head}" if head is not None else "")


def message_tap_label(message) -> str:
    """The tap label of a SaeSlot, SlotHealth or FeatureScore (each has layer, hook_point and optional head)."""
    return tap_label(message.layer, message.hook_point, message.head if message.HasField("head") else None)


def severity_name(value: int) -> str:
    return Severity.Name(value).removeprefix("SEVERITY_").lower()


def status_name(value: int) -> str:
    return ReportStatus.Name(value).removeprefix("REPORT_STATUS_").lower()


def gap_reason_name(value: int) -> str:
    return GapReason.Name(value).removeprefix("GAP_REASON_").lower()


def slot_state_name(value: int) -> str:
    return SlotState.Name(value).removeprefix("SLOT_STATE_").lower()
