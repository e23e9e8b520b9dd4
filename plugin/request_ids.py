"""The request-id grammar: how vLLM names a request inside the engine, and the id the sidecar and the client use
for it (DESIGN: request id = the OpenAI response id).

- The OpenAI layer names a response `cmpl-<id>` (completions) or `chatcmpl-<id>` (chat), where <id> comes from
  `X-Request-Id` or the body's `request_id`.
- Inside the engine a completion's prompt i is `<response id>-<i>` (a request may carry several prompts); the
  first prompt maps back to the response id, prompts 1.. keep their `-<i>`.
- vLLM appends a random `-xxxxxxxx` to every id it hands the engine: removed.
- Parallel-sampling children are `<index>_<parent id>`, in the engine and in the sidecar.

Pure string functions, imported by the engine core, the workers and the API server alike (no torch here).
"""

from __future__ import annotations

import re

_INTERNAL_SUFFIX = re.compile(r"-[0-9a-f]{8}$")
_FIRST_COMPLETION_PROMPT = re.compile(r"^((?:\d+_)?cmpl-.+)-0$")
_CHILD = re.compile(r"^(\d+)_(.+)$")

COMPLETION, CHAT = "completion", "chat"
_RESPONSE_PREFIX = {COMPLETION: "cmpl", CHAT: "chatcmpl"}


def external_request_id(internal_id: str, stamped: object = None) -> str:
    """The sidecar's id for an engine request: its response id (or a prompt's `-<i>` id, or a child's
    `<index>_` id). An id stamped by the API-server side replaces the response id, children keeping their
    index."""
    if stamped:
        child = _CHILD.match(internal_id)
        return f"{child.group(1)}_{stamped}" if child else str(stamped)
    external = _INTERNAL_SUFFIX.sub("", internal_id)
    first_prompt = _FIRST_COMPLETION_PROMPT.match(external)
    return first_prompt.group(1) if first_prompt else external


def response_id(kind: str, client_id: str) -> str:
    """The OpenAI response id vLLM builds from a client-chosen id."""
    return f"{_RESPONSE_PREFIX[kind]}-{client_id}"


def engine_request_ids(kind: str, response: str) -> list[str]:
    """The ids vLLM's engine knows the (first prompt of the) request by, without the random suffix; what an
    abort names."""
    return [f"{response}-0"] if kind == COMPLETION else [response]


def choice_request_ids(response: str, n: int) -> list[str]:
    """The sidecar ids of a response's choices: the response itself, or one child per choice for n > 1."""
    return [response] if n == 1 else [f"{i}_{response}" for i in range(n)]


def parent_request_id(request_id: str) -> str:
    """The request a parallel-sampling child belongs to (an id that is not a child is its own parent)."""
    child = _CHILD.match(request_id)
    return child.group(2) if child else request_id
