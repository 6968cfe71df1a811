"""Where a search reads: one of the read DSNs (streaming replicas, or a read-only role on the
primary), chosen per search by health and replication lag, else the primary.

`VP_PG_READ_DSN` holds one DSN or several separated by `;`. Each is checked at most once per
`CHECK_EVERY_S` (by the first search after that; nothing runs in the background):

- a server in recovery (a streaming replica) whose last replayed WAL position has reached the
  primary's current one lags 0 s; one behind it lags `now() - pg_last_xact_replay_timestamp()`
  (an overestimate right after a long idle spell, never an underestimate, so a stale replica
  is never taken for a fresh one); when the primary cannot be asked, only what the replica
  received and replayed is compared;
- a server not in recovery (the primary under a read-only role) lags 0 s;
- a server that cannot be reached is skipped until its next check.

A search takes the healthy readers in turn (round robin), skipping those lagging more than
`max_replica_lag_s`, each skip with a warning; with none left it reads the primary. A search
that must see what was just written asks for `consistent`: only readers that are the
primary itself, else the primary's own DSN.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass

import psycopg

from vector_platform import db
from vector_platform.telemetry import logs

log = logging.getLogger(__name__)

CHECK_EVERY_S = 1.0
CONNECT_TIMEOUT_S = 2

# Lag in seconds of the server this connection reads (0 on a primary), and whether it is in
# recovery. `%s`: the primary's current WAL position, or NULL when it could not be asked.
LAG_SQL = """
SELECT pg_is_in_recovery(),
       CASE
         WHEN NOT pg_is_in_recovery() THEN 0.0
         WHEN pg_last_wal_replay_lsn() >= coalesce(%s::pg_lsn, pg_last_wal_receive_lsn()) THEN 0.0
         ELSE coalesce(extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp()), 'infinity')::float8
       END
"""


@dataclass
class ReaderState:
    dsn: str
    label: str  # host:port/database, never the password
    checked_at: float = float("-inf")
    reachable: bool = False
    in_recovery: bool = False
    lag_s: float = float("inf")
    error: str = ""


@dataclass
class Choice:
    dsn: str | None  # None: the primary's own DSN
    label: str  # what served the search: "primary", or "replica <host:port/db>" / "reader <host:port/db>"
    lag_s: float
    warnings: list[str]


def label_of(dsn: str) -> str:
    """host:port/database of a DSN, for messages (never the password)."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "an unparsable DSN"
    host = info.get("host") or "localhost"
    return f"{host}:{info.get('port') or 5432}/{info.get('dbname') or info.get('user') or ''}"


class Router:
    """The read DSNs of one primary and what was last seen of each. Thread-safe."""

    def __init__(self, primary_dsn: str, read_dsns: list[str]):
        for dsn in read_dsns:
            logs.register_secret(logs.dsn_password(dsn))  # masked in every log line
        self.primary_dsn = primary_dsn
        self.readers = [ReaderState(dsn, label_of(dsn)) for dsn in read_dsns]
        self._turn = itertools.count()
        self._lock = threading.Lock()

    def choose(self, max_lag_s: float, consistent: bool = False) -> Choice:
        warnings: list[str] = []
        if not self.readers:
            return Choice(None, "primary", 0.0, warnings)
        states = [self._checked(state) for state in self.readers]
        start = next(self._turn) % len(states)
        for state in states[start:] + states[:start]:
            kind = "replica" if state.in_recovery else "reader"
            if not state.reachable:
                warnings.append(f"read server {state.label} skipped: unreachable ({state.error})")
            elif consistent and state.in_recovery:
                continue  # a replica may not have replayed the caller's last write yet
            elif state.lag_s > max_lag_s:
                lag = "no transaction replayed yet" if state.lag_s == float("inf") else f"{state.lag_s:.1f} s behind the primary"
                warnings.append(f"replica {state.label} skipped: {lag} (max_replica_lag_s {max_lag_s:g})")
            else:
                return Choice(state.dsn, f"{kind} {state.label}", state.lag_s, warnings)
        if warnings:
            warnings.append("searched on the primary")
        return Choice(None, "primary", 0.0, warnings)

    def _checked(self, state: ReaderState) -> ReaderState:
        if time.monotonic() - state.checked_at < CHECK_EVERY_S:
            return state
        with self._lock:
            if time.monotonic() - state.checked_at < CHECK_EVERY_S:  # another search just checked it
                return state
            primary_lsn = self._primary_lsn()
            try:
                with psycopg.connect(state.dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
                    state.in_recovery, state.lag_s = conn.execute(LAG_SQL, (primary_lsn,)).fetchone()
                state.reachable, state.error = True, ""
            except psycopg.Error as err:
                self._down(state, err)
            state.checked_at = time.monotonic()
            return state

    def mark_down(self, dsn: str, err: BaseException) -> None:
        """A search lost its connection to `dsn`: skip it until its next check."""
        for state in self.readers:
            if state.dsn == dsn:
                with self._lock:
                    self._down(state, err)
                    state.checked_at = time.monotonic()

    @staticmethod
    def _down(state: ReaderState, err: BaseException) -> None:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        state.reachable, state.error = False, logs.redact(first_line)

    def _primary_lsn(self) -> str | None:
        try:
            with db.get_pool(self.primary_dsn).connection(timeout=CONNECT_TIMEOUT_S) as conn:
                return conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]
        except Exception as err:  # noqa: BLE001 - the primary down: compare the replicas with themselves
            log.info("could not read the primary's WAL position (%s): replica lag measured by replay alone", type(err).__name__)
            return None


_routers: dict[tuple[str, tuple[str, ...]], Router] = {}
_routers_lock = threading.Lock()


def router(primary_dsn: str, read_dsns: list[str]) -> Router:
    """The process's router for this primary and these read DSNs (state kept between searches)."""
    key = (primary_dsn, tuple(read_dsns))
    with _routers_lock:
        if key not in _routers:
            _routers[key] = Router(primary_dsn, read_dsns)
        return _routers[key]
