"""Circuits found by identification, written as entries of a circuit file the sidecar loads: each feature
pinned to its SAE's weights hash, the query that found them kept in the labels, the file validated before it is
replaced atomically."""

from __future__ import annotations

import hashlib
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format

from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto.names import MODE_NAMES, SCOPE_NAMES

from .circuits import parse_circuits
from .config import ConfigError

QUERY_IDS_KEPT = 50  # request ids quoted in a saved circuit's query label, per side


def match_rule(rule: str, terms: int) -> tuple[str, int]:
    """`any`, `all` or `at_least:N` over a saved circuit's terms, as (operator, N)."""
    if rule in ("any", "all"):
        return rule, 0
    kind, _, n = rule.partition(":")
    if kind != "at_least" or not n.isdigit() or not 1 <= int(n) <= terms:
        raise ValueError(f"{rule!r}: expected any, all or at_least:N with 1 <= N <= {terms}")
    return kind, int(n)


def _term(feature: pb.FeatureScore) -> dict:
    """A saved term names where its SAE reads, so a per-head circuit reads as one; the hash pins the SAE."""
    term: dict = {"layer": feature.layer, "hook_point": feature.hook_point or "resid_post"}
    if feature.HasField("head"):
        term["head"] = feature.head
    return term | {"feature": feature.feature, "sae": feature.weights_hash}


def circuit_entry(
    name: str,
    features: list[pb.FeatureScore],
    request: pb.ContrastRequest,
    response: pb.ContrastResponse,
    severity: str,
    match: str,
) -> dict:
    """A circuit file entry: the features pinned to their SAE's weights hash, the query in the labels."""
    terms = [_term(f) for f in features]
    kind, n = match_rule(match, len(features))
    when = {"at_least": {"n": n, "of": terms}} if kind == "at_least" else {kind: terms}
    query = pb.ContrastRequest()
    query.CopyFrom(request)
    summarised = {}
    for side in ("positives", "negatives"):
        ids = list(getattr(query, side).request_ids)
        if len(ids) > QUERY_IDS_KEPT:  # a label is no place for thousands of ids: keep a count and a digest
            del getattr(query, side).request_ids[:]
            digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]
            summarised[f"{side}_ids"] = f"{len(ids)} ids, sha256 {digest} (newline-joined)"
    text = json_format.MessageToJson(query, preserving_proto_field_name=True, indent=None)
    return {
        "name": name,
        "description": f"identified by circuitwatch identify on {datetime.now(UTC).isoformat(timespec='seconds')}",
        "severity": severity,
        "scope": SCOPE_NAMES[response.scope],
        "labels": {
            "identified_by": "circuitwatch identify",
            "query": text,
            **summarised,
            "mode": MODE_NAMES[response.mode],
            "positives": response.positives,
            "negatives": response.negatives,
            "exclusivity": ",".join(f"{f.exclusivity:.3f}" for f in features),
        },
        "when": when,
    }


def save_circuit(path: Path, entry: dict[str, Any], replace: bool = False) -> bool:
    """Add (or with `replace`, overwrite) one circuit entry in a circuit file, validated before it is written.

    The file is rewritten whole through YAML, so comments in it are not kept: give identified circuits a file
    of their own. Written atomically (temporary file + rename): a reader never sees half a file. Returns
    whether an entry of that name was replaced.
    """
    path = Path(path)
    document: dict[str, Any] = {"circuits": []}
    if path.exists():
        try:
            existing = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc}); not overwriting it") from exc
        parse_circuits(existing, str(path))  # refuse to build on a broken file
        document = existing or document
    name = entry.get("name")
    names = [item.get("name") for item in document["circuits"]]
    replaced = name in names
    if replaced and not replace:
        raise ConfigError(f"{path}: circuit {name!r} already exists (replace it explicitly)")
    document["circuits"] = [item for item in document["circuits"] if item.get("name") != name] + [entry]
    parse_circuits(document, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        yaml.safe_dump(document, tmp, sort_keys=False, width=120)
    os.replace(tmp.name, path)
    return replaced
