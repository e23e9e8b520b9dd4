"""One interface over the two kinds of fleet store: a ClickHouse server (through clickhouse-connect, the
official client) and the embedded engine (chdb: ClickHouse in-process, its data in a local directory).

chdb lets one process hold one data directory at a time, and one process hold a directory at all. The
embedded store therefore opens its session only while it works (one flush, one query) under an exclusive
lock file, so several processes on one box (the sidecars of its GPUs, the `circuitwatch` command) share one
archive: each waits its turn. Opening costs tens of milliseconds, which the exporter pays once a flush.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
INSERT_SETTINGS = {
    "insert_deduplicate": 1,
    "deduplicate_blocks_in_dependent_materialized_views": 1,
}
_TOKEN = re.compile(r"[A-Za-z0-9._-]{1,200}")
_PROCESS_SESSION = threading.RLock()  # chdb: one embedded session per process


class StoreUnavailableError(RuntimeError):
    """The store cannot be reached or refused the call; the message says which store and why."""


class FleetStore(Protocol):
    description: str

    def command(self, sql: str, params: dict[str, Any] | None = None) -> None: ...

    def query(self, sql: str, params: dict[str, Any] | None = None): ...  # -> pyarrow.Table

    def column(self, sql: str, params: dict[str, Any] | None = None) -> list: ...

    def insert_file(self, table: str, path: Path, token: str) -> None: ...

    def held(self) -> contextlib.AbstractContextManager: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ServerOptions:
    url: str
    database: str
    username: str = "default"
    password: str = ""
    ca_file: Path | None = None
    verify: bool = True
    cert_file: Path | None = None
    key_file: Path | None = None
    timeout_s: float = 30.0


def open_store(target: str, database: str, lock_timeout_s: float = 60.0, **server: Any) -> FleetStore:
    """`http(s)://host:port` -> a ClickHouse server; `embedded:<dir>` or a directory -> the embedded engine
    (waiting up to lock_timeout_s for another process to let go of it)."""
    if target.startswith(("http://", "https://")):
        return ServerStore(ServerOptions(url=target, database=database, **server))
    path = target.removeprefix(EMBEDDED_PREFIX)
    if not path:
        raise StoreUnavailableError("fleet store: give http(s)://host:port or a directory (embedded:<dir>)")
    return EmbeddedStore(Path(path), lock_timeout_s)


class ServerStore:
    """A ClickHouse server over HTTP(S). The client connects lazily and reconnects after a failure."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.description = f"ClickHouse at {options.url}"
        self._client = None
        self._lock = threading.Lock()

    def _connect(self):
        if self._client is None:
            try:
                import clickhouse_connect
            except ImportError:
                raise StoreUnavailableError(_missing("clickhouse-connect")) from None
            o = self.options
            scheme, _, rest = o.url.rstrip("/").partition("://")
            host, _, port = rest.rpartition(":") if ":" in rest else (rest, "", "")
            try:
                self._client = clickhouse_connect.get_client(
                    host=host,
                    port=int(port) if port else (8443 if scheme == "https" else 8123),
                    username=o.username,
                    password=o.password,
                    secure=scheme == "https",
                    verify=o.verify,
                    ca_cert=str(o.ca_file) if o.ca_file else None,
                    client_cert=str(o.cert_file) if o.cert_file else None,
                    client_cert_key=str(o.key_file) if o.key_file else None,
                    connect_timeout=min(o.timeout_s, 10),
                    send_receive_timeout=o.timeout_s,
                    autogenerate_session_id=False,
                )
            except Exception as exc:
                raise StoreUnavailableError(f"{self.description}: cannot connect ({exc})") from None
        return self._client

    def _call(self, what: str, call):
        with self._lock:
            client = self._connect()
            try:
                return call(client)
            except Exception as exc:
                self._client = None
                raise StoreUnavailableError(f"{self.description}: {what} failed ({_first_line(exc)})") from None

    def command(self, sql: str, params: dict[str, Any] | None = None) -> None:
        self._call("command", lambda c: c.command(sql, parameters=params))

    def query(self, sql: str, params: dict[str, Any] | None = None):
        return self._call("query", lambda c: c.query_arrow(sql, parameters=params, use_strings=True))

    def column(self, sql: str, params: dict[str, Any] | None = None) -> list:
        return self.query(sql, params).column(0).to_pylist()

    def insert_file(self, table: str, path: Path, token: str) -> None:
        arrow = read_arrow(path)
        settings = {**INSERT_SETTINGS, "insert_deduplication_token": token}
        self._call(
            f"insert into {table}",
            lambda c: c.insert_arrow(f"{self.options.database}.{table}", arrow, settings=settings),
        )

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        yield

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


class EmbeddedStore:
    """chdb over one directory, shared by the processes of one box through a lock file (see the module doc)."""

    def __init__(self, directory: Path, lock_timeout_s: float = 60.0) -> None:
        self.directory = directory
        self.description = f"embedded store in {directory}"
        self.lock_timeout_s = lock_timeout_s
        self._session = None
        self._depth = 0
        self._lock_file = None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold the directory (and this process's one chdb session) for several calls."""
        with _PROCESS_SESSION:
            if self._depth == 0:
                self._open()
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self._close_session()

    def _open(self) -> None:
        try:
            from chdb import session
        except ImportError:
            raise StoreUnavailableError(_missing("chdb-core-lite")) from None
        self.directory.mkdir(parents=True, exist_ok=True)
        lock_file = open(self.directory / ".circuitwatch.lock", "a+")  # noqa: SIM115 (held across calls)
        deadline = time.monotonic() + self.lock_timeout_s
        while True:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    lock_file.close()
                    raise StoreUnavailableError(
                        f"{self.description}: another process held it for over {self.lock_timeout_s:.0f}s"
                    ) from None
                time.sleep(0.02)
        try:
            self._session = session.Session(str(self.directory / "data"))
        except Exception as exc:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
            lock_file.close()
            raise StoreUnavailableError(f"{self.description}: cannot open ({_first_line(exc)})") from None
        self._lock_file = lock_file

    def _close_session(self) -> None:
        try:
            if self._session is not None:
                self._session.close()
        finally:
            self._session = None
            if self._lock_file is not None:
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
                self._lock_file.close()
                self._lock_file = None

    def _run(self, sql: str, fmt: str, params: dict[str, Any] | None):
        with self.held():
            try:
                return self._session.query(sql, fmt, params={k: param_text(v) for k, v in (params or {}).items()})
            except Exception as exc:
                raise StoreUnavailableError(f"{self.description}: {_first_line(exc)}") from None

    def command(self, sql: str, params: dict[str, Any] | None = None) -> None:
        self._run(sql, "CSV", params)

    def query(self, sql: str, params: dict[str, Any] | None = None):
        import pyarrow as pa

        # the Arrow file format as bytes, read here: chdb's own ArrowTable conversion costs ~25 ms a query
        return pa.ipc.open_file(pa.BufferReader(self._run(sql, "Arrow", params).bytes())).read_all()

    def column(self, sql: str, params: dict[str, Any] | None = None) -> list:
        return self.query(sql, params).column(0).to_pylist()

    def insert_file(self, table: str, path: Path, token: str) -> None:
        if not _TOKEN.fullmatch(token):  # SETTINGS take no query parameters: the token goes in as a literal
            raise ValueError(f"deduplication token {token!r}: expected letters, digits, '.', '_' and '-' only")
        names = ", ".join(read_arrow(path).schema.names)
        settings = ", ".join(f"{k} = {v}" for k, v in INSERT_SETTINGS.items())
        self.command(
            f"INSERT INTO {table} ({names}) SETTINGS insert_deduplication_token = '{token}', {settings} "
            f"SELECT {names} FROM file({{path:String}}, 'Arrow')",
            {"path": str(path.resolve())},
        )

    def close(self) -> None:
        pass


def param_text(value: Any, nested: bool = False) -> str:
    """A query parameter in ClickHouse's text form, as the HTTP interface takes it (chdb passes strings on
    as they are): arrays as literals with quoted, escaped strings; a top-level string escaped."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(param_text(v, nested=True) for v in value) + "]"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
        return "'" + escaped.replace("'", "\\'") + "'" if nested else escaped
    return str(value)


def read_arrow(path: Path):
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all()


def _missing(package: str) -> str:
    return f"the fleet store needs {package}: pip install 'circuitwatch[fleet]'"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__
