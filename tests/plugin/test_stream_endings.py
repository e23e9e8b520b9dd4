"""How a monitored SSE stream ends, chunk by chunk, for the stream shapes vLLM's OpenAI handlers produce:
the usage chunk stays last, a circuit's abort finishes with `content_filter` even when vLLM sent no token, and
token chunks pass through byte for byte. The reports come from a real gRPC server on 127.0.0.1; the streams are
written here in vLLM's compact JSON (the same endings through the real vLLM server are in test_responses.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from concurrent import futures

import grpc
import pytest

from circuitwatch.plugin.admission import Admission, Admitted, ClientContext
from circuitwatch.plugin.config import PluginConfig
from circuitwatch.plugin.responses import ActionListener, ReportFetcher, with_final_chunk
from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto import circuitwatch_pb2_grpc as pb_grpc

RESPONSE_ID = "cmpl-7f3a"
INTERNAL_ID = f"{RESPONSE_ID}-0-0a1b2c3d"  # the first prompt of completion RESPONSE_ID, as the engine names it
KEY = f"{RESPONSE_ID}.0a1b2c3d"


class _Monitor(pb_grpc.MonitorServicer):
    def GetReport(self, request, context):  # noqa: N802 - the proto's name
        return pb.Report(request_id=request.request_id, status=pb.REPORT_STATUS_COMPLETE)


@pytest.fixture(scope="module")
def monitor_port() -> Iterator[int]:
    server = grpc.server(futures.ThreadPoolExecutor(2))
    pb_grpc.add_MonitorServicer_to_server(_Monitor(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(None)


@pytest.fixture
def fetcher(monitor_port: int) -> ReportFetcher:
    """One per test: its aio channel belongs to the test's event loop."""
    config = PluginConfig.model_validate(
        {
            "slots": [{"layer": 1, "sae": "unused"}],
            "sidecar": {"address": f"127.0.0.1:{monitor_port}"},
            "response_deadline_ms": 5000,
        }
    )
    return ReportFetcher(config)


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


def _completion_chunk(text: str, finish_reason: str | None = None) -> str:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return _sse({"id": RESPONSE_ID, "object": "text_completion", "created": 5, "model": "m", "choices": [choice]})


USAGE = _sse(
    {
        "id": RESPONSE_ID,
        "object": "text_completion",
        "created": 5,
        "model": "m",
        "choices": [],
        "usage": {"prompt_tokens": 3, "total_tokens": 5, "completion_tokens": 2},
    }
)
DONE = "data: [DONE]\n\n"


def _run(fetcher: ReportFetcher, chunks: list[str], aborted_by: str | None = None, n: int = 1) -> list[str]:
    async def stream() -> AsyncIterator[str]:
        for chunk in chunks:
            yield chunk

    async def collect() -> list[str]:
        client = ClientContext({}, [Admitted(INTERNAL_ID, Admission(monitored=True), n)])
        actions = ActionListener(fetcher)
        if aborted_by:
            actions.aborted[KEY] = aborted_by
        out = [c async for c in with_final_chunk(stream(), fetcher, n, "text_completion", client, actions, model="m")]
        assert KEY not in actions.aborted  # the reason is consumed with the response
        return out

    return asyncio.run(collect())


def _bodies(out: list[str]) -> list[dict]:
    assert out[-1] == DONE
    return [json.loads(c[len("data: ") :]) for c in out[:-1]]


def test_token_chunks_pass_through_unchanged_and_the_object_comes_last(fetcher: ReportFetcher) -> None:
    tokens = [_completion_chunk("Hel"), _completion_chunk("lo", "length")]
    out = _run(fetcher, [*tokens, DONE])
    assert out[:2] == tokens
    last = _bodies(out)[-1]
    assert last["choices"] == [] and last["id"] == RESPONSE_ID
    assert last["circuitwatch"]["request_id"] == KEY and last["circuitwatch"]["status"] == "complete"


def test_the_object_rides_on_the_usage_chunk_which_stays_last(fetcher: ReportFetcher) -> None:
    out = _run(fetcher, [_completion_chunk("Hi", "stop"), USAGE, DONE])
    bodies = _bodies(out)
    assert len(bodies) == 2  # no extra chunk after the usage chunk
    assert bodies[-1]["usage"] == {"prompt_tokens": 3, "total_tokens": 5, "completion_tokens": 2}
    assert bodies[-1]["choices"] == [] and bodies[-1]["circuitwatch"]["request_id"] == KEY


def test_a_circuit_abort_finishes_with_content_filter(fetcher: ReportFetcher) -> None:
    out = _run(fetcher, [_completion_chunk("Hi"), _completion_chunk("", "abort"), USAGE, DONE], aborted_by="stop-it")
    bodies = _bodies(out)
    assert [b["choices"][0]["finish_reason"] for b in bodies if b["choices"]] == [None, "content_filter"]
    assert bodies[-1]["usage"]["completion_tokens"] == 2
    assert bodies[-1]["circuitwatch"]["aborted_by"] == "stop-it"


def test_an_abort_before_the_first_token_still_gets_a_reason_and_the_object(fetcher: ReportFetcher) -> None:
    """vLLM sends nothing for a request aborted before its first token (no id, no reason): the stream still
    ends with a content_filter finish under the response's id, then the object."""
    bodies = _bodies(_run(fetcher, [DONE], aborted_by="stop-it"))
    assert [b["id"] for b in bodies] == [RESPONSE_ID, RESPONSE_ID]
    assert bodies[0]["choices"] == [{"index": 0, "text": "", "logprobs": None, "finish_reason": "content_filter"}]
    assert bodies[1]["choices"] == [] and bodies[1]["circuitwatch"]["aborted_by"] == "stop-it"


def test_only_unfinished_choices_get_the_filter_reason(fetcher: ReportFetcher) -> None:
    first_done = _completion_chunk("a", "length")
    bodies = _bodies(_run(fetcher, [first_done, DONE], aborted_by="stop-it", n=2))
    assert [c["index"] for c in bodies[1]["choices"]] == [1]
    assert bodies[0]["choices"][0]["finish_reason"] == "length"  # a choice that ended on its own keeps its reason


def test_a_client_abort_is_not_a_content_filter(fetcher: ReportFetcher) -> None:
    bodies = _bodies(_run(fetcher, [_completion_chunk("x", "abort"), DONE]))
    assert bodies[0]["choices"][0]["finish_reason"] == "abort"
    assert "aborted_by" not in bodies[-1]["circuitwatch"]
