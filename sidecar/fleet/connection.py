"""One interface over the two kinds of fleet store: a ClickHouse server (through clickhouse-connect, the
official client) and the embedded engine (chdb: ClickHouse in-process, its data in a local directory).

Both go through clickhouse-connect (its chdb backend for the embedded store), so the embedded store that the
tests use runs the same client calls, query parameters and insert settings as a server; only the transport
differs. chdb lets one process hold one data directory at a time, and one process hold a directory at all.
The embedded store therefore opens the engine only while it works (one flush, one query) under an exclusive
lock file, so several processes on one box (the sidecars of its GPUs, the `circuitwatch` command) share one
archive: each waits its turn. Opening and closing the engine costs 75 ms of CPU on a small store and 190 ms on a
1M-request one (0.6 s of wall time holding the lock), too much to pay every flush, so the delivery process's store
*lingers*: it keeps the engine and the lock between flushes until another process wants the store (a waiter
touches `.circuitwatch.wanted` beside the lock file while it waits) or it has been idle for `LINGER_S`; the
delivery looks at that every `WANTED_POLL_S` while it waits for work.

chdb-core-lite 26.5 (engine 26.5) deadlocks now and then in multi-threaded queries (every thread waiting, for
good): on a 1M-request store, 10 of 12 runs of up to a dozen contrasts hung once the engine had been idle for a
while or had been closed and opened again in the process; with one query thread, 0 of 8. Engine 26.9 (chdb-core
26.9, what the [fleet] extra installs) answered all 14 such runs with its own threads, and a contrast of 10k
requests against the other 990k takes 0.85-0.94 s there instead of 1.7-1.8 s on one thread. So queries keep the
engine's threads from 26.9 and run on one thread, with a warning, on an older engine (`query_settings_for`).
A ClickHouse server keeps its own settings (no server runs on these machines to test it).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
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
_PROCESS_SESSION = threading.RLock()  # chdb: one embedded session per process
FIRST_THREAD_SAFE_ENGINE = (26, 9)  # older embedded engines deadlock in multi-threaded queries: see the module doc
ONE_THREAD = {"max_threads": 1}
LINGER_S = 30.0  # a lingering embedded store idle this long lets the engine go (its memory too)
WANTED_POLL_S = 0.1  # how often a lingering holder looks for a waiter; a waiter touches the marker as often
WANTED_FRESH_S = 1.0  # a marker older than this is a waiter that gave up (or died)
LOCK_FILE, WANTED_MARKER = ".circuitwatch.lock", ".circuitwatch.wanted"  # in the store's directory


class StoreUnavailableError(RuntimeError):
    """The store cannot be reached or refused the call; the message says which store and why."""


class FleetStore(Protocol):
    description: str

    def command(self, sql: str, params: dict[str, Any] | None = None) -> None: ...

    def query(self, sql: str, params: dict[str, Any] | None = None): ...  # -> pyarrow.Table

    def column(self, sql: str, params: dict[str, Any] | None = None) -> list: ...

    def insert_file(self, table: str, path: Path, token: str) -> None: ...

    def held(self, wait_s: float | None = None) -> contextlib.AbstractContextManager: ...

    def let_go_if_wanted(self) -> None: ...

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


def open_store(
    target: str, database: str, lock_timeout_s: float = 60.0, linger: bool = False, **server: Any
) -> FleetStore:
    """`http(s)://host:port` -> a ClickHouse server; `embedded:<dir>` or a directory -> the embedded engine
    (waiting up to lock_timeout_s for another process to let go of it; lingering between scopes if `linger`)."""
    if target.startswith(("http://", "https://")):
        return ClickHouseStore(ServerOptions(url=target, database=database, **server))
    path = target.removeprefix(EMBEDDED_PREFIX)
    if not path:
        raise StoreUnavailableError("fleet store: give http(s)://host:port or a directory (embedded:<dir>)")
    return EmbeddedStore(Path(path), lock_timeout_s, linger=linger)


class ClickHouseStore:
    """The fleet store through clickhouse-connect: a ClickHouse server over HTTP(S), or (EmbeddedStore) its
    chdb backend, so both run the same client calls, parameters and insert settings."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.description = f"ClickHouse at {options.url}"
        self.opens = 0  # connections made (for the embedded store: engine starts)
        self._client = None
        self._lock = threading.RLock()

    def _connect(self):
        o = self.options
        scheme, _, rest = o.url.rstrip("/").partition("://")
        host, _, port = rest.rpartition(":") if ":" in rest else (rest, "", "")
        return _client(
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

    def _call(self, what: str, call):
        with self.held():
            try:
                if self._client is None:
                    self._client = self._connect()
                    self.opens += 1
                return call(self._client)
            except StoreUnavailableError:
                raise
            except Exception as exc:
                self._drop_client()
                raise StoreUnavailableError(f"{self.description}: {what} failed ({_first_line(exc)})") from None

    def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    def command(self, sql: str, params: dict[str, Any] | None = None) -> None:
        self._call("command", lambda c: c.command(sql, parameters=params))

    def query(self, sql: str, params: dict[str, Any] | None = None):
        return self._call(
            "query",
            lambda c: c.query_arrow(sql, parameters=params, use_strings=True, settings=self._query_settings()),
        )

    def _query_settings(self) -> dict[str, Any] | None:
        return None

    def column(self, sql: str, params: dict[str, Any] | None = None) -> list:
        return self.query(sql, params).column(0).to_pylist()

    def insert_file(self, table: str, path: Path, token: str) -> None:
        """Insert one spooled Arrow file; `token` makes a repeated insert of it a no-op."""
        arrow = read_arrow(path)
        settings = {**INSERT_SETTINGS, "insert_deduplication_token": token}
        self._call(f"insert into {table}", lambda c: c.insert_arrow(table, arrow, settings=settings))

    @contextlib.contextmanager
    def held(self, wait_s: float | None = None) -> Iterator[None]:
        """Several calls in one scope (a server is shared by design: nothing to wait for beyond this process)."""
        with self._lock:
            yield

    def let_go_if_wanted(self) -> None:
        """Nothing to let go: a server is shared by its own means."""

    def close(self) -> None:
        self._drop_client()


class EmbeddedStore(ClickHouseStore):
    """The chdb backend over one directory, shared by the processes of one box through a lock file (see the
    module doc): the engine is opened for a held() scope and closed after it, or, lingering, when another process
    wants the store or it idled for linger_s."""

    def __init__(
        self, directory: Path, lock_timeout_s: float = 60.0, linger: bool = False, linger_s: float = LINGER_S
    ) -> None:
        super().__init__(ServerOptions(url=f"{EMBEDDED_PREFIX}{directory}", database=""))
        self.directory = directory
        self.description = f"embedded store in {directory}"
        self.lock_timeout_s = lock_timeout_s
        self.linger, self.linger_s = linger, linger_s
        self._depth = 0
        self._lock_file = None
        self._idle_since = 0.0
        self._wanted_marker = directory / WANTED_MARKER
        self._settings: dict[str, Any] | None = None  # set at the first open, from the engine's version

    def _connect(self):
        client = _client(interface="chdb", path=str(self.directory / "data"))
        if self._settings is None:
            import chdb

            self._settings = query_settings_for(chdb.engine_version, self.description)
        return client

    def _query_settings(self) -> dict[str, Any] | None:
        return self._settings

    @contextlib.contextmanager
    def held(self, wait_s: float | None = None) -> Iterator[None]:
        """Hold the directory (and this process's one chdb engine) for several calls, waiting up to wait_s
        (default: lock_timeout_s) for another process to let go of it."""
        with _PROCESS_SESSION:
            if self._depth == 0 and self._lock_file is None:
                wait_s = self.lock_timeout_s if wait_s is None else wait_s
                self._lock_file = lock_directory(self.directory, wait_s, self.description)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self._idle_since = time.monotonic()
                    if not self.linger or self._wanted():
                        self._release()

    def let_go_if_wanted(self) -> None:
        """Close a lingering engine and unlock the directory if another process waits for it or it idled for
        linger_s; call it while waiting for work (a held() scope in progress is never cut short)."""
        with _PROCESS_SESSION:
            idle = time.monotonic() - self._idle_since > self.linger_s
            if self._depth == 0 and self._lock_file is not None and (idle or self._wanted()):
                self._release()

    def _wanted(self) -> bool:
        try:
            return time.time() - self._wanted_marker.stat().st_mtime < WANTED_FRESH_S
        except FileNotFoundError:
            return False

    def _release(self) -> None:
        try:
            self._drop_client()  # the engine lets go of the directory
        finally:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def close(self) -> None:
        with _PROCESS_SESSION:
            if self._depth == 0 and self._lock_file is not None:
                self._release()
            else:
                self._drop_client()


def lock_directory(directory: Path, wait_s: float, description: str):
    """Take an embedded store's lock file (returned open: closing it unlocks), waiting up to wait_s for another
    process to let go; while waiting, mark that this process wants it, so that a lingering holder lets go."""
    directory.mkdir(parents=True, exist_ok=True)
    lock_file = open(directory / LOCK_FILE, "a+")  # noqa: SIM115 (held across calls)
    wanted = directory / WANTED_MARKER
    deadline = time.monotonic() + wait_s
    marked = 0.0
    while True:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                lock_file.close()
                raise StoreUnavailableError(f"{description}: another process held it for over {wait_s:.0f}s") from None
            if time.monotonic() - marked >= WANTED_POLL_S:
                wanted.touch()
                marked = time.monotonic()
            time.sleep(0.02)
    if marked:  # other waiters touch it again within WANTED_POLL_S
        wanted.unlink(missing_ok=True)
    return lock_file


@contextlib.contextmanager
def directory_locked(directory: Path, wait_s: float = 60.0) -> Iterator[None]:
    """Hold an embedded store's lock without opening its engine: what another process using the store does to
    the sidecars on the box (their deliveries spool meanwhile). For tests, benches and maintenance."""
    lock_file = lock_directory(directory, wait_s, f"embedded store in {directory}")
    try:
        yield
    finally:
        lock_file.close()


def query_settings_for(engine_version: str, description: str) -> dict[str, Any]:
    """The settings every query of an embedded engine of this version runs with: none of its own from 26.9 on,
    one thread before (with a warning that says why and what to install)."""
    numbers = tuple(int(part) for part in engine_version.split(".")[:2] if part.isdigit())
    if numbers >= FIRST_THREAD_SAFE_ENGINE:
        return {}
    log.warning(
        "%s: chdb engine %s deadlocks now and then in multi-threaded queries, so they run on one thread (slower); "
        "pip install 'chdb-core>=26.9' (the [fleet] extra) to give them their threads back",
        description,
        engine_version,
    )
    return dict(ONE_THREAD)


def _client(**kwargs):
    try:
        import clickhouse_connect
    except ImportError:
        raise StoreUnavailableError(_missing("clickhouse-connect")) from None
    if kwargs.get("interface") == "chdb":
        try:
            import chdb  # noqa: F401
        except ImportError:
            raise StoreUnavailableError(_missing("chdb-core")) from None
    return clickhouse_connect.get_client(**kwargs)


def read_arrow(path: Path):
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all()


def _missing(package: str) -> str:
    return f"the fleet store needs {package}: pip install 'circuitwatch[fleet]'"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__
