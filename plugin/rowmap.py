"""Which request and absolute position each row of a step's flattened batch belongs to.

Built from the runner's own batch state, in batch order (building it in dict order silently gave most
requests another request's activations in one peer project). Rows past the scheduled count are padding
and are never mapped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StepRows:
    req_ids: list[str]  # internal vLLM ids, batch order
    row_request: np.ndarray  # int64 [rows]: index into req_ids
    positions: np.ndarray  # int64 [rows]: absolute 0-based position
    token_ids: np.ndarray  # int64 [rows]
    first_computed: np.ndarray  # int64 [requests]: positions below this were not computed (prefix cache)

    @property
    def num_rows(self) -> int:
        return len(self.positions)


def rows_from_batch(
    req_ids: list[str], query_start_loc: np.ndarray, num_computed_tokens: np.ndarray, token_ids: np.ndarray
) -> StepRows:
    """Rows from the generic batch description both runners keep.

    query_start_loc [requests + 1]: the rows of request i are [qsl[i], qsl[i+1]); num_computed_tokens
    [requests]: the absolute position of each request's first row this step.
    """
    qsl = np.asarray(query_start_loc, dtype=np.int64)
    num_requests = len(req_ids)
    if len(qsl) != num_requests + 1:
        raise ValueError(f"query_start_loc has {len(qsl)} entries for {num_requests} requests")
    counts = np.diff(qsl)
    if (counts < 0).any():
        raise ValueError("query_start_loc must not decrease")
    total = int(qsl[-1]) if num_requests else 0
    row_request = np.repeat(np.arange(num_requests, dtype=np.int64), counts)
    first = np.asarray(num_computed_tokens, dtype=np.int64)[:num_requests]
    positions = first[row_request] + (np.arange(total, dtype=np.int64) - qsl[row_request])
    return StepRows(list(req_ids), row_request, positions, np.asarray(token_ids[:total], dtype=np.int64), first)


def rows_from_v1_runner(runner) -> StepRows:
    """V1 runner (`vllm/v1/worker/gpu_model_runner.py`, the CPU runner's base), after `_prepare_inputs`."""
    batch = runner.input_batch
    n = batch.num_reqs
    qsl = runner.query_start_loc.np[: n + 1]
    total = int(qsl[-1]) if n else 0
    token_ids = runner.input_ids.cpu[:total].numpy()
    return rows_from_batch(list(batch.req_ids[:n]), qsl, batch.num_computed_tokens_cpu[:n], token_ids)


def rows_from_v2_batch(input_batch) -> StepRows:
    """V2 runner (`vllm/v1/worker/gpu/model_runner.py`): its per-step `InputBatch` from `prepare_inputs`.

    Differences from V1: the batch object is rebuilt every step and lives only as a local of
    execute_model (the plugin captures it by wrapping prepare_inputs); input ids live on the device; the
    real row count is `num_tokens` (rows after it up to num_tokens_after_padding are padding).
    """
    n = input_batch.num_reqs
    qsl = np.asarray(input_batch.query_start_loc_np[: n + 1])
    total = int(input_batch.num_tokens)
    if n and int(qsl[-1]) != total:
        raise ValueError(f"V2 batch: query_start_loc ends at {int(qsl[-1])} but num_tokens is {total}")
    token_ids = input_batch.input_ids[:total].detach().to("cpu").numpy()
    return rows_from_batch(list(input_batch.req_ids[:n]), qsl, input_batch.num_computed_tokens_np[:n], token_ids)
