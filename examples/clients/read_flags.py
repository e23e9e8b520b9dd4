"""Read circuitwatch flags with the `openai` client, as an application would: one completion, then one stream.

    python examples/clients/read_flags.py --base-url http://127.0.0.1:8000/v1 --model /models/my-model

Prints one line per response: status, maximum severity, matched circuits, and the circuit that aborted it. A
request the monitor stopped finishes with `finish_reason: "content_filter"`. Needs `pip install openai
circuitwatch` (the base install: no torch).
"""

from __future__ import annotations

import argparse

from openai import OpenAI

from circuitwatch.response import Monitoring, read_monitoring


def describe(kind: str, finish_reason: str | None, monitoring: Monitoring | None) -> str:
    if monitoring is None:
        return f"{kind}: not monitored"
    circuits = sorted({flag.circuit for report in monitoring.reports for flag in report.flags})
    line = (
        f"{kind}: status={monitoring.report.status} max_severity={monitoring.max_severity}"
        f" circuits={','.join(circuits) or '-'} finish_reason={finish_reason}"
    )
    if monitoring.pending:  # not final within the server's deadline: ask the sidecar later (GetReport)
        line += f" fetch_later={monitoring.report.request_id}"
    return line + (f" aborted_by={monitoring.aborted_by}" if monitoring.aborted_by else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", required=True)
    parser.add_argument("--api-key", default="unused")
    parser.add_argument("--prompt", default="The import statement")
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    messages = [{"role": "user", "content": args.prompt}]

    response = client.chat.completions.create(model=args.model, messages=messages, max_tokens=8)
    print(describe("chat", response.choices[0].finish_reason, read_monitoring(response)))

    # Streaming: with usage asked for, the object rides on the usage chunk, which OpenAI keeps last.
    chunks = list(
        client.chat.completions.create(
            model=args.model, messages=messages, max_tokens=8, stream=True, stream_options={"include_usage": True}
        )
    )
    finish_reason = next((c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason), None)
    print(describe("stream", finish_reason, read_monitoring(chunks)))


if __name__ == "__main__":
    main()
