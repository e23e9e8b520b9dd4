"""`circuitwatch.response`: client code reads the `circuitwatch` object into typed fields. The objects come from
the API server's own serializer (plugin.responses) over real report messages, and from the `openai` client's
types; the same reader runs on real server responses in tests/plugin/test_responses.py."""

from __future__ import annotations

import subprocess
import sys

import pytest
from openai.types import Completion

from circuitwatch.plugin.responses import attach, pending, summarize
from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.response import MonitoringFieldError, read_monitoring


def _report(request_id: str, severity: int) -> pb.Report:
    report = pb.Report(request_id=request_id, status=pb.REPORT_STATUS_COMPLETE, max_severity=severity)
    report.coverage.positions_total, report.coverage.positions_seen = 12, 12
    flag = report.flags.add(circuit="leak", severity=severity, matching_tokens=3, labels=["exfil"], action="abort")
    flag.evidence.add(position=4)
    return report


def test_reads_a_flagged_report_as_the_server_writes_it() -> None:
    field = attach([summarize(_report("cmpl-1.00aa11bb", pb.SEVERITY_HIGH))], aborted_by="leak")
    monitoring = read_monitoring({"id": "cmpl-1", "choices": [], "circuitwatch": field})
    assert monitoring is not None and monitoring.flagged and not monitoring.pending
    assert monitoring.aborted_by == "leak" and monitoring.max_severity == "high"
    [flag] = monitoring.report.flags
    assert (flag.circuit, flag.severity, flag.matching_tokens, flag.positions, flag.labels, flag.action) == (
        "leak",
        "high",
        3,
        (4,),
        ("exfil",),
        "abort",
    )
    assert monitoring.report.coverage is not None and monitoring.report.coverage.positions_seen == 12


def test_per_choice_pending_and_severity_order() -> None:
    field = attach([summarize(_report("0_k", pb.SEVERITY_LOW)), summarize(_report("1_k", pb.SEVERITY_CRITICAL))])
    monitoring = read_monitoring({"circuitwatch": field})
    assert [r.request_id for r in monitoring.reports] == ["0_k", "1_k"]
    assert monitoring.max_severity == "critical"  # by rank, not by name
    waiting = read_monitoring({"circuitwatch": pending("cmpl-2.00aa11bb", "not final within the deadline")})
    assert waiting.pending and not waiting.flagged and waiting.report.coverage is None
    assert waiting.report.reason == "not final within the deadline"


def test_openai_objects_and_streams() -> None:
    field = summarize(_report("cmpl-3.00aa11bb", pb.SEVERITY_MEDIUM))
    body = {"id": "cmpl-3", "object": "text_completion", "created": 1, "model": "m", "choices": []}
    completion = Completion.model_validate({**body, "circuitwatch": field})
    assert read_monitoring(completion).report.request_id == "cmpl-3.00aa11bb"
    chunks = [Completion.model_validate(body), Completion.model_validate({**body, "circuitwatch": field})]
    assert read_monitoring(chunks).max_severity == "medium"
    assert read_monitoring(Completion.model_validate(body)) is None  # not monitored
    assert read_monitoring([body]) is None


def test_unknown_fields_are_kept_and_bad_ones_are_named() -> None:
    field = {**summarize(_report("k", pb.SEVERITY_LOW)), "future_field": 1}
    assert read_monitoring({"circuitwatch": field}).report.extra == {"future_field": 1}
    bad = {**field, "flags": [{"circuit": "x", "severity": "low", "matching_tokens": "3"}]}
    with pytest.raises(MonitoringFieldError, match=r"circuitwatch\.flags\[0\]\.matching_tokens: expected int"):
        read_monitoring({"circuitwatch": bad})
    with pytest.raises(MonitoringFieldError, match=r"circuitwatch\.choices: expected a non-empty list"):
        read_monitoring({"circuitwatch": {"status": "per_choice", "choices": []}})


def test_importing_it_costs_client_code_nothing() -> None:
    heavy = "{'grpc', 'numpy', 'torch', 'google'}"
    code = f"import sys, circuitwatch.response; print(sorted({{m.split('.')[0] for m in sys.modules}} & {heavy}))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
