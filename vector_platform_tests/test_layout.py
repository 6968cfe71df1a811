"""The layout's promises: plain packages never import Dagster (search works without building
Definitions), and a pooled connection comes back clean whatever the last borrower did."""

import subprocess
import sys
import time

import pytest

from vector_platform import db


@pytest.mark.parametrize(
    "module", ["vector_platform.search", "vector_platform.catalog", "vector_platform.ingest.steps", "vector_platform.checks", "vector_platform.tables",
     "vector_platform.backup.restore", "vector_platform.backup.drop"]
)
def test_plain_packages_do_not_import_dagster(module):
    code = f"import sys, {module}; bad = [m for m in sys.modules if m == 'dagster' or m.startswith('dagster.')]; print(bad); sys.exit(1 if bad else 0)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, f"{module} pulls in Dagster: {done.stdout} {done.stderr[-1000:]}"


def test_a_pooled_connection_is_reset_between_borrowers(pg_dsn):
    pool = db.get_pool(pg_dsn)
    with pool.connection() as conn:
        pid = conn.info.backend_pid
        conn.execute("SET maintenance_work_mem = '3GB'")
        conn.execute("SELECT pg_advisory_lock(4242)")
        conn.execute("CREATE TEMP TABLE leftover (x int)")
        assert conn.autocommit  # every unit of work is an explicit transaction
    # The pool resets a returned connection in a worker before handing it out again: borrow
    # until that very connection comes back, checking every one on the way.
    deadline = time.time() + 30
    seen = set()
    while pid not in seen and time.time() < deadline:
        with pool.connection() as conn:
            seen.add(conn.info.backend_pid)
            assert conn.execute("SHOW maintenance_work_mem").fetchone()[0] != "3GB"
            assert conn.execute("SELECT to_regclass('pg_temp.leftover')").fetchone()[0] is None
            held = conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242 AND pid = pg_backend_pid()"
            ).fetchone()[0]
            assert held == 0
        time.sleep(0.05)
    assert pid in seen, "the first connection never came back from the pool"
