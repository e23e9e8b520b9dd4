"""The request-id grammar between vLLM's engine ids, OpenAI response ids and the sidecar's ids."""

from __future__ import annotations

from circuitwatch.plugin.request_ids import (
    CHAT,
    COMPLETION,
    choice_request_ids,
    engine_request_ids,
    external_request_id,
    parent_request_id,
    response_id,
)


def test_engine_ids_map_back_to_response_ids() -> None:
    assert external_request_id("chatcmpl-abc-1f2e3d4c") == "chatcmpl-abc"
    assert external_request_id("chatcmpl-abc-0-1f2e3d4c") == "chatcmpl-abc-0"  # a chat id ending in -0
    # completions: prompt 0 is the response id, further prompts keep their index
    assert external_request_id("cmpl-abc-0-1f2e3d4c") == "cmpl-abc"
    assert external_request_id("cmpl-abc-2-1f2e3d4c") == "cmpl-abc-2"
    assert external_request_id("cmpl-job-7-0-1f2e3d4c") == "cmpl-job-7"  # a user id ending in digits
    assert external_request_id("1_chatcmpl-abc-1f2e3d4c") == "1_chatcmpl-abc"  # parallel-sampling child
    assert external_request_id("1_cmpl-abc-0-1f2e3d4c") == "1_cmpl-abc"
    assert external_request_id("3-1f2e3d4c") == "3"  # offline LLM
    assert external_request_id("no-suffix-here") == "no-suffix-here"


def test_a_stamped_id_replaces_the_response_id_and_children_keep_their_index() -> None:
    assert external_request_id("1_x-1f2e3d4c", "chatcmpl-y") == "1_chatcmpl-y"
    assert external_request_id("cmpl-x-0-1f2e3d4c", "cmpl-z") == "cmpl-z"


def test_response_engine_and_choice_ids() -> None:
    assert response_id(COMPLETION, "job-1") == "cmpl-job-1"
    assert response_id(CHAT, "job-1") == "chatcmpl-job-1"
    assert engine_request_ids(COMPLETION, "cmpl-job-1") == ["cmpl-job-1-0"]
    assert engine_request_ids(CHAT, "chatcmpl-job-1") == ["chatcmpl-job-1"]
    assert choice_request_ids("cmpl-a", 1) == ["cmpl-a"]
    assert choice_request_ids("cmpl-a", 3) == ["0_cmpl-a", "1_cmpl-a", "2_cmpl-a"]
    # every engine id of a completion maps back to its response id; every choice to its parent
    for response in ("cmpl-job-1", "cmpl-7"):
        assert [external_request_id(f"{i}-0123abcd") for i in engine_request_ids(COMPLETION, response)] == [response]
    assert [parent_request_id(c) for c in choice_request_ids("cmpl-a", 3)] == ["cmpl-a"] * 3
    assert parent_request_id("cmpl-a") == "cmpl-a"
    assert parent_request_id("12abc_x") == "12abc_x"  # not a child: digits then "_" only
