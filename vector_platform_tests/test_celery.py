"""Runs on Dagster's Celery executor: a Redis broker (Debian's redis-server on 127.0.0.1), two
`dagster-celery` workers, a real dagster-daemon and the product's instance config. The same
ingest executed step by step by the workers gives exactly the rows an in-process run gives."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import psycopg
import pytest
from psycopg import sql

from vector_platform import catalog, tables

from . import upgrade_data as data
from .conftest import cli, instance_env, write_jsonl

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture
def redis_url(tmp_path):
    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("redis-server did not start")
    yield f"redis://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


def _rows(dsn: str, collection: str, model: str) -> dict:
    with psycopg.connect(dsn) as conn:
        table = tables.table_id(catalog.vector_table_name(conn, collection, model))
        return {
            (doc_id, seq): rest
            for doc_id, seq, *rest in conn.execute(sql.SQL(
                "SELECT doc_id, seq, content_hash, text, metadata, embedding::text FROM {}").format(table)).fetchall()
        }


def test_an_ingest_on_celery_workers_gives_the_rows_of_an_in_process_run(pg_server, pg_dsn, tmp_path, redis_url, unique_name):
    home, env = instance_env(pg_server, pg_dsn, tmp_path, VP_EXECUTOR="celery", VP_CELERY_BROKER=f"{redis_url}/0",
                             VP_CELERY_BACKEND=f"{redis_url}/1")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # dagster-celery starts `celery` from the PATH
    (tmp_path / "celery.yaml").write_text(
        f"execution:\n  config:\n    broker: {redis_url}/0\n    backend: {redis_url}/1\n", encoding="utf-8")
    srv = data.server()
    started = []
    try:
        started.append(subprocess.Popen([str(BIN / "dagster-daemon"), "run", "-w", str(REPO / "workspace.yaml")], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True))
        for worker in ("w1", "w2"):
            started.append(subprocess.Popen(
                [str(BIN / "dagster-celery"), "worker", "start", "-A", "dagster_celery.app", "-y", str(tmp_path / "celery.yaml"),
                 "-n", worker, "--", "--pool=solo"],  # one process per worker, a task at a time
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True))
        for key in ("DAGSTER_HOME", "VP_DAGSTER_PG_URL", "VP_DAGSTER_ARTIFACTS"):
            os.environ[key] = env[key]
        instance = dg.DagsterInstance.from_config(str(home))
        deadline = time.time() + 120
        while time.time() < deadline and not instance.get_daemon_heartbeats():
            assert all(p.poll() is None for p in started), [p.stderr.read().decode()[-2000:] for p in started if p.poll() is not None]
            time.sleep(1)
        assert instance.get_daemon_heartbeats(), "the daemon never heart-beat"

        def run(*args, **extra):
            done = subprocess.run(cli(*args), env={**env, **extra}, capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, done.stdout + done.stderr[-3000:]
            return done.stdout

        key = f"mini_{unique_name[-6:]}"
        run("models", "add", key, "--provider", "openai", "--model-name", f"test-{key}", "--dims", "384",
            "--base-url", srv.base_url)
        source = write_jsonl(tmp_path / "docs.jsonl", data.docs_with_judged(30))
        on_celery, in_process = f"{unique_name}_celery", f"{unique_name}_local"
        for name in (on_celery, in_process):
            run("collections", "add", name, "--source", str(source), "--model", key)

        out = run("ingest", on_celery, "--quiet")
        assert out.count(", instance)") == 3, out  # every run through the instance, none in-process
        out = run("ingest", in_process, "--quiet", VP_RUN_MODE="in_process")
        assert ", instance)" not in out, out

        # every step of the celery runs was executed by one of the two workers
        runs = [r for r in instance.get_runs() if r.tags.get("dagster/partition", "").startswith(on_celery)]
        assert {r.job_name for r in runs} == {"ingest_documents_job", "embed_and_index_job", "serving_view_job"}
        workers, steps = set(), 0
        for r in runs:
            assert r.status == dg.DagsterRunStatus.SUCCESS
            for entry in instance.all_logs(r.run_id):
                event = entry.dagster_event
                worker = (event.engine_event_data.metadata.get("Celery worker")
                          if event and event.event_type == dg.DagsterEventType.ENGINE_EVENT else None)
                if worker is not None:  # "Executing steps … in celery worker", reported by the worker itself
                    steps += 1
                    workers.add(str(worker.value).split("@")[0])
        assert steps >= 6 and workers <= {"w1", "w2"} and workers, (steps, workers)

        # the same rows, chunk for chunk and vector for vector
        celery_rows, local_rows = _rows(pg_dsn, on_celery, key), _rows(pg_dsn, in_process, key)
        assert len(celery_rows) == 30 and celery_rows == local_rows
        searched = run("search", "tumour suppressor genes", "--collection", on_celery, "--collection", in_process, "--json")
        assert on_celery in searched and in_process in searched
        instance.dispose()
    finally:
        for proc in started:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        srv.stop()
        for key in ("DAGSTER_HOME", "VP_DAGSTER_PG_URL", "VP_DAGSTER_ARTIFACTS"):
            os.environ.pop(key, None)
