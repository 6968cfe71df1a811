"""Runs go through the Dagster instance when a daemon is up: a real `dagster-daemon` against
instance storage in the embedded Postgres, and the CLI submitting to its run queue."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import psycopg

from .conftest import cli, instance_env, write_jsonl

REPO = Path(__file__).resolve().parent.parent


def test_cli_ingest_goes_through_the_run_queue_of_a_running_daemon(pg_server, pg_dsn, tmp_path, unique_name):
    home, env = instance_env(pg_server, pg_dsn, tmp_path)  # the product's instance config, as `make dev` uses it
    daemon = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", str(REPO / "workspace.yaml")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    old_home = os.environ.get("DAGSTER_HOME")
    try:
        for key in ("DAGSTER_HOME", "VP_DAGSTER_PG_URL", "VP_DAGSTER_ARTIFACTS"):
            os.environ[key] = env[key]
        instance = dg.DagsterInstance.from_config(str(home))
        deadline = time.time() + 120
        while time.time() < deadline and not instance.get_daemon_heartbeats():
            assert daemon.poll() is None, daemon.stderr.read().decode()[-3000:]
            time.sleep(1)
        assert instance.get_daemon_heartbeats(), "the daemon never heart-beat"

        source = write_jsonl(tmp_path / "d.jsonl", [{"id": str(i), "text": f"daemon document {i} about ferns"} for i in range(5)])
        subprocess.run(cli("collections", "add", unique_name, "--source", str(source)), env=env, check=True, timeout=120)
        done = subprocess.run(cli("ingest", unique_name, "--quiet"), env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr[-3000:]
        assert done.stdout.count(", instance)") == 3  # every run went to the instance, none in-process
        assert "check no_chunk_lost: passed" in done.stdout

        runs = instance.get_runs(dg.RunsFilter(tags={"dagster/partition": unique_name}))
        assert {r.job_name for r in runs} == {"ingest_documents_job", "serving_view_job"}
        for run in runs + instance.get_runs(dg.RunsFilter(job_name="embed_and_index_job")):
            if not run.tags.get("dagster/partition", "").startswith(unique_name):
                continue
            assert run.status == dg.DagsterRunStatus.SUCCESS
            types = {e.dagster_event.event_type for e in instance.all_logs(run.run_id) if e.dagster_event}
            queued = {dg.DagsterEventType.RUN_ENQUEUED, dg.DagsterEventType.RUN_STARTING, dg.DagsterEventType.RUN_SUCCESS}
            assert queued <= types  # the run queue, then the run launcher
        with psycopg.connect(pg_dsn) as conn:
            chunks = conn.execute("SELECT count(*) FROM vector_platform.chunks WHERE collection = %s", (unique_name,)).fetchone()[0]
        assert chunks == 5
        instance.dispose()
    finally:
        os.killpg(daemon.pid, signal.SIGKILL)
        daemon.wait()
        if old_home is None:
            os.environ.pop("DAGSTER_HOME", None)
        else:
            os.environ["DAGSTER_HOME"] = old_home
        for key in ("VP_DAGSTER_PG_URL", "VP_DAGSTER_ARTIFACTS"):
            os.environ.pop(key, None)
