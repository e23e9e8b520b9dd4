"""The exporter's queued items as one spool file per flush, written as they are and turned into table rows later.

    exporter thread: items --stage_queued--> <stem>.queued.<reports>.<feedback>.arrow
    delivery:        read_queued --> the same items --RowMaker--> <stem>.<table>.<rows>.arrow files

Building rows (rows.py) costs a few tenths of a millisecond of CPU per request, much of it Python holding the
interpreter ingest needs. Written as they are (a report's serialised bytes, its feature sets' term ids, a few
concatenations and no compression), the queued items cost the sidecar's process little; the delivery, in a
process of its own for the embedded store, builds the rows at its lower priority. The file is Arrow IPC, read
with Arrow's own reader: nothing in the spool is unpickled or evaluated.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from circuitwatch.proto import circuitwatch_pb2 as pb

from ..registry import SaeIdentity
from ..request_sets import MODES, FeatureSet, SlotCodes

QUEUED = "queued"  # the table part of a queued file's name
# a request's kept token codes, flattened over its slots: column -> dtype
_CODE_COLUMNS = {
    "code_slots": np.uint32,  # the slots (gslots) it has codes in
    "code_rows": np.uint32,  # rows per slot
    "code_positions": np.int64,  # per row
    "code_counts": np.uint32,  # codes per row
    "code_features": np.uint32,
    "code_activations": np.float32,
}


def _column(mode: int, part: str) -> str:
    return f"{part}_{mode}"


def stage_queued(items: list[tuple], directory: Path, stem: str) -> list[tuple[Path, Path]]:
    """A flush's items as one file, <stem>.queued.<reports>.<feedback rows>.arrow (the counts let the spool count
    what it drops without reading it), written as .partial; returns the (partial, final) pair for the spool to
    admit (Spool.admit)."""
    import pyarrow as pa

    kinds, reports, layouts = [], [], []
    layout_index: dict[tuple, int] = {}
    sets: dict[str, list] = {_column(m, p): [] for m in MODES for p in ("terms", "scopes")}
    codes: dict[str, list] = {name: [] for name in _CODE_COLUMNS}
    label_items: list[str | None] = []
    reports_count = feedback_rows = 0
    for item in items:
        kind = item[0]
        kinds.append(kind)
        report = item[1] if kind in ("report", "reduced") else None
        reports.append(report.SerializeToString() if report is not None else None)
        reports_count += report is not None
        found: dict[int, FeatureSet] = item[2] if kind == "reduced" else {}
        for mode in MODES:
            feature_set = found.get(mode)
            sets[_column(mode, "terms")].append(None if feature_set is None else feature_set.terms)
            sets[_column(mode, "scopes")].append(None if feature_set is None else feature_set.scopes)
        if kind == "reduced":
            saes = item[3]
            layouts.append(layout_index.setdefault(saes, len(layout_index)))
        else:
            layouts.append(-1)
        _add_codes(codes, item[4] if kind == "reduced" else None)
        if kind == "labels":
            feedback_rows += len(item[1])
            label_items.append(json.dumps([item[1], item[2]]))
        else:
            label_items.append(None)
    columns = {
        "kind": pa.array(kinds, pa.string()),
        "report": pa.array(reports, pa.binary()),
        "layout": pa.array(layouts, pa.int32()),
        **{name: _lists(values, np.uint32 if name.startswith("terms") else np.uint8) for name, values in sets.items()},
        **{name: _lists(codes[name], dtype) for name, dtype in _CODE_COLUMNS.items()},
        "labels": pa.array(label_items, pa.string()),
    }
    saes_json = json.dumps([[[base, asdict(identity), slot] for base, identity, slot in saes] for saes in layout_index])
    table = pa.table(columns).replace_schema_metadata({"saes": saes_json})
    path = directory / f"{stem}.{QUEUED}.{reports_count}.{feedback_rows}.arrow"
    partial = path.with_name(path.name + ".partial")
    with pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return [(partial, path)]


def _add_codes(columns: dict[str, list], codes: dict[int, SlotCodes] | None) -> None:
    """A request's kept token codes, flattened over its slots (None: not kept)."""
    if codes is None:
        for values in columns.values():
            values.append(None)
        return
    slots = sorted(codes)
    columns["code_slots"].append(np.array(slots, np.uint32))
    columns["code_rows"].append(np.array([len(codes[g].positions) for g in slots], np.uint32))
    columns["code_positions"].append(_concat([codes[g].positions for g in slots], np.int64))
    columns["code_counts"].append(_concat([np.diff(codes[g].row_offsets) for g in slots], np.uint32))
    columns["code_features"].append(_concat([codes[g].features for g in slots], np.uint32))
    columns["code_activations"].append(_concat([codes[g].activations for g in slots], np.float32))


def _concat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.empty(0, dtype)


def _lists(values: list[np.ndarray | None], dtype):
    """A list column from one array (or None) per item, built with one concatenation."""
    import pyarrow as pa

    lengths = np.fromiter((0 if v is None else len(v) for v in values), np.int64, len(values))
    offsets = np.zeros(len(values) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    present = [v for v in values if v is not None]
    flat = np.concatenate(present).astype(dtype, copy=False) if present else np.empty(0, dtype)
    nulls = pa.array([v is None for v in values], pa.bool_())
    return pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(flat), mask=nulls)


def read_queued(path: Path) -> list[tuple]:
    """The items a queued file holds, as the exporter queued them (reports parsed again, arrays views of the
    file's columns)."""
    import pyarrow as pa

    with pa.OSFile(str(path), "rb") as source:
        table = pa.ipc.open_file(source).read_all()
    layouts = [
        tuple((base, SaeIdentity(**identity), slot) for base, identity, slot in saes)
        for saes in json.loads(table.schema.metadata[b"saes"])
    ]
    kinds = table.column("kind").to_pylist()
    reports = table.column("report").to_pylist()
    layout_of = table.column("layout").to_numpy()
    sets = {name: _split(table.column(name)) for m in MODES for name in (_column(m, "terms"), _column(m, "scopes"))}
    codes = {name: _split(table.column(name)) for name in _CODE_COLUMNS}
    labels = table.column("labels").to_pylist()
    items: list[tuple] = []
    for i, kind in enumerate(kinds):
        if kind == "labels":
            audit, states = json.loads(labels[i])
            items.append(("labels", [tuple(row) for row in audit], [tuple(row) for row in states]))
            continue
        report = pb.Report.FromString(reports[i])
        if kind == "report":
            items.append(("report", report))
            continue
        found = {
            mode: FeatureSet(sets[_column(mode, "terms")][i], sets[_column(mode, "scopes")][i])
            for mode in MODES
            if sets[_column(mode, "terms")][i] is not None
        }
        items.append(("reduced", report, found, layouts[layout_of[i]], _codes_of({k: v[i] for k, v in codes.items()})))
    return items


def _split(column) -> list[np.ndarray | None]:
    """A list column as one array per item (views into one buffer; None where the item had none)."""
    import pyarrow as pa

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    flat = array.values.to_numpy(zero_copy_only=False)
    offsets = array.offsets.to_numpy()
    valid = array.is_valid().to_numpy(zero_copy_only=False)
    return [flat[offsets[i] : offsets[i + 1]] if valid[i] else None for i in range(len(array))]


def _codes_of(parts: dict[str, np.ndarray | None]) -> dict[int, SlotCodes] | None:
    if parts["code_slots"] is None:
        return None
    codes, row, nnz = {}, 0, 0
    for gslot, rows in zip(parts["code_slots"].tolist(), parts["code_rows"].tolist(), strict=True):
        counts = parts["code_counts"][row : row + rows].astype(np.int64)
        offsets = np.zeros(rows + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        end = nnz + int(offsets[-1])
        codes[gslot] = SlotCodes(
            positions=parts["code_positions"][row : row + rows],
            row_offsets=offsets,
            features=parts["code_features"][nnz:end],
            activations=parts["code_activations"][nnz:end],
        )
        row, nnz = row + rows, end
    return codes
