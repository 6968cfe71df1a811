"""The embedded server has a lifecycle: `vector-platform db start|stop|status`, and `status`
says where it runs. Each test here uses its own VP_HOME and stops what it starts."""

import json
import os
import subprocess

import psycopg

from .conftest import cli


def _env(home):
    env = {k: v for k, v in os.environ.items() if k not in ("VP_PG_DSN", "DAGSTER_HOME", "VP_DAGSTER_PG_URL")}
    env.update(VP_HOME=str(home), HF_HUB_OFFLINE="1")
    return env


def test_db_start_status_stop_on_a_fresh_vp_home(tmp_path):
    home = tmp_path / "vp"
    env = _env(home)
    try:
        status = json.loads(subprocess.run(cli("db", "status", "--json"), env=env, capture_output=True, text=True, check=True).stdout)
        assert status["running"] is False and status["initialised"] is False

        started = subprocess.run(cli("db", "start"), env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stderr[-2000:]
        status = json.loads(subprocess.run(cli("db", "status", "--json"), env=env, capture_output=True, text=True, check=True).stdout)
        assert status["running"] is True and status["data_dir"] == str((home / "pg").resolve())
        with psycopg.connect(f"postgresql://postgres@/vector_platform?host={status['socket_dir']}") as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)

        # `status` of the platform says where the server runs.
        out = subprocess.run(cli("status"), env=env, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0 and f"pid {status['pid']}" in out.stdout

        stopped = subprocess.run(cli("db", "stop"), env=env, capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0 and "stopped" in stopped.stdout
        status = json.loads(subprocess.run(cli("db", "status", "--json"), env=env, capture_output=True, text=True, check=True).stdout)
        assert status["running"] is False and status["initialised"] is True
        again = subprocess.run(cli("db", "stop"), env=env, capture_output=True, text=True)
        assert again.returncode == 0 and "was not running" in again.stdout
    finally:
        subprocess.run(cli("db", "stop"), env=env, capture_output=True)
