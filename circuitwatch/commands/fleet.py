"""Reaching the fleet store from the command line: `--fleet STORE` on `identify` and `reports`, and
`circuitwatch fleet init`, which creates or migrates the store's tables (sidecars also do it at start)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .connection import UsageError


def add_store_options(parser: argparse.ArgumentParser, flag: str = "--fleet") -> None:
    group = parser.add_argument_group("fleet store")
    group.add_argument(
        flag, dest="fleet", metavar="STORE",
        help="the fleet store instead of a sidecar: http(s)://host:port of a ClickHouse server, or the embedded "
             "store's directory (embedded:<dir>, a sidecar's <evidence_dir>/fleet)",
    )  # fmt: skip
    group.add_argument("--fleet-database", default="circuitwatch", metavar="DB", help="default %(default)s")
    group.add_argument("--fleet-user", default="default", metavar="USER")
    group.add_argument("--fleet-password-file", type=Path, metavar="FILE")
    group.add_argument("--fleet-ca", type=Path, metavar="FILE", help="CA certificate of an https:// server")


def open_fleet(args: argparse.Namespace):
    from circuitwatch.sidecar.fleet.connection import open_store
    from circuitwatch.sidecar.fleet.schema import check_database

    try:
        check_database(args.fleet_database)
    except ValueError as exc:
        raise UsageError(f"--fleet-database: {exc}") from None

    password = ""
    if args.fleet_password_file is not None:
        try:
            password = args.fleet_password_file.read_text().strip()
        except OSError as exc:
            raise UsageError(
                f"--fleet-password-file {args.fleet_password_file}: cannot read ({exc.strerror})"
            ) from None
    server = {}
    if args.fleet.startswith(("http://", "https://")):
        server = {"username": args.fleet_user, "password": password, "ca_file": args.fleet_ca}
    return open_store(args.fleet, args.fleet_database, **server)


def add_fleet_parser(sub) -> None:
    parser = sub.add_parser("fleet", help="the fleet store (ClickHouse): create or migrate its tables")
    actions = parser.add_subparsers(dest="fleet_command", required=True)
    init = actions.add_parser("init", help="create the tables, or bring them to this version and retention")
    source = init.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="a sidecar configuration: its fleet section names the store")
    source.add_argument("--store", metavar="STORE", help="http(s)://host:port, or a directory (embedded)")
    init.add_argument("--database", default="circuitwatch")
    init.add_argument("--retention-days", type=int, default=30)
    init.add_argument("--token-codes-retention-hours", type=int, default=24)
    init.add_argument("--user", default="default")
    init.add_argument("--password-file", type=Path)
    init.add_argument("--ca", type=Path)


def run_fleet(args: argparse.Namespace) -> int:
    from circuitwatch.sidecar.fleet.delivery import retention_of, store_for
    from circuitwatch.sidecar.fleet.schema import Retention, migrate

    if args.config is not None:
        from circuitwatch.sidecar import ConfigError, load_config

        try:
            config = load_config(args.config)
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
        store, database, retention = (
            store_for(config.fleet, config.evidence_dir),
            config.fleet.database,
            retention_of(config.fleet),
        )
    else:
        namespace = argparse.Namespace(
            fleet=args.store,
            fleet_database=args.database,
            fleet_user=args.user,
            fleet_password_file=args.password_file,
            fleet_ca=args.ca,
        )
        store, database = open_fleet(namespace), args.database
        retention = Retention(args.retention_days, args.token_codes_retention_hours)
    with store.held():
        changes = migrate(store, database, retention)
    print(f"{store.description}: " + ("; ".join(changes) if changes else "up to date"))
    return 0
