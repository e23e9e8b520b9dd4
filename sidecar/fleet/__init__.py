"""Fleet evidence: every sidecar exports its finished requests to one ClickHouse store (or, with no server
configured, to chdb, the ClickHouse engine in-process), where contrasts and report listings run over all
replicas at once.

    schema.py      the tables, their TTLs and ORDER BYs, created and migrated by `circuitwatch fleet init` or
                   at sidecar start
    connection.py  one interface over a ClickHouse server (clickhouse-connect) and the embedded engine (chdb)
    rows.py        finished requests as Arrow tables: reports, feature sets, labels, feedback, token codes
    spool.py       the bounded, ordered directory of batches not yet in the store
    exporter.py    the sidecar's background exporter: queue -> batch -> spool -> idempotent insert
    queries.py     fleet contrast (identify.contrast_over on SQL counts) and fleet report listings
"""
