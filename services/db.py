"""The database: the connection pool's lifecycle, the schema step and the four statements.

Each API operation is one atomic statement, so concurrent requests cannot race between
a check and a write; a write's statement runs in a transaction committed only while its
request still waits (see :func:`_committed`).  The pool is created in the background with
backoff, so the service starts (and answers 503) before PostgreSQL exists.  Every failure
to reach the database surfaces as :class:`DatabaseUnavailable`; a pool that is full
surfaces as :class:`DatabaseBusy`: both become 503, never 500 and never a hang.  A COMMIT
the database did not confirm surfaces as :class:`WriteOutcomeUnknown`: 504.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from common.net import is_ip_address, tcp_addresses
from services.config import Config
from services.pool import Pool, PoolClosing, PoolTimeout

log = logging.getLogger("services.db")

# pg_advisory_xact_lock key for the schema step: replicas starting together apply it one
# at a time (concurrent CREATE TABLE IF NOT EXISTS collides on pg_type's unique index).
SCHEMA_LOCK_KEY = 0x7661_7273_7461_636B  # "varstack"

SQL_SET = (
    "INSERT INTO public.variables (key, value) VALUES ($1, $2) "
    "ON CONFLICT (key) DO NOTHING RETURNING true"
)
SQL_GET = "SELECT value FROM public.variables WHERE key = $1"
SQL_GET_MANY = "SELECT key, value FROM public.variables WHERE key = ANY($1::text[])"
SQL_EDIT = "UPDATE public.variables SET value = $2 WHERE key = $1 RETURNING true"
SQL_DELETE = "DELETE FROM public.variables WHERE key = $1 RETURNING true"
SQL_PING = "SELECT 1"
SQL_BEGIN = "BEGIN"
SQL_COMMIT = "COMMIT"
SQL_ROLLBACK = "ROLLBACK"

# What "the database cannot be reached right now" looks like from asyncpg: refused or
# dropped sockets, the server shutting down or starting up, no connection slot left, and a
# connection whose protocol state the server broke (during a fast shutdown, a termination
# message can arrive as a statement starts: "cannot switch to state ...").
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,
)


class DatabaseUnavailable(Exception):
    """PostgreSQL cannot be reached (down, restarting, not yet started)."""


#: How long after ``SERVICE_DB_COMMAND_TIMEOUT`` the client gives up on a database that has not
#: answered (the server's own cancel would have arrived by then).
STATEMENT_TIMEOUT_BACKSTOP = 0.5

#: A write's COMMIT is sent only with this much of its time left (see :func:`_committed`).
COMMIT_MIN_TIME = 0.1

#: How long PostgreSQL lets a write's transaction wait for its COMMIT, which the replica sends
#: as soon as the statement answered. Longer means the replica stalled or was cut off, and the
#: row lock the transaction holds blocks every other replica's write to that key.
IDLE_IN_TRANSACTION_TIMEOUT = 1.0


class DatabaseBusy(Exception):
    """Every connection is in use and too many requests already wait for one."""


class WriteOutcomeUnknown(Exception):
    """A write's COMMIT was sent and the database did not confirm it in time: the write may or
    may not have been applied."""


T = TypeVar("T")

#: With addresses from an earlier lookup of PGSQL_HOST, how long a new connection waits for a
#: fresh lookup before it uses them.
LOOKUP_GRACE = 0.25

#: GETs in one batch at most (one statement): a batch this full lets the next GET open another.
GET_BATCH_MAX_KEYS = 64


class _GetBatch:
    """The GETs of one batch: each key with the future its request awaits."""

    __slots__ = ("closed", "members")

    def __init__(self) -> None:
        self.members: list[tuple[str, asyncio.Future[str | None]]] = []
        self.closed = False


class BatchedReadFailed(Exception):
    """A batched read failed for a reason of its own (its ``__cause__``): answered 500."""


def _for_one_request(exc: BaseException) -> Exception:
    """What one member of a failed batch raises: an exception of its own, since each request
    raises it (and its traceback grows) in its own task."""
    own: Exception
    if isinstance(exc, DatabaseBusy | DatabaseUnavailable):
        own = type(exc)(*exc.args)
        own.__cause__ = exc.__cause__
    elif isinstance(exc, Exception):
        own = BatchedReadFailed(f"the batched read failed: {describe(exc)}")
        own.__cause__ = exc
    else:  # the batch was cancelled: only closing the database does that
        own = DatabaseUnavailable("the service is shutting down")
    return own


def schema_sql() -> str:
    """The schema script: shipped in the wheel, or read from the checkout's ``sql/``."""
    shipped = resources.files("services").joinpath("schema.sql")
    if shipped.is_file():
        return shipped.read_text(encoding="utf-8")
    return (Path(__file__).resolve().parent.parent / "sql" / "schema.sql").read_text(
        encoding="utf-8"
    )


def describe(exc: BaseException) -> str:
    """A one-line reason for logs and 503 bodies (never contains the password)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, TimeoutError):
        text = text or "timed out"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class NameLookupError(OSError):
    """``PGSQL_HOST`` did not resolve: the database itself may be fine."""


async def resolve_host(host: str, port: int, *, timeout: float) -> list[str]:
    """The addresses of ``host``, looked up here rather than inside asyncpg's connect.

    Under uvloop, a connect given a host name and cancelled during the lookup (by its own
    timeout, or the health check's) leaves the lookup's future behind, and a failed lookup
    then logs "Future exception was never retrieved" (MagicStack/uvloop#437). A lookup of
    its own cancels cleanly, and its failure names the host. IP addresses and socket
    directories are returned as they are, and so is the name when ``PGSSLMODE=verify-full``
    must check the server's certificate against it.
    """
    if host.startswith("/") or is_ip_address(host) or os.environ.get("PGSSLMODE") == "verify-full":
        return [host]
    try:
        async with asyncio.timeout(timeout):
            addresses = await tcp_addresses(host, port)
    except TimeoutError:
        raise NameLookupError(f"no answer looking up {host} within {timeout:g}s") from None
    except OSError as exc:
        raise NameLookupError(f"cannot resolve {host}: {exc.strerror or exc}") from None
    if not addresses:
        raise NameLookupError(f"{host} resolves to no address")
    return addresses


async def _committed(conn: asyncpg.Connection, budget: float, sql: str, *args: Any) -> Any:
    """``sql``'s value, in a transaction committed only while the request still waits for it.

    A statement sent on its own commits when the server gets to it. The server may get to it
    after the client gave up on a database that stopped answering (frozen, cut off): the
    request was answered 503, and its write would be applied later all the same. Here the
    COMMIT is sent only once the statement answered within ``budget`` seconds; a client that
    gives up before drops the connection, and the server rolls the transaction back. Only a
    COMMIT sent and not confirmed within the budget leaves the outcome unknown, and says so.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget

    def left() -> float:
        return max(deadline - loop.time(), 0.001)

    await conn.execute(SQL_BEGIN, timeout=left())
    try:
        value = await conn.fetchval(sql, *args, timeout=left())
    except asyncpg.PostgresError as exc:
        # The statement's own error (a missing table): end the failed transaction, so that
        # the connection can serve again. After one of CONNECTION_ERRORS (statement_timeout
        # is one) the connection is dropped instead.
        if not isinstance(exc, CONNECTION_ERRORS):
            await conn.execute(SQL_ROLLBACK, timeout=left())
        raise
    if deadline - loop.time() < COMMIT_MIN_TIME or conn.is_closed():
        # A COMMIT this late would most likely be applied and still answered "unknown"; a
        # connection the server closed (its idle_in_transaction_session_timeout, after a
        # stall here) was rolled back. Either way, no COMMIT: a definite 503.
        raise TimeoutError("no time left to commit")
    try:
        await conn.execute(SQL_COMMIT, timeout=left())
    except Exception as exc:
        # A broken connection or a late answer may follow a commit that happened. (An error
        # PostgreSQL answers itself means it did not; too rare here to answer apart.)
        raise WriteOutcomeUnknown(
            f"the database did not confirm the commit: {describe(exc)}"
        ) from exc
    return value


async def _apply_schema_on(conn: asyncpg.Connection) -> None:
    """The schema script, one replica at a time (replicas start together)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK_KEY)
        await conn.execute(schema_sql())


class Database:
    """Owns the pool: ``start()`` begins connecting, ``close()`` ends it.

    ``on_error`` is called with a short kind for every database error a request meets
    (for metrics).
    """

    def __init__(
        self, config: Config, *, on_error: Callable[[str], None] | None = None
    ) -> None:
        self._config = config
        self._pool: Pool | None = None
        self._connector: asyncio.Task[None] | None = None
        self._in_flight = 0
        self._open_batch: _GetBatch | None = None
        self._reads = asyncio.Semaphore(config.read_concurrency)
        self._read_batches = 0
        self._reads_waiting = 0
        self._batched_reads = 0
        self._batch_tasks: set[asyncio.Task[None]] = set()
        # /healthcheck's own connection: a full pool is a busy replica, not a dead database,
        # and must not make a balancer take every replica out under load.
        self._health_conn: asyncpg.Connection | None = None
        self._health_lock = asyncio.Lock()
        self._lookup: asyncio.Future[list[str]] | None = None
        self._known_addresses: list[str] | None = None
        self._on_error = on_error or (lambda kind: None)
        self.last_error = "not connected yet"
        self.ready = asyncio.Event()

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        """Start connecting in the background; requests get 503 until it succeeds."""
        if self._connector is None:
            self._connector = asyncio.create_task(self._connect_until_ready(), name="db-connect")

    async def _connect_until_ready(self) -> None:
        cfg = self._config
        delay = 0.1
        attempt = 0
        started = time.monotonic()
        while True:
            attempt += 1
            try:
                pool = await self._create_pool()
            except (*CONNECTION_ERRORS, TimeoutError, asyncpg.PostgresError) as exc:
                self.last_error = describe(exc)
                pause = delay * random.uniform(0.5, 1.0)
                log.warning(
                    "database %s:%s not ready (attempt %d): %s; retrying in %.1fs",
                    cfg.pg_host, cfg.pg_port, attempt, self.last_error, pause,
                )
                await asyncio.sleep(pause)
                delay = min(delay * 2, cfg.db_retry_max_delay)
                continue
            self._pool = pool
            self.last_error = ""
            self.ready.set()
            log.info(
                "database %s:%s/%s ready after %d attempt(s), %.1fs",
                cfg.pg_host, cfg.pg_port, cfg.pg_dbname, attempt, time.monotonic() - started,
            )
            return

    async def _addresses(self) -> list[str]:
        """``PGSQL_HOST``'s addresses, looked up once at a time.

        Each new connection starts a lookup unless one is under way. Once a lookup has
        answered, a new connection waits at most ``LOOKUP_GRACE`` for a fresh answer, then
        uses the last one: a resolver that stalls (podman's aardvark-dns while it reloads)
        neither holds connections up nor piles up lookups. (Each lookup keeps one of the
        loop's few resolver threads until the resolver gives up, even after its caller did: in
        an e2e run, health checks that each started one kept a replica's /healthcheck timing
        out for over 45 s after a reload.)
        """
        cfg = self._config
        lookup = self._lookup
        if lookup is None:
            lookup = self._lookup = asyncio.ensure_future(
                resolve_host(cfg.pg_host, cfg.pg_port, timeout=cfg.db_connect_timeout)
            )
            lookup.add_done_callback(self._looked_up)
        known = self._known_addresses
        if known is None:
            return await asyncio.shield(lookup)
        try:
            async with asyncio.timeout(LOOKUP_GRACE):
                return await asyncio.shield(lookup)
        except (TimeoutError, NameLookupError):
            return known

    def _looked_up(self, lookup: asyncio.Future[list[str]]) -> None:
        self._lookup = None
        if not lookup.cancelled() and lookup.exception() is None:
            self._known_addresses = lookup.result()

    async def _open_connection(self) -> asyncpg.Connection:
        """A new connection, within ``db_connect_timeout`` for the name lookup and the connect."""
        cfg = self._config
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.db_connect_timeout
        hosts = await self._addresses()
        return await asyncpg.connect(
            host=hosts,
            port=cfg.pg_port,
            user=cfg.pg_user,
            password=cfg.pg_password,
            database=cfg.pg_dbname,
            # The client's own timeout only backs up the server's: it fires when the database
            # does not answer at all (stopped, cut off).
            command_timeout=cfg.db_command_timeout + STATEMENT_TIMEOUT_BACKSTOP,
            timeout=max(deadline - loop.time(), 0.001),
            server_settings={
                "application_name": "varstack-service",
                # PostgreSQL cancels a statement over the timeout itself, and rolls it back.
                # A client that only gives up and drops the connection leaves the statement
                # running: one waiting on a lock would still write after its 503.
                "statement_timeout": f"{max(1, round(cfg.db_command_timeout * 1000))}ms",
                # A write's transaction that its replica stopped driving (a stall, a cut
                # network: no end of the connection arrives) would otherwise hold its row
                # lock until TCP gives up, hours later.
                "idle_in_transaction_session_timeout":
                    f"{round(IDLE_IN_TRANSACTION_TIMEOUT * 1000)}ms",
            },
        )

    async def _create_pool(self) -> Pool:
        cfg = self._config
        pool = Pool(self._open_connection, min_size=cfg.pool_min_size, max_size=cfg.pool_max_size)
        try:
            await pool.start()
            async with asyncio.timeout(cfg.db_connect_timeout + cfg.db_command_timeout):
                await self._apply_schema(pool)
        except BaseException:
            pool.terminate()
            raise
        return pool

    @staticmethod
    async def _apply_schema(pool: Pool) -> None:
        conn = await pool.acquire()
        try:
            await _apply_schema_on(conn)
        finally:
            pool.release(conn)

    async def close(self, timeout: float = 5.0) -> None:
        """Stop connecting and close the pool; after ``timeout`` terminate what remains."""
        if self._connector is not None:
            self._connector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connector
            self._connector = None
        lookup = self._lookup
        if lookup is not None:
            lookup.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await lookup
        if self._health_conn is not None:
            self._health_conn.terminate()
            self._health_conn = None
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close(timeout)
        # A batch still running after the pool closed is one whose connection just failed.
        batches = list(self._batch_tasks)
        for task in batches:
            task.cancel()
        await asyncio.gather(*batches, return_exceptions=True)

    # -- state ------------------------------------------------------------------

    def pool_stats(self) -> tuple[int, int]:
        """(connections open, connections in use)."""
        pool = self._pool
        if pool is None:
            return 0, 0
        return pool.size, pool.in_use

    def read_batch_stats(self) -> tuple[int, int, int]:
        """(batched statements run, GETs they answered, GETs in batches still waiting)."""
        return self._read_batches, self._batched_reads, self._reads_waiting

    # -- statements -------------------------------------------------------------

    def _admit(self) -> Pool:
        """The pool, for one more request; or why the request cannot have it."""
        pool = self._pool
        if pool is None:
            self._on_error("unavailable")
            raise DatabaseUnavailable(self.last_error or "not connected yet")
        cfg = self._config
        if self._in_flight >= cfg.pool_max_size + cfg.max_waiting:
            self._on_error("busy")
            raise DatabaseBusy(f"{self._in_flight} requests already use or wait for the database")
        return pool

    async def _write(self, sql: str, *args: Any) -> Any:
        pool = self._admit()
        self._in_flight += 1
        budget = self._config.db_command_timeout + STATEMENT_TIMEOUT_BACKSTOP
        try:
            return await self._run(pool, lambda conn: _committed(conn, budget, sql, *args))
        finally:
            self._in_flight -= 1

    async def _run(
        self,
        pool: Pool,
        statement: Callable[[asyncpg.Connection], Awaitable[T]],
        *,
        on_error: Callable[[str], None] | None = None,
        acquire_timeout: float | None = None,
    ) -> T:
        """``statement`` on a lent connection, its failures as DatabaseBusy/Unavailable (or a
        write's WriteOutcomeUnknown), each counted with ``on_error`` (by default, the one of
        the Database)."""
        cfg = self._config
        error = on_error or self._on_error
        if acquire_timeout is None:
            acquire_timeout = cfg.pool_acquire_timeout
        try:
            try:
                conn = await pool.acquire(timeout=acquire_timeout)
            except PoolTimeout:
                error("busy")
                # A batch's whole wait, its turn included, was the acquire timeout.
                raise DatabaseBusy(
                    f"no connection free within {cfg.pool_acquire_timeout:g}s"
                ) from None
            except PoolClosing as exc:
                error("unavailable")
                raise DatabaseUnavailable(str(exc)) from None
            except (*CONNECTION_ERRORS, TimeoutError, asyncpg.PostgresError) as exc:
                # Opening a connection failed: any refusal of the server's counts.
                raise self._connection_lost(pool, exc, error) from exc
            # Only a statement's own error (a constraint, a missing table, the server's
            # statement_timeout) leaves the connection sound. The client's timeout, a
            # cancellation or a broken protocol state cannot be trusted: a timed-out connection
            # handed back would also wait for the cancel request, which a hung database answers
            # no sooner than the statement.
            discard = True
            try:
                try:
                    value = await statement(conn)
                except asyncpg.UndefinedTableError:
                    # The table is gone: a new, empty database at the same address (recreated
                    # without its volume, restored from nothing). Make it again, once, rather
                    # than answer 500 to every request while /healthcheck says healthy.
                    log.warning("the table public.variables is missing (a new, empty database?):"
                                " applying the schema again")
                    await _apply_schema_on(conn)
                    value = await statement(conn)
                discard = False
                return value
            except asyncpg.PostgresError as exc:
                discard = isinstance(exc, CONNECTION_ERRORS)
                raise
            finally:
                pool.release(conn, discard=discard)
        except (DatabaseBusy, DatabaseUnavailable, asyncio.CancelledError):
            raise
        except WriteOutcomeUnknown as exc:
            error("outcome_unknown")
            cause = exc.__cause__
            if isinstance(cause, CONNECTION_ERRORS) and not isinstance(
                cause, asyncpg.QueryCanceledError
            ):
                self._lost(pool, cause)
            raise
        except (TimeoutError, asyncpg.QueryCanceledError) as exc:
            error("timeout")
            raise DatabaseUnavailable(
                f"statement took over {cfg.db_command_timeout:g}s"
            ) from exc
        except CONNECTION_ERRORS as exc:
            raise self._connection_lost(pool, exc, error) from exc

    def _connection_lost(
        self, pool: Pool, exc: BaseException, error: Callable[[str], None]
    ) -> DatabaseUnavailable:
        error("connection")
        self._lost(pool, exc)
        return DatabaseUnavailable(self.last_error)

    def _lost(self, pool: Pool, exc: BaseException) -> None:
        self.last_error = describe(exc)
        # One broken connection means the server went away: the idle ones are broken too,
        # and each would fail one more request before being noticed. A name that did not
        # resolve says nothing about the server: the open connections still work.
        if not isinstance(exc, NameLookupError):
            pool.expire()

    # -- batched reads ----------------------------------------------------------

    async def _get_batched(self, pool: Pool, key: str) -> str | None:
        """``key``'s value, read together with the other GETs that wait.

        At most ``read_concurrency`` GET statements run at once (each one costs the replica
        and PostgreSQL about as much as a batch of many). One batch at a time stays open: it
        waits for its turn and a connection like any request, and every GET that arrives
        meanwhile joins it. Once it has the connection it closes and reads all its keys in one
        statement, so each member's answer is read after that member arrived: as fresh as a
        statement of its own would have been.
        """
        batch = self._open_batch
        if batch is None or len(batch.members) >= GET_BATCH_MAX_KEYS:
            batch = self._open_batch = _GetBatch()
            task = asyncio.create_task(self._read_batch(pool, batch), name="db-get-batch")
            self._batch_tasks.add(task)
            task.add_done_callback(lambda task: self._batch_ended(task, batch))
        answer: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        batch.members.append((key, answer))
        self._reads_waiting += 1
        return await answer

    def _close_batch(self, batch: _GetBatch) -> None:
        """No more members: its statement starts, or it failed before one could."""
        if not batch.closed:
            batch.closed = True
            self._reads_waiting -= len(batch.members)
            if self._open_batch is batch:
                self._open_batch = None

    def _batch_ended(self, task: asyncio.Task[None], batch: _GetBatch) -> None:
        """Whatever ended the task (even a cancel before it ever ran), no member waits on."""
        self._batch_tasks.discard(task)
        exc = None if task.cancelled() else task.exception()
        self._fail_batch(batch, exc or asyncio.CancelledError())

    def _fail_batch(self, batch: _GetBatch, exc: BaseException) -> None:
        self._close_batch(batch)
        for _, answer in batch.members:
            if not answer.done():
                answer.set_exception(_for_one_request(exc))

    async def _read_batch(self, pool: Pool, batch: _GetBatch) -> None:
        members = batch.members

        async def read(conn: asyncpg.Connection) -> dict[str, Any]:
            if not batch.closed:  # not on the second try (after the schema was re-applied)
                self._close_batch(batch)
                self._read_batches += 1
                self._batched_reads += waiting()
            keys = list(dict.fromkeys(key for key, _ in members))
            if len(keys) == 1:
                return {keys[0]: await conn.fetchval(SQL_GET, keys[0])}
            return {row[0]: row[1] for row in await conn.fetch(SQL_GET_MANY, keys)}

        def waiting() -> int:  # members whose request still waits (not cancelled)
            return sum(not answer.done() for _, answer in members)

        def error(kind: str) -> None:  # met by every request still waiting
            for _ in range(waiting()):
                self._on_error(kind)

        cfg = self._config
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.pool_acquire_timeout
        try:
            # The turn and the connection together within the acquire timeout: a request
            # waits no longer for a batched read than it would for a connection of its own.
            try:
                async with asyncio.timeout_at(deadline):
                    await self._reads.acquire()
            except TimeoutError:
                error("busy")
                raise DatabaseBusy(
                    f"the reads ahead took over {cfg.pool_acquire_timeout:g}s"
                ) from None
            try:
                values = await self._run(pool, read, on_error=error,
                                         acquire_timeout=max(deadline - loop.time(), 0.0))
            finally:
                self._reads.release()
        except Exception as exc:
            self._fail_batch(batch, exc)
            return
        for key, answer in members:
            if not answer.done():
                value = values.get(key)
                answer.set_result(None if value is None else str(value))

    async def set_var(self, key: str, value: str) -> bool:
        """Create ``key``; False if it already exists."""
        return bool(await self._write(SQL_SET, key, value))

    async def get_var(self, key: str) -> str | None:
        """The value of ``key``, or None. When ``read_concurrency`` reads already run or every
        connection is in use, the read joins the others waiting (see :meth:`_get_batched`)."""
        pool = self._admit()
        self._in_flight += 1
        try:
            reads = self._reads
            if reads.locked() or pool.saturated:
                return await self._get_batched(pool, key)
            await reads.acquire()  # free: returns at once
            try:
                value = await self._run(pool, lambda conn: conn.fetchval(SQL_GET, key))
            finally:
                reads.release()
        finally:
            self._in_flight -= 1
        return None if value is None else str(value)

    async def edit_var(self, key: str, value: str) -> bool:
        """Replace the value of ``key``; False if it does not exist."""
        return bool(await self._write(SQL_EDIT, key, value))

    async def delete_var(self, key: str) -> bool:
        """Delete ``key``; False if it did not exist."""
        return bool(await self._write(SQL_DELETE, key))

    async def ping(self) -> None:
        """Raise unless the database answers ``SELECT 1`` within the health timeout, on a
        connection of its own (not the pool's)."""
        if self._pool is None:
            raise DatabaseUnavailable(self.last_error or "not connected yet")
        async with self._health_lock:
            try:
                async with asyncio.timeout(self._config.health_timeout):
                    conn = self._health_conn
                    if conn is None or conn.is_closed():
                        conn = self._health_conn = await self._open_connection()
                    await conn.fetchval(SQL_PING)
            except (*CONNECTION_ERRORS, TimeoutError, asyncpg.PostgresError) as exc:
                if self._health_conn is not None:
                    self._health_conn.terminate()
                    self._health_conn = None
                self._on_error("health")
                if isinstance(exc, TimeoutError):
                    raise DatabaseUnavailable(
                        f"no answer within {self._config.health_timeout:g}s"
                    ) from None
                raise DatabaseUnavailable(describe(exc)) from exc
