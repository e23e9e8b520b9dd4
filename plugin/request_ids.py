"""The request-id grammar: how vLLM names a request inside the engine, the id the API client knows it by, and the
unique key the sidecar stores it under.

- The OpenAI layer names a response `cmpl-<id>` (completions) or `chatcmpl-<id>` (chat), where <id> comes from
  `X-Request-Id` or the body's `request_id`: chosen by the client, so not unique.
- Inside the engine a completion's prompt i is `<response id>-<i>` (a request may carry several prompts); the
  first prompt maps back to the response id, prompts 1.. keep their `-<i>`. That is the request's *client id*.
- vLLM appends a random `-xxxxxxxx` (8 hex) to every id it hands the engine, unique per request. The sidecar's
  *key* is the client id with that suffix kept as `.xxxxxxxx`: unique even when clients reuse ids, and derived
  by the engine core and every worker from the id they already hold, so no client-supplied field can set it.
- Parallel-sampling children are `<index>_<parent>`, in the engine, in client ids and in keys.
- Client ids are bounded (MAX_CLIENT_ID_CHARS, longer ones keep a prefix and a digest) and printable.

Pure string functions, imported by the engine core, the workers and the API server alike (no torch here).
"""

from __future__ import annotations

import hashlib
import re

MAX_CLIENT_ID_CHARS = 160
_INTERNAL = re.compile(r"^(?:(\d+)_)?(.*)-([0-9a-f]{8})$", re.DOTALL)
_FIRST_COMPLETION_PROMPT = re.compile(r"^(cmpl-.+)-0$", re.DOTALL)
_CHILD = re.compile(r"^(\d+)_(.+)$", re.DOTALL)
_KEY_SUFFIX = re.compile(r"\.[0-9a-f]{8}$")

COMPLETION, CHAT = "completion", "chat"
_RESPONSE_PREFIX = {COMPLETION: "cmpl", CHAT: "chatcmpl"}


def bounded(client_id: str) -> str:
    """A client-chosen id as the monitor keeps it: printable, and at most MAX_CLIENT_ID_CHARS long (a longer
    one keeps its start and a digest of the whole)."""
    text = "".join(ch if ch.isprintable() else "?" for ch in client_id)
    if len(text) <= MAX_CLIENT_ID_CHARS:
        return text
    digest = hashlib.sha256(client_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{text[: MAX_CLIENT_ID_CHARS - 17]}~{digest}"


def _parts(internal_id: str) -> tuple[str, str, str]:
    """(child prefix "<i>_" or "", client-visible id without the prefix, vLLM's 8-hex suffix or "")."""
    match = _INTERNAL.match(internal_id)
    if match is None:  # no random suffix (VLLM_DISABLE_REQUEST_ID_RANDOMIZATION): nothing makes it unique
        child = _CHILD.match(internal_id)
        return (f"{child.group(1)}_", child.group(2), "") if child else ("", internal_id, "")
    child, external, suffix = match.groups()
    first_prompt = _FIRST_COMPLETION_PROMPT.match(external)
    return (f"{child}_" if child else "", first_prompt.group(1) if first_prompt else external, suffix)


def client_request_id(internal_id: str) -> str:
    """The id the API client knows an engine request by: its response id (a prompt's `-<i>` id, a child's
    `<index>_` id), bounded."""
    child, external, _ = _parts(internal_id)
    return child + bounded(external)


def request_key(internal_id: str) -> str:
    """The sidecar's unique key for an engine request: its client id plus vLLM's random suffix."""
    child, external, suffix = _parts(internal_id)
    return f"{child}{bounded(external)}.{suffix}" if suffix else child + bounded(external)


def client_id_of_key(key: str) -> str:
    """The client id a key was made from."""
    return _KEY_SUFFIX.sub("", key)


def response_id(kind: str, client_id: str) -> str:
    """The OpenAI response id vLLM builds from a client-chosen id."""
    return f"{_RESPONSE_PREFIX[kind]}-{client_id}"


def choice_request_ids(request: str, n: int) -> list[str]:
    """The sidecar ids of a request's choices: the request itself, or one child per choice for n > 1."""
    return [request] if n == 1 else [f"{i}_{request}" for i in range(n)]


def parent_request_id(request_id: str) -> str:
    """The request a parallel-sampling child belongs to (an id that is not a child is its own parent)."""
    child = _CHILD.match(request_id)
    return child.group(2) if child else request_id
