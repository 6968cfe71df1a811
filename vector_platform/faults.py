"""Named failpoints for crash tests: `point("evict.after_switch")` kills this process with
SIGKILL when VP_FAILPOINT names that point. A no-op otherwise (one dictionary lookup).

Crash tests start a real CLI process with VP_FAILPOINT set, let it die exactly there, and
check that a re-run completes the work. Points in use: evict.after_snapshot,
evict.after_switch, rehydrate.after_first_batch, archive.after_switch, archive_rows.after_upload,
archive_rows.after_receipts, archive_rows.after_batch, restore.before_commit,
drop.after_catalog, load.after_batch (each committed COPY batch of the vector_table load).

In-process tests may instead replace `point` (monkeypatch) to act at a point, e.g. stop the
database exactly between two committed batches (reliability/test_postgres_faults.py).
"""

import os
import signal


def point(name: str) -> None:
    if os.environ.get("VP_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
