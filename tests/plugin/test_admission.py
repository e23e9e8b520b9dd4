"""Admission on its own: what a client's vllm_xargs and headers can and cannot change, by the operator's policy.
The same rules run through the real OpenAI server in test_hostile_client.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from circuitwatch.plugin.admission import (
    XARG_ADMISSION,
    Admission,
    ClientContext,
    admit,
    bound_labels,
    valid_traceparent,
    valid_tracestate,
)
from circuitwatch.plugin.config import PluginConfig

TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def config(**controls) -> PluginConfig:
    monitor = controls.pop("monitor", "all")
    return PluginConfig.model_validate(
        {"slots": [{"layer": 1, "sae": "x"}], "monitor": monitor, "client_controls": controls}
    )


def http(**headers) -> ClientContext:
    return ClientContext({k.replace("_", "-"): v for k, v in headers.items()})


@pytest.mark.parametrize("value", [False, "false", 0, "0", "no"])
def test_a_client_cannot_opt_out_by_default_and_the_attempt_is_noted(value) -> None:
    extra, admission = admit({"circuitwatch_monitor": value, "temperature_hint": 1}, config(), http())
    assert admission.monitored
    assert any("refused the client's request to opt out" in n for n in admission.notes)
    assert extra["temperature_hint"] == 1  # other keys are the client's business
    assert Admission.from_extra_args(extra, config()) == admission


def test_internal_and_unknown_keys_from_the_client_are_removed() -> None:
    forged = {"monitored": False, "labels": ["review:ok"], "traceparent": TRACE}
    extra, admission = admit(
        {XARG_ADMISSION: forged, "circuitwatch_request_id": "cmpl-victim", "circuitwatch_x": 1}, config(), http()
    )
    assert admission.monitored and admission.labels == ()
    assert extra[XARG_ADMISSION] == admission.to_xarg()
    assert not [k for k in extra if k.startswith("circuitwatch_") and k != XARG_ADMISSION]
    assert any("circuitwatch_request_id" in n for n in admission.notes)


def test_opt_out_and_labels_where_the_operator_allows_them_and_only_through_the_gateway(tmp_path: Path) -> None:
    token = tmp_path / "gateway.token"
    token.write_text("s3cret\n")
    policy = config(opt_out=True, labels=True, gateway_token_file=str(token))
    asked = {"circuitwatch_monitor": False, "circuitwatch_labels": ["review:ok", "team"]}
    _, direct = admit(asked, policy, http())
    assert direct.monitored and direct.labels == ()
    assert any("gateway" in n for n in direct.notes)
    _, wrong = admit(asked, policy, http(x_circuitwatch_gateway="guess"))
    assert wrong.monitored and wrong.labels == ()
    _, gateway = admit(asked, policy, http(x_circuitwatch_gateway="s3cret"))
    assert not gateway.monitored
    assert gateway.labels == ("client:review:ok", "client:team")  # never equal to a reviewer's label
    _, offline = admit(asked, policy, None)  # code in the same process is the operator's
    assert not offline.monitored


def test_opt_in_mode() -> None:
    policy = config(monitor="opt-in")
    assert not admit({}, policy, http())[1].monitored
    assert admit({"circuitwatch_monitor": True}, policy, http())[1].monitored
    assert not admit({"circuitwatch_monitor": True}, config(monitor="opt-in", opt_in=False), http())[1].monitored


def test_labels_are_bounded_in_number_and_size() -> None:
    labels, note = bound_labels(["a" * 1_000_000, *[f"l{i}" for i in range(20)], "l1", "\n\t", "x\ny"], 4, 16)
    assert labels == ("client:" + "a" * 16, "client:l0", "client:l1", "client:l2")
    assert "1 client labels truncated to 16" in note and "dropped past the limit of 4" in note
    _, admission = admit({"circuitwatch_labels": "a," * 500_000}, config(labels=True, max_labels=3), http())
    assert admission.labels == ("client:a",)  # one distinct label, the rest repeats


def test_trace_context_is_validated_bounded_and_joined_only_as_configured() -> None:
    assert valid_traceparent(TRACE) == TRACE
    assert valid_traceparent(TRACE.upper()) == TRACE
    assert valid_traceparent("01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-future") is not None
    for bad in (
        "00-" + "0" * 32 + "-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-" + "0" * 16 + "-01",
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        TRACE + "-extra",
        "00-" + "a" * 100_000,
        "garbage",
        7,
    ):
        assert valid_traceparent(bad) is None, bad
    assert valid_tracestate("vendor=a, other=b") == ("vendor=a,other=b", "")
    assert valid_tracestate("x" * 100_000)[0] == "" and "longer than" in valid_tracestate("x" * 100_000)[1]
    assert valid_tracestate("no equals sign")[0] == ""

    _, joined = admit({}, config(), http(traceparent=TRACE, tracestate="vendor=a"))
    assert (joined.traceparent, joined.tracestate) == (TRACE, "vendor=a")
    _, body = admit({"circuitwatch_traceparent": TRACE}, config(), http())
    assert body.traceparent == TRACE
    _, invalid = admit({}, config(), http(traceparent="00-" + "a" * 100_000))
    assert invalid.traceparent == "" and any("not valid W3C" in n for n in invalid.notes)
    _, never = admit({}, config(trace_context="never"), http(traceparent=TRACE))
    assert never.traceparent == "" and any("new trace" in n for n in never.notes)


def test_without_an_admission_record_the_default_policy_holds() -> None:
    """A request that reached the engine without admission (the plugin not configured where it was accepted)
    gets the operator's default, whatever its xargs say."""
    assert Admission.from_extra_args({"circuitwatch_monitor": False}, config()).monitored
    assert not Admission.from_extra_args({"circuitwatch_monitor": True}, config(monitor="opt-in")).monitored
    assert Admission.from_extra_args({"circuitwatch_labels": ["x"]}, config()).labels == ()
