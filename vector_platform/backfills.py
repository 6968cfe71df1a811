"""Asset backfills through the Dagster instance: what the UI's "Materialize selected" over
partitions (GraphQL `launchPartitionBackfill`) and "Re-execute from failure" create.

A backfill is a record in the instance; the dagster-daemon's backfill daemon turns it into
runs (the assets' multi-run backfill policy packs several partitions per run), and the UI's
backfills page shows it. There is no `dagster asset backfill` command, so we write the same
record the GraphQL mutation writes, with Dagster's own `PartitionBackfill`.

Without a daemon nothing executes a backfill: `ensure_daemon` starts one for the duration
of a `--wait` (the same workspace and instance as `make dev`), one for all the commands that
wait at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import dagster as dg
from dagster._core.definitions.events import AssetKeyPartitionKey
from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset
from dagster._core.execution.backfill import BULK_ACTION_TERMINAL_STATUSES, BulkActionStatus, PartitionBackfill
from dagster._core.storage.tags import PARENT_BACKFILL_ID_TAG, ROOT_BACKFILL_ID_TAG
from dagster._core.utils import make_new_backfill_id

from vector_platform import runs

SUCCESS = {BulkActionStatus.COMPLETED, BulkActionStatus.COMPLETED_SUCCESS}
BACKFILL_TAG = "dagster/backfill"


def partition_key(collection: str, model_key: str) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({"collection": collection, "model": model_key})


def launch(
    instance: dg.DagsterInstance,
    defs: dg.Definitions,
    targets: Sequence[tuple[Sequence[dg.AssetKey], Sequence[tuple[str, str]]]],
    title: str,
    description: str = "",
    tags: dict[str, str] | None = None,
) -> str:
    """Record one asset backfill; returns its id. `targets`: (assets, (collection, model) pairs)
    groups, each asset materialized over its group's partitions (one backfill may cover
    different assets for different partitions, e.g. tables for active collections and
    snapshots for cold ones)."""
    graph = defs.resolve_asset_graph()
    wanted = {
        AssetKeyPartitionKey(key, str(partition_key(c, m))) for assets, pairs in targets for key in assets for c, m in pairs
    }
    if not wanted:
        raise ValueError("nothing to backfill")
    backfill = PartitionBackfill.from_asset_graph_subset(
        backfill_id=make_new_backfill_id(),
        asset_graph_subset=AssetGraphSubset.from_asset_partition_set(wanted, graph),
        dynamic_partitions_store=instance,
        tags=tags or {},
        backfill_timestamp=time.time(),
        title=title,
        description=description,
        run_config=None,
    )
    instance.add_backfill(backfill)
    return backfill.backfill_id


def retry_failed(
    instance: dg.DagsterInstance,
    defs: dg.Definitions,
    backfill_id: str,
    also: Sequence[tuple[dg.AssetKey, tuple[str, str]]] = (),
) -> str:
    """A new backfill of what the finished one did not materialize (the UI's "Re-execute from
    failure"): failed partitions and the steps they blocked, nothing that succeeded. `also`:
    (asset, (collection, model)) to run again although they were materialized (an upgrade's
    last step whose blocking check never ran or could not measure: running the step runs it)."""
    backfill = instance.get_backfill(backfill_id)
    if backfill is None:
        raise KeyError(f"no backfill {backfill_id!r} in this instance")
    if backfill.status not in BULK_ACTION_TERMINAL_STATUSES:
        raise RuntimeError(f"backfill {backfill_id} is still {backfill.status.value}: wait for it to finish")
    graph = defs.resolve_asset_graph()
    data = backfill.get_asset_backfill_data(graph)
    missing = data.target_subset - data.materialized_subset
    if also:
        extra = {AssetKeyPartitionKey(key, str(partition_key(c, m))) for key, (c, m) in also}
        missing = missing | AssetGraphSubset.from_asset_partition_set(extra, graph)
    if missing.num_partitions_and_non_partitioned_assets == 0:
        raise RuntimeError(f"backfill {backfill_id} materialized everything it targeted: nothing to retry")
    retry = PartitionBackfill.from_asset_graph_subset(
        backfill_id=make_new_backfill_id(),
        asset_graph_subset=missing,
        dynamic_partitions_store=instance,
        tags={**backfill.tags, PARENT_BACKFILL_ID_TAG: backfill_id,
              ROOT_BACKFILL_ID_TAG: backfill.tags.get(ROOT_BACKFILL_ID_TAG, backfill_id)},
        backfill_timestamp=time.time(),
        title=f"Re-execution of {backfill.title}" if backfill.title else None,
        description=backfill.description,
        run_config=backfill.run_config,
    )
    instance.add_backfill(retry)
    return retry.backfill_id


def wait(
    instance: dg.DagsterInstance,
    backfill_id: str,
    say: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
    timeout_s: float = 6 * 3600,
    poll_s: float = 1.0,
    tick: Callable[[], None] = lambda: None,
) -> BulkActionStatus:
    """Follow a backfill until it ends; says each run that finishes. `tick` runs on every poll
    (ensure_daemon's: keep a daemon serving the instance)."""
    started = time.monotonic()
    reported: set[str] = set()
    while True:
        tick()
        backfill = instance.get_backfill(backfill_id)
        if backfill is None:
            raise KeyError(f"no backfill {backfill_id!r} in this instance")
        for run in instance.get_runs(dg.RunsFilter(tags={BACKFILL_TAG: backfill_id})):
            if run.status in runs.TERMINAL and run.run_id not in reported:
                reported.add(run.run_id)
                span = run.tags.get("dagster/asset_partition_range_start")
                keys = f"{span}..{run.tags.get('dagster/asset_partition_range_end')}" if span else run.tags.get("dagster/partition", "")
                say(f"backfill {backfill_id}: run {run.run_id[:8]} [{keys}] {run.status.value.lower()}")
        if backfill.status in BULK_ACTION_TERMINAL_STATUSES:
            return backfill.status
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"backfill {backfill_id} still {backfill.status.value} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def backfill_runs(instance: dg.DagsterInstance, backfill_id: str) -> list[dg.DagsterRun]:
    return list(instance.get_runs(dg.RunsFilter(tags={BACKFILL_TAG: backfill_id})))


class DaemonKeeper:
    """Makes sure a dagster-daemon serves the instance while a command waits for a backfill.

    `tick()` (called on every poll) does nothing while some daemon sends heartbeats. When none
    does, it starts `dagster-daemon run` (the same workspace and instance as `make dev`), but
    only while holding an exclusive lock file in the instance's folder: two commands waiting at
    once share one daemon (Dagster does not support two), and when the first one's daemon
    stops with its command, the next tick of the other starts its own. `stop()` stops ours.
    """

    def __init__(self, instance: dg.DagsterInstance, say: Callable[[str], None]):
        self.instance, self.say = instance, say
        self.root = Path(instance.root_directory)
        self.process: subprocess.Popen | None = None
        self.lock_file = None
        self.log_file = None

    def tick(self) -> None:
        if self.process is not None:
            if self.process.poll() is not None:
                raise RuntimeError(f"dagster-daemon exited ({self.process.returncode}): {self._log_tail()}")
            return
        if runs.daemon_is_running(self.instance) or not self._take_lock():
            return  # someone's daemon serves the instance, or another command is starting one
        if runs.daemon_is_running(self.instance):  # started and stopped meanwhile? heartbeats say who serves
            self._release_lock()
            return
        daemon_bin = Path(sys.executable).parent / "dagster-daemon"
        command = [str(daemon_bin) if daemon_bin.exists() else "dagster-daemon", "run", *runs.workspace_args()]
        log_path = self.root / "vector_platform_daemon.log"
        self.say(f"no dagster-daemon serves this instance: starting one for this backfill (log: {log_path})")
        # Its output goes to a file: an unread pipe would fill up and stall the daemon and its runs.
        self.log_file = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(command, env=os.environ.copy(), stdout=self.log_file, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + 180
        while not runs.daemon_is_running(self.instance):
            if self.process.poll() is not None:
                raise RuntimeError(f"dagster-daemon exited ({self.process.returncode}): {self._log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError("dagster-daemon did not start within 180 s")
            time.sleep(1)

    def stop(self) -> None:
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            self.process = None
            # Its heartbeats would look fresh for a while: later commands must not queue runs for it.
            self.instance.wipe_daemon_heartbeats()
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None
        self._release_lock()

    def _take_lock(self) -> bool:
        self.lock_file = open(self.root / "vector_platform_daemon.lock", "a")  # noqa: SIM115 - closed in _release_lock
        try:
            fcntl.flock(self.lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            self._release_lock()
            return False

    def _release_lock(self) -> None:
        if self.lock_file is not None:
            self.lock_file.close()  # closing drops the flock
            self.lock_file = None

    def _log_tail(self) -> str:
        return (self.root / "vector_platform_daemon.log").read_text(errors="replace")[-2000:]


@contextmanager
def ensure_daemon(instance: dg.DagsterInstance, say: Callable[[str], None]) -> Iterator[Callable[[], None]]:
    """A daemon serves the instance until the block ends (see DaemonKeeper); yields the tick to
    call while waiting (`wait(..., tick=)`)."""
    keeper = DaemonKeeper(instance, say)
    try:
        keeper.tick()
        yield keeper.tick
    finally:
        keeper.stop()
