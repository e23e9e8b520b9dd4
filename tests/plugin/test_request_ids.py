"""The request-id grammar between vLLM's engine ids, the ids clients know and the sidecar's unique keys."""

from __future__ import annotations

from circuitwatch.plugin.request_ids import (
    CHAT,
    COMPLETION,
    MAX_CLIENT_ID_CHARS,
    bounded,
    choice_request_ids,
    client_id_of_key,
    client_request_id,
    parent_request_id,
    request_key,
    response_id,
)


def test_engine_ids_map_back_to_the_ids_clients_know() -> None:
    assert client_request_id("chatcmpl-abc-1f2e3d4c") == "chatcmpl-abc"
    assert client_request_id("chatcmpl-abc-0-1f2e3d4c") == "chatcmpl-abc-0"  # a chat id ending in -0
    # completions: prompt 0 is the response id, further prompts keep their index
    assert client_request_id("cmpl-abc-0-1f2e3d4c") == "cmpl-abc"
    assert client_request_id("cmpl-abc-2-1f2e3d4c") == "cmpl-abc-2"
    assert client_request_id("cmpl-job-7-0-1f2e3d4c") == "cmpl-job-7"  # a user id ending in digits
    assert client_request_id("1_chatcmpl-abc-1f2e3d4c") == "1_chatcmpl-abc"  # parallel-sampling child
    assert client_request_id("1_cmpl-abc-0-1f2e3d4c") == "1_cmpl-abc"
    assert client_request_id("3-1f2e3d4c") == "3"  # offline LLM
    assert client_request_id("no-suffix-here") == "no-suffix-here"


def test_keys_keep_vllms_unique_suffix_so_reused_client_ids_never_collide() -> None:
    assert request_key("cmpl-abc-0-1f2e3d4c") == "cmpl-abc.1f2e3d4c"
    assert request_key("cmpl-abc-0-99999999") == "cmpl-abc.99999999"  # the same X-Request-Id again
    assert request_key("cmpl-abc-2-1f2e3d4c") == "cmpl-abc-2.1f2e3d4c"
    assert request_key("1_cmpl-abc-0-1f2e3d4c") == "1_cmpl-abc.1f2e3d4c"
    assert request_key("3-1f2e3d4c") == "3.1f2e3d4c"
    assert request_key("no-suffix-here") == "no-suffix-here"  # randomization disabled: nothing to add
    for internal in ("cmpl-abc-0-1f2e3d4c", "1_cmpl-abc-0-1f2e3d4c", "chatcmpl-x.y-1f2e3d4c", "3-1f2e3d4c"):
        assert client_id_of_key(request_key(internal)) == client_request_id(internal)


def test_client_ids_are_bounded_and_printable() -> None:
    long = "x" * 100_000
    assert len(bounded(long)) == MAX_CLIENT_ID_CHARS
    assert bounded(long) != bounded(long + "y")  # the digest keeps different ids apart
    assert bounded("a\nb\x00c") == "a?b?c"  # no forged log lines
    assert len(request_key(f"cmpl-{long}-0-1f2e3d4c")) == MAX_CLIENT_ID_CHARS + 9


def test_response_choice_and_parent_ids() -> None:
    assert response_id(COMPLETION, "job-1") == "cmpl-job-1"
    assert response_id(CHAT, "job-1") == "chatcmpl-job-1"
    assert choice_request_ids("cmpl-a.1f2e3d4c", 1) == ["cmpl-a.1f2e3d4c"]
    assert choice_request_ids("cmpl-a.1f2e3d4c", 3) == ["0_cmpl-a.1f2e3d4c", "1_cmpl-a.1f2e3d4c", "2_cmpl-a.1f2e3d4c"]
    assert [parent_request_id(c) for c in choice_request_ids("cmpl-a", 3)] == ["cmpl-a"] * 3
    assert parent_request_id("cmpl-a") == "cmpl-a"
    assert parent_request_id("12abc_x") == "12abc_x"  # not a child: digits then "_" only
    # an engine child's key is the child of the parent's key
    assert request_key("1_cmpl-a-0-1f2e3d4c") == choice_request_ids(request_key("cmpl-a-0-1f2e3d4c"), 2)[1]
