"""The fleet store's tables. Created with IF NOT EXISTS and versioned in `schema_version`; `migrate` brings a
store to the current version and the configured retention, and is safe to run from every sidecar at once.

Keys: a request is (instance, request_id); `rkey` = cityHash64(instance, request_id) is computed by the store on
insert (a MATERIALIZED column) and is what queries join and filter on. Times are DateTime64(9), UTC.

- reports: one row per finished report (the whole report as protobuf bytes, plus the columns selectors use).
  ORDER BY (model, arrival, instance, request_id): listings and selections run by model and time.
- request_features: one row per (request, code mode, SAE): the request's feature ids and scope bits, the same
  reduction the request-level index stores. ORDER BY (mode, rkey, sae) in granules of 64 rows and compressed
  blocks of 8-16 KB: a contrast reads a side's rows by key, and a side scattered over the whole store (10k of
  1M requests) then reads about a third of the granules instead of all of them (measured: 2.7 s -> 1.5 s).
  Tried and not kept (1M-request bench): granules of 16 rows (no faster), feature ids in Delta + LZ4 (contrasts
  x0.75-0.96 the time, the store x1.46 the size), Delta + T64 + LZ4 (chdb-core-lite 26.5 hung in the pair-count
  query over such parts; it also hung now and then with this layout, in multi-threaded queries: connection.py).
- feature_counts: per hour of arrival, model, instance, mode, SAE and feature, how many requests carry it in
  each scope (SummingMergeTree: the exporter sends each batch's sums, the store adds them up), so "every
  other request" is counted from these sums instead of a scan of every request. The exporter computes them
  with numpy rather than a materialized view: the view's ARRAY JOIN cost the embedded engine five times the
  insert itself.
- request_labels: label sets over time (a report's labels, then each Label call's result); the latest wins.
- label_feedback: the audit trail of Label calls.
- token_codes (optional): every token's feature ids and activations, on a shorter TTL.
- saes: every SAE identity seen, keyed by its digest (sae_id).

Inserts carry a deduplication token (insert_deduplication_token) and every MergeTree keeps a deduplication
window, so a batch replayed from the spool is never counted twice: not its rows, not its sums.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEMA_VERSION = 1
DATABASE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
DEDUP_WINDOW = 10_000  # inserts remembered per table for deduplication (about three hours at one a second)


@dataclass(frozen=True)
class Retention:
    days: int
    token_codes_hours: int


def check_database(db: str) -> str:
    """A database name goes into SQL as an identifier: plain letters, digits and _ only."""
    if not DATABASE_NAME.fullmatch(db):
        raise ValueError(f"database {db!r}: expected a plain ClickHouse identifier (letters, digits, _)")
    return db


# Every per-request table starts with the request's key; rkey is what queries join and filter on.
KEY_COLUMNS = (
    "instance LowCardinality(String), request_id String, rkey UInt64 MATERIALIZED cityHash64(instance, request_id)"
)


def _settings() -> str:
    return f"SETTINGS non_replicated_deduplication_window = {DEDUP_WINDOW}"


def tables(db: str, retention: Retention) -> dict[str, str]:
    """CREATE statements by table name."""
    days = retention.days
    return {
        "schema_version": f"""
            CREATE TABLE IF NOT EXISTS {db}.schema_version (version UInt32, applied DateTime64(9, 'UTC'))
            ENGINE = MergeTree ORDER BY version""",
        "saes": f"""
            CREATE TABLE IF NOT EXISTS {db}.saes (
                sae String, slot UInt32, name String, architecture String, layer UInt32, hook_point String,
                head Int32, d_in UInt32, d_sae UInt32, weights_hash String, selection String, source_format String
            ) ENGINE = ReplacingMergeTree ORDER BY sae""",
        "reports": f"""
            CREATE TABLE IF NOT EXISTS {db}.reports (
                {KEY_COLUMNS},
                response_id String,
                model LowCardinality(String),
                arrival DateTime64(9, 'UTC'),
                finalized DateTime64(9, 'UTC'),
                status LowCardinality(String),
                complete Bool,
                has_codes Bool,
                flags Array(LowCardinality(String)),
                max_severity LowCardinality(String),
                labels Array(String),
                trace_id String,
                num_prompt_tokens UInt32,
                num_generated_tokens UInt32,
                saes Array(String),
                report String CODEC(ZSTD(3))
            ) ENGINE = MergeTree PARTITION BY toYYYYMMDD(arrival) ORDER BY (model, arrival, instance, request_id)
            TTL toDateTime(arrival) + INTERVAL {days} DAY {_settings()}""",
        "request_features": f"""
            CREATE TABLE IF NOT EXISTS {db}.request_features (
                {KEY_COLUMNS},
                model LowCardinality(String),
                arrival DateTime64(9, 'UTC'),
                mode UInt8,
                sae LowCardinality(String),
                features Array(UInt32) CODEC(Delta, ZSTD),
                scopes Array(UInt8) CODEC(ZSTD)
            ) ENGINE = MergeTree PARTITION BY toYYYYMMDD(arrival) ORDER BY (mode, rkey, sae)
            TTL toDateTime(arrival) + INTERVAL {days} DAY {_settings()}, index_granularity = 64,
            index_granularity_bytes = 0, min_compress_block_size = 8192, max_compress_block_size = 16384""",
        "feature_counts": f"""
            CREATE TABLE IF NOT EXISTS {db}.feature_counts (
                hour DateTime('UTC'),
                model LowCardinality(String),
                instance LowCardinality(String),
                mode UInt8,
                sae LowCardinality(String),
                feature UInt32,
                prompt UInt64,
                generated UInt64,
                either UInt64,
                pooled UInt64
            ) ENGINE = SummingMergeTree PARTITION BY toYYYYMMDD(hour)
            ORDER BY (mode, hour, model, instance, sae, feature) TTL hour + INTERVAL {days} DAY {_settings()}""",
        "request_labels": f"""
            CREATE TABLE IF NOT EXISTS {db}.request_labels (
                {KEY_COLUMNS},
                arrival DateTime64(9, 'UTC'),
                version Int64,
                labels Array(String)
            ) ENGINE = ReplacingMergeTree(version) ORDER BY rkey
            TTL toDateTime(arrival) + INTERVAL {days} DAY {_settings()}""",
        "label_feedback": f"""
            CREATE TABLE IF NOT EXISTS {db}.label_feedback (
                {KEY_COLUMNS},
                at DateTime64(9, 'UTC'),
                operation LowCardinality(String),
                label String,
                author String,
                note String
            ) ENGINE = MergeTree ORDER BY (instance, request_id, at)
            TTL toDateTime(at) + INTERVAL {days} DAY {_settings()}""",
        "token_codes": f"""
            CREATE TABLE IF NOT EXISTS {db}.token_codes (
                {KEY_COLUMNS},
                arrival DateTime64(9, 'UTC'),
                sae LowCardinality(String),
                position UInt32,
                features Array(UInt32) CODEC(ZSTD),
                activations Array(Float32) CODEC(ZSTD)
            ) ENGINE = MergeTree PARTITION BY toYYYYMMDD(arrival) ORDER BY (rkey, sae, position)
            TTL toDateTime(arrival) + INTERVAL {retention.token_codes_hours} HOUR {_settings()}""",
    }


def ttl_clauses(db: str, retention: Retention) -> dict[str, str]:
    """The TTL expression each table should have (what migrate compares and alters)."""
    days = retention.days
    return {
        "reports": f"toDateTime(arrival) + toIntervalDay({days})",
        "request_features": f"toDateTime(arrival) + toIntervalDay({days})",
        "feature_counts": f"hour + toIntervalDay({days})",
        "request_labels": f"toDateTime(arrival) + toIntervalDay({days})",
        "label_feedback": f"toDateTime(at) + toIntervalDay({days})",
        "token_codes": f"toDateTime(arrival) + toIntervalHour({retention.token_codes_hours})",
    }


def migrate(store, db: str, retention: Retention) -> list[str]:
    """Create what is missing and set every table's TTL to the configured retention; returns what changed.
    Idempotent, and safe from several sidecars at once (IF NOT EXISTS; an ALTER to the same TTL is a no-op)."""
    check_database(db)
    changes = []
    store.command(f"CREATE DATABASE IF NOT EXISTS {db}")
    existing = set(store.column(f"SELECT name FROM system.tables WHERE database = '{db}'"))
    for name, statement in tables(db, retention).items():
        if name not in existing:
            store.command(statement)
            changes.append(f"created {db}.{name}")
    engines = dict(
        zip(
            store.column(f"SELECT name FROM system.tables WHERE database = '{db}' ORDER BY name"),
            store.column(f"SELECT engine_full FROM system.tables WHERE database = '{db}' ORDER BY name"),
            strict=True,
        )
    )
    for name, ttl in ttl_clauses(db, retention).items():
        if f"TTL {ttl}" not in engines.get(name, ""):
            store.command(f"ALTER TABLE {db}.{name} MODIFY TTL {ttl}")
            changes.append(f"{db}.{name}: TTL {ttl}")
    versions = store.column(f"SELECT version FROM {db}.schema_version")
    if SCHEMA_VERSION not in versions:
        store.command(f"INSERT INTO {db}.schema_version VALUES ({SCHEMA_VERSION}, now64(9))")
        changes.append(f"{db}: schema version {SCHEMA_VERSION}")
    return changes
