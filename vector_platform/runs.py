"""Running the platform's jobs for the CLI and the Python API: in this process, or through
the Dagster instance.

`VP_RUN_MODE`:
- `in_process`: `execute_in_process` against the instance (the UI shows the runs; fast, no daemon).
- `instance`: the run is submitted to the instance (`dagster job launch`), so the run queue,
  tag concurrency limits, pools, the configured executor and run launcher all apply, exactly
  as for a run launched from the UI; we wait for it and follow its progress in the event log.
- `auto` (default): `instance` when a Dagster daemon is heart-beating (e.g. under `make dev`),
  else `in_process`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import dagster as dg

from vector_platform import progress as progress_hooks

MODES = ("auto", "in_process", "instance")
HEARTBEAT_FRESH_S = 90
_PROGRESS = re.compile(r"^(\w+): (\d+)/(\d+)$")
TERMINAL = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


@dataclass
class RunSummary:
    job: str
    partition: str
    run_id: str
    success: bool
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    check_metadata: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None
    mode: str = "in_process"


def daemon_is_running(instance: dg.DagsterInstance) -> bool:
    try:
        heartbeats = instance.get_daemon_heartbeats()
    except Exception:  # noqa: BLE001 - storage without daemon tables: no daemon
        return False
    now = time.time()
    return any(now - beat.timestamp < HEARTBEAT_FRESH_S for beat in heartbeats.values())


def resolve_mode(instance: dg.DagsterInstance) -> str:
    mode = os.environ.get("VP_RUN_MODE", "auto")
    if mode not in MODES:
        raise ValueError(f"VP_RUN_MODE must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "auto":
        return "instance" if daemon_is_running(instance) else "in_process"
    return mode


def summarise(job: str, partition: str, run_id: str, success: bool, events: Iterable[dg.DagsterEvent], mode: str) -> RunSummary:
    summary = RunSummary(job, partition, run_id, success, mode=mode)
    kinds = dg.DagsterEventType
    for event in events:
        if event.event_type == kinds.ASSET_MATERIALIZATION:
            mat = event.event_specific_data.materialization
            summary.metadata[mat.asset_key.to_user_string()] = {k: v.value for k, v in mat.metadata.items()}
        elif event.event_type == kinds.STEP_OUTPUT and event.event_specific_data.metadata:
            # ops that are not assets (the tier moves) report through their output's metadata
            summary.metadata[event.step_key] = {k: v.value for k, v in event.event_specific_data.metadata.items()}
        elif event.event_type == kinds.ASSET_CHECK_EVALUATION:
            evaluation = event.event_specific_data
            summary.checks[evaluation.check_name] = evaluation.passed
            summary.check_metadata[evaluation.check_name] = {k: v.value for k, v in evaluation.metadata.items()}
        elif event.event_type in (kinds.STEP_FAILURE, kinds.RUN_FAILURE) and summary.error is None:
            error = getattr(event.event_specific_data, "error", None)
            if error is not None:
                summary.error = root_cause(error)
    return summary


_FAILURE_PREFIX = re.compile(r"^dagster\._core\.definitions\.events\.Failure: ")
# PostgreSQL itself went away (stopped, crashed, restarting) or cannot be reached: no
# statement's fault, and the psycopg text alone ("consuming input failed") does not say so.
_DATABASE_GONE = re.compile(
    r"^(psycopg\.OperationalError|psycopg\.errors\.(AdminShutdown|CrashShutdown|CannotConnectNow)|psycopg_pool\.PoolTimeout): "
)

# Connection failures that are the server refusing us (configuration), not the server gone.
_REFUSALS = ("authentication failed", "no pg_hba.conf entry", "does not exist", "permission denied")


def plain_database_error(error: str | None, database: str) -> str | None:
    """A run's error, said plainly when the database went away under it (`database`: which
    one, from `db.describe`); any other error unchanged."""
    gone = _DATABASE_GONE.match(error or "")
    if gone is None:
        return error
    detail = " ".join(error[gone.end():].split())
    if any(refusal in detail for refusal in _REFUSALS):  # reached, and refused: psycopg's text says why
        return error
    return (f"the database is unreachable: {database} stopped or cannot be reached ({detail}). "
            "Run it again once PostgreSQL is back: what was committed stays, the rest is redone.")


def root_cause(error) -> str:
    """The innermost error's message: what went wrong, not Dagster's wrapper around it."""
    while error.cause is not None:
        error = error.cause
    return _FAILURE_PREFIX.sub("", error.message.strip())


@contextmanager
def sigterm_kept() -> Iterator[None]:
    """SIGTERM's handler as it was before, after an in-process run on the main thread.

    Dagster's in-process execution, when it restores SIGINT afterwards, also sets SIGTERM to
    SIGINT's handler (dagster._utils.interrupts). In a process started with SIGINT ignored (a
    background job of a script, nohup ... &) SIGTERM is then ignored from that moment, by the
    process and by every child it starts later: Dagster's own compute-log `tail` then survives
    terminate() and a step of a later run (on another thread) waits 30 s for it, twice."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if before is not None and signal.getsignal(signal.SIGTERM) != before:
            signal.signal(signal.SIGTERM, before)


def run_in_process(defs: dg.Definitions, instance: dg.DagsterInstance, job_name: str, partition_key, run_config: dict,
                   checks_only: set[dg.AssetCheckKey] | None = None) -> RunSummary:
    """`checks_only`: run just these asset checks of the job, no asset."""
    job = defs.resolve_job_def(job_name)
    if checks_only:
        job = job.get_subset(asset_selection=set(), asset_check_selection=checks_only)
    with sigterm_kept():
        result = job.execute_in_process(
            partition_key=partition_key,
            instance=instance,
            raise_on_error=False,
            # Failures come back in the summary (root cause, no stack trace); warnings worth a
            # person's attention reach the CLI through progress.notify.
            run_config={"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}, **run_config},
        )
    return summarise(job_name, str(partition_key), result.run_id, result.success, result.all_events, "in_process")


def workspace_args() -> list[str]:
    workspace = os.environ.get("VP_WORKSPACE") or str(Path(__file__).resolve().parent.parent / "workspace.yaml")
    if Path(workspace).exists():
        return ["-w", workspace]
    return ["-m", "vector_platform.definitions"]


def partition_tags(partition_key) -> dict[str, str]:
    """The tags Dagster gives a partitioned run (the multi-dimension ones feed tag concurrency limits)."""
    tags = {"dagster/partition": str(partition_key)}
    if isinstance(partition_key, dg.MultiPartitionKey):
        tags.update({f"dagster/partition/{dim}": key for dim, key in partition_key.keys_by_dimension.items()})
    return tags


def submit(instance: dg.DagsterInstance, job_name: str, partition_key, run_config: dict) -> str:
    """Submit a run to the instance (its run coordinator queues it); returns the run id."""
    run_id = str(uuid.uuid4())
    dagster = Path(sys.executable).parent / "dagster"
    command = [
        str(dagster) if dagster.exists() else "dagster", "job", "launch", *workspace_args(), "-j", job_name,
        "--run-id", run_id, "--tags", json.dumps(partition_tags(partition_key)),
    ]
    if run_config:
        command += ["--config-json", json.dumps(run_config)]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        raise RuntimeError(f"dagster job launch failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return run_id


def wait(
    instance: dg.DagsterInstance,
    run_id: str,
    say: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
    poll_s: float = 0.5,
    say_every_s: float = 30.0,
) -> dg.DagsterRun:
    """Follow a submitted run until it ends: progress lines go to the progress listeners."""
    cursor = None
    started = time.monotonic()
    said = 0.0
    while True:
        if time.monotonic() - started > 120 and instance.get_run_by_id(run_id) is None:
            raise RuntimeError(f"run {run_id} was launched but this instance ({instance.root_directory}) never saw it: "
                               "is DAGSTER_HOME the instance the daemon serves?")
        records = instance.get_records_for_run(run_id, cursor=cursor)
        cursor = records.cursor
        for record in records.records:
            entry = record.event_log_entry
            match = _PROGRESS.match(entry.user_message or "") if entry.dagster_event is None else None
            if match:
                for listener in progress_hooks.listeners:
                    listener(match.group(1), int(match.group(2)), int(match.group(3)))
            elif entry.dagster_event is None and entry.level >= 30:  # warnings, e.g. waiting for a writer lock
                say(entry.user_message)
        run = instance.get_run_by_id(run_id)
        if run is not None and run.status in TERMINAL and not records.has_more:
            return run
        waited = time.monotonic() - started
        if run is not None and run.status == dg.DagsterRunStatus.QUEUED and waited - said >= say_every_s:
            say(f"run {run_id[:8]} still queued after {waited:.0f} s (run queue limits, or no dagster-daemon?)")
            said = waited
        if not records.has_more:
            time.sleep(poll_s)


def run_through_instance(instance: dg.DagsterInstance, job_name: str, partition_key, run_config: dict) -> RunSummary:
    run_id = submit(instance, job_name, partition_key, run_config)
    run = wait(instance, run_id)
    events = [e.dagster_event for e in instance.all_logs(run_id) if e.dagster_event is not None]
    return summarise(job_name, str(partition_key), run_id, run.status == dg.DagsterRunStatus.SUCCESS, events, "instance")
