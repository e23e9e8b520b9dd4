"""Finished requests as rows of the fleet tables (schema.py), collected into one Batch per flush and written as
Arrow IPC files, one per table: the unit the spool keeps and the store inserts.

Everything here runs in the delivery (delivery.py: the embedded store's own process, or the exporter's thread for
a server), from the items the exporter spooled as they were queued (queued.py); never on the ingest path.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable
from dataclasses import astuple, dataclass, field
from pathlib import Path

import numpy as np

from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto.names import severity_name, status_name

from ..registry import SaeIdentity
from ..request_index import counts_as_complete
from ..request_sets import FeatureSet, SlotCodes

HOUR_NS = 3600 * 10**9


@functools.cache
def sae_id(identity: SaeIdentity) -> str:
    """A stable key for an SAE identity: the same SAE has the same key on every sidecar (cached: a sidecar sees
    a handful of SAEs, and every exported row names one)."""
    return hashlib.blake2b(repr(astuple(identity)).encode(), digest_size=8).hexdigest()


def trace_id(report: pb.Report) -> str:
    parts = report.trace.traceparent.split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else ""


# column name -> kind: "str", "bool", "u8", "u32", "i32", "i64", "time" (ns since the epoch, UTC), "bytes",
# "list_str", "list_u32", "list_u8", "list_f32"
COLUMNS: dict[str, dict[str, str]] = {
    "saes": {
        "sae": "str", "slot": "u32", "name": "str", "architecture": "str", "layer": "u32", "hook_point": "str",
        "head": "i32", "d_in": "u32", "d_sae": "u32", "weights_hash": "str", "selection": "str",
        "source_format": "str",
    },
    "reports": {
        "instance": "str", "request_id": "str", "response_id": "str", "model": "str", "arrival": "time",
        "finalized": "time", "status": "str", "complete": "bool", "has_codes": "bool", "flags": "list_str",
        "max_severity": "str", "labels": "list_str", "trace_id": "str", "num_prompt_tokens": "u32",
        "num_generated_tokens": "u32", "saes": "list_str", "report": "bytes",
    },
    "request_labels": {
        "instance": "str", "request_id": "str", "arrival": "time", "version": "i64", "labels": "list_str",
    },
    "label_feedback": {
        "instance": "str", "request_id": "str", "at": "time", "operation": "str", "label": "str", "author": "str",
        "note": "str",
    },
    "token_codes": {
        "instance": "str", "request_id": "str", "arrival": "time", "sae": "str", "position": "u32",
        "features": "list_u32", "activations": "list_f32",
    },
}  # fmt: skip
# Insert order within a batch: a request's features before its report (selections start from reports).
TABLES = ("saes", "request_features", "feature_counts", "token_codes", "request_labels", "label_feedback", "reports")


@dataclass
class Batch:
    """Rows for every table, column by column."""

    columns: dict[str, dict[str, list]] = field(
        default_factory=lambda: {t: {c: [] for c in cols} for t, cols in COLUMNS.items()}
    )
    tables: dict[str, list] = field(default_factory=dict)  # table -> Arrow tables built whole (finish_features)
    reduced: list[tuple] = field(default_factory=list)  # (report, feature sets, gslot layout) not yet split
    requests: int = 0

    def _added(self, table: str) -> int:
        """Rows added one by one (tables built whole, request_features and feature_counts, have none)."""
        return len(next(iter(self.columns[table].values()))) if table in self.columns else 0

    def rows(self, table: str) -> int:
        return self._added(table) + sum(t.num_rows for t in self.tables.get(table, ()))

    def add(self, table: str, **values) -> None:
        for name, column in self.columns[table].items():
            column.append(values[name])

    def stage(self, directory: Path, stem: str) -> list[tuple[Path, Path]]:
        """One Arrow IPC file per non-empty table, in TABLES order, written as <stem>.<table>.<rows>.arrow.partial;
        returns (partial, final) pairs for the spool to admit (Spool.admit), so a batch file is whole or absent."""
        import pyarrow as pa

        staged = []
        for table in TABLES:
            if not self.rows(table):
                continue
            parts = list(self.tables.get(table, ()))
            if self._added(table):
                parts.append(pa.table({n: _arrow(k, self.columns[table][n]) for n, k in COLUMNS[table].items()}))
            data = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
            path = directory / f"{stem}.{table}.{data.num_rows}.arrow"
            partial = path.with_name(path.name + ".partial")
            with (
                pa.OSFile(str(partial), "wb") as sink,
                pa.ipc.new_file(sink, data.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer,
            ):
                writer.write_table(data)
            staged.append((partial, path))
        return staged


def load_arrow() -> None:
    """Import pyarrow and what its first conversion imports (its pandas shim loads pandas, when installed): about
    0.8 s of imports that hold the interpreter. Done when the exporter is made, before the server takes traffic,
    so that the first flush, during traffic, does not stall ingest for that long."""
    import pyarrow as pa
    import pyarrow.ipc

    pa.array([0])


def _arrow(kind: str, values: list):
    import pyarrow as pa

    scalar = {
        "str": pa.string(), "bool": pa.bool_(), "u8": pa.uint8(), "u32": pa.uint32(), "i32": pa.int32(),
        "i64": pa.int64(), "time": pa.timestamp("ns", tz="UTC"), "bytes": pa.binary(),
    }  # fmt: skip
    if kind in scalar:
        return pa.array(values, type=scalar[kind])
    if kind == "list_str":
        return pa.array(values, type=pa.list_(pa.string()))
    dtype = {"list_u32": np.uint32, "list_u8": np.uint8, "list_f32": np.float32}[kind]
    lengths = np.fromiter((len(v) for v in values), np.int32, len(values))
    offsets = np.concatenate(([0], np.cumsum(lengths, dtype=np.int32)))
    flat = np.concatenate([np.asarray(v, dtype) for v in values]) if values else np.empty(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat))


class RowMaker:
    """Turns one sidecar's finished requests into rows; knows its instance name and which SAEs it exported."""

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self._saes_sent: set[str] = set()

    def sae(self, batch: Batch, identity: SaeIdentity, slot: int) -> str:
        key = sae_id(identity)
        if key not in self._saes_sent:
            self._saes_sent.add(key)
            values = {name: getattr(identity, name) for name in COLUMNS["saes"] if hasattr(identity, name)}
            values.update(sae=key, slot=slot, head=-1 if identity.head is None else identity.head)
            batch.add("saes", **values)
        return key

    def report(self, batch: Batch, report: pb.Report, has_codes: bool) -> None:
        batch.requests += 1
        saes = [self.sae(batch, SaeIdentity.from_proto(s), s.slot) for s in report.saes]
        batch.add(
            "reports",
            instance=self.instance,
            request_id=report.request_id,
            response_id=report.response_id,
            model=report.model,
            arrival=report.arrival_unix_nanos,
            finalized=report.finalized_unix_nanos,
            status=status_name(report.status),
            complete=counts_as_complete(report),
            has_codes=has_codes,
            flags=[f.circuit for f in report.flags],
            max_severity=severity_name(report.max_severity),
            labels=list(report.labels),
            trace_id=trace_id(report),
            num_prompt_tokens=report.num_prompt_tokens,
            num_generated_tokens=report.num_generated_tokens,
            saes=saes,
            report=report.SerializeToString(),
        )
        self.labels(batch, report.request_id, report.arrival_unix_nanos, report.finalized_unix_nanos, report.labels)

    def labels(self, batch: Batch, request_id: str, arrival_ns: int, version: int, labels: Iterable[str]) -> None:
        batch.add(
            "request_labels",
            instance=self.instance,
            request_id=request_id,
            arrival=arrival_ns,
            version=version,
            labels=list(labels),
        )

    def feature_sets(
        self,
        batch: Batch,
        report: pb.Report,
        sets: dict[int, FeatureSet],
        saes: tuple[tuple[int, SaeIdentity, int], ...],
    ) -> None:
        """A request's feature sets (term ids); `saes`: (term base, identity, producer slot) of every gslot, in
        term order. Split per SAE for the whole batch at once (finish_features), not request by request."""
        batch.reduced.append((report, sets, saes))

    def finish_features(self, batch: Batch) -> None:
        """The batch's request_features rows: one per (request, mode, SAE), cut from every request's term ids
        with whole-array operations (a per-request loop here would cost ingest its GIL time)."""
        import pyarrow as pa

        groups: dict[tuple, list[int]] = {}  # requests reduced under the same gslot layout (almost always one)
        for i, (_, _, saes) in enumerate(batch.reduced):
            groups.setdefault(saes, []).append(i)
        for saes, members in groups.items():
            bases = np.array([base for base, _, _ in saes], dtype=np.int64)
            keys = [self.sae(batch, identity, slot) for _, identity, slot in saes]
            reports = [batch.reduced[i][0] for i in members]
            for mode in sorted({m for i in members for m in batch.reduced[i][1]}):
                found = [batch.reduced[i][1].get(mode, FeatureSet.empty()) for i in members]
                lengths = np.fromiter((len(f.terms) for f in found), np.int64, len(found))
                if not lengths.sum():
                    continue
                terms = np.concatenate([f.terms for f in found]).astype(np.int64)
                scopes = np.concatenate([f.scopes for f in found]).astype(np.uint8)
                request = np.repeat(np.arange(len(found)), lengths)
                owner = np.searchsorted(bases, terms, side="right") - 1
                starts = np.flatnonzero(np.diff(request * len(bases) + owner, prepend=-1))
                offsets = np.append(starts, len(terms)).astype(np.int32)
                rows, owners = request[starts].tolist(), owner[starts].tolist()
                self._counts(batch, mode, reports, request, terms, scopes, bases, keys)
                batch.tables.setdefault("request_features", []).append(
                    pa.table(
                        {
                            "instance": pa.array([self.instance] * len(rows), pa.string()),
                            "request_id": pa.array([reports[r].request_id for r in rows], pa.string()),
                            "model": pa.array([reports[r].model for r in rows], pa.string()),
                            "arrival": pa.array(
                                [reports[r].arrival_unix_nanos for r in rows], pa.timestamp("ns", tz="UTC")
                            ),
                            "mode": pa.array([mode] * len(rows), pa.uint8()),
                            "sae": pa.array([keys[o] for o in owners], pa.string()),
                            "features": pa.ListArray.from_arrays(
                                pa.array(offsets), pa.array((terms - bases[owner]).astype(np.uint32))
                            ),
                            "scopes": pa.ListArray.from_arrays(pa.array(offsets), pa.array(scopes)),
                        }
                    )
                )
        batch.reduced.clear()

    def _counts(self, batch, mode, reports, request, terms, scopes, bases, keys) -> None:
        """feature_counts rows: per (hour of arrival, model) of the batch's requests, how many carry each
        feature in each scope (bincount over term ids: one pass, no sort)."""
        import pyarrow as pa

        hour = np.array([r.arrival_unix_nanos // HOUR_NS for r in reports], dtype=np.int64)
        models = [r.model for r in reports]
        groups: dict[tuple[int, str], list[int]] = {}
        for i, key in enumerate(zip(hour.tolist(), models, strict=True)):
            groups.setdefault(key, []).append(i)
        size = int(terms.max()) + 1
        for (h, model), members in groups.items():
            inside = np.isin(request, members) if len(groups) > 1 else slice(None)
            t, s = terms[inside], scopes[inside]
            counts = [np.bincount(t[(s & bits) != 0], minlength=size) for bits in (1, 2, 3, 4)]
            present = np.flatnonzero(counts[2] | counts[3])
            owner = np.searchsorted(bases, present, side="right") - 1
            rows = len(present)
            batch.tables.setdefault("feature_counts", []).append(
                pa.table(
                    {
                        "hour": pa.array(np.full(rows, h * 3600, np.int64), pa.timestamp("s", tz="UTC")),
                        "model": pa.array([model] * rows, pa.string()),
                        "instance": pa.array([self.instance] * rows, pa.string()),
                        "mode": pa.array(np.full(rows, mode, np.uint8)),
                        "sae": pa.array([keys[g] for g in owner.tolist()], pa.string()),
                        "feature": pa.array((present - bases[owner]).astype(np.uint32)),
                        **{
                            name: pa.array(c[present].astype(np.uint64))
                            for name, c in zip(("prompt", "generated", "either", "pooled"), counts, strict=True)
                        },
                    }
                )
            )

    def token_codes(
        self, batch: Batch, report: pb.Report, codes: dict[int, SlotCodes], saes: dict[int, tuple[SaeIdentity, int]]
    ) -> None:
        for gslot, slot_codes in codes.items():
            identity, slot = saes[gslot]
            key = self.sae(batch, identity, slot)
            offsets = slot_codes.row_offsets
            for row, position in enumerate(slot_codes.positions.tolist()):
                batch.add(
                    "token_codes",
                    instance=self.instance,
                    request_id=report.request_id,
                    arrival=report.arrival_unix_nanos,
                    sae=key,
                    position=position,
                    features=slot_codes.features[offsets[row] : offsets[row + 1]],
                    activations=slot_codes.activations[offsets[row] : offsets[row + 1]],
                )

    def add_items(self, batch: Batch, items: list[tuple]) -> Batch:
        """The rows of a flush's queued items (exporter.py's hooks say what each holds)."""
        for item in items:
            kind = item[0]
            if kind == "report":
                self.report(batch, item[1], has_codes=False)
            elif kind == "reduced":
                _, report, sets, saes, codes = item
                self.feature_sets(batch, report, sets, saes)
                if codes is not None:
                    by_gslot = {g: (identity, slot) for g, (_, identity, slot) in enumerate(saes)}
                    self.token_codes(batch, report, codes, by_gslot)
                self.report(batch, report, has_codes=True)
            elif kind == "labels":
                _, audit, states = item
                self.feedback(batch, audit)
                for request_id, arrival_ns, version, labels in states:
                    self.labels(batch, request_id, arrival_ns, version, labels)
        self.finish_features(batch)
        return batch

    def feedback(self, batch: Batch, rows: list[tuple[str, int, str, str, str, str]]) -> None:
        for request_id, at, operation, label, author, note in rows:
            batch.add(
                "label_feedback",
                instance=self.instance,
                request_id=request_id,
                at=at,
                operation=operation,
                label=label,
                author=author,
                note=note,
            )
