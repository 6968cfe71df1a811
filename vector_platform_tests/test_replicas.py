"""Search on read replicas: a real streaming replica of the embedded server (pg_basebackup from
the same installation) serves searches; a replica whose replay is paused falls behind and is
skipped once it lags more than max_replica_lag_s; `consistent` reads the primary; a replica
that stops is skipped without an error; writes never go to it."""

import subprocess
import time

import psycopg

from vector_platform import replicas
from vector_platform.api import Platform
from vector_platform.defs.resources import ObjectStoreResource, PostgresResource
from vector_platform.settings import read_dsns

from .conftest import FakeEmbedderResource, cli, cli_env, write_jsonl
from .replica import Replica


def _docs(start: int, n: int) -> list[dict]:
    return [{"id": f"doc{i}", "text": f"Document number {i} about topic {i % 7}."} for i in range(start, start + n)]


def _platform(pg_dsn, instance, tmp_path, read_dsn: str, max_lag_s: float) -> Platform:
    return Platform(resources={
        "postgres": PostgresResource(dsn=pg_dsn, read_dsn=read_dsn, max_replica_lag_s=max_lag_s),
        "object_store": ObjectStoreResource(url=(tmp_path / "objects").as_uri()),
        "embedder": FakeEmbedderResource(),
    }, instance=instance)


def _seen(result) -> set[str]:
    return {h.doc_id for h in result.hits}


def test_read_dsns_are_split_on_semicolons():
    assert read_dsns("") == [] and read_dsns("  ") == []
    assert read_dsns("postgresql://a@h1/db; host=/tmp port=5433 dbname=x ;") == [
        "postgresql://a@h1/db", "host=/tmp port=5433 dbname=x"]
    assert replicas.label_of("postgresql://u:secret@db.example:6432/vp") == "db.example:6432/vp"


def test_searches_are_served_by_a_streaming_replica_and_by_the_primary_when_it_lags_or_stops(
        pg_server, pg_dsn, dagster_instance, tmp_path, unique_name):
    database = psycopg.conninfo.conninfo_to_dict(pg_dsn)["dbname"]
    replica = Replica(pg_server, tmp_path / "standby")
    try:
        replica_dsn = replica.dsn(database)
        assert replica.execute(database, "SELECT pg_is_in_recovery()") == [(True,)]
        vp = _platform(pg_dsn, dagster_instance, tmp_path, replica_dsn, max_lag_s=1.0)
        patient = _platform(pg_dsn, dagster_instance, tmp_path, replica_dsn, max_lag_s=3600.0)
        name = unique_name
        source = write_jsonl(tmp_path / "docs.jsonl", _docs(0, 20))
        vp.add_collection(name, source)
        assert all(r.success for r in vp.ingest(name))  # writes go to the primary (a standby refuses them)
        replica.wait_caught_up(pg_dsn, database)

        first = vp.search("topic 3", [name], k=50)
        assert first.stats["read_from"]["server"].startswith("replica "), first.stats
        assert _seen(first) == {f"doc{i}" for i in range(20)} and not [w for w in first.warnings if "skipped" in w]

        # the replica stops replaying: what the primary writes now, it does not see
        replica.execute(database, "SELECT pg_wal_replay_pause()")
        write_jsonl(source, _docs(0, 25))
        assert all(r.success for r in vp.ingest(name))
        stale = patient.search("topic 3", [name], k=50)  # a lag it accepts: still the replica, without doc20-24
        assert stale.stats["read_from"]["server"].startswith("replica ")
        assert _seen(stale) == {f"doc{i}" for i in range(20)}
        fresh = patient.search("topic 3", [name], k=50, consistent=True)  # must see the ingest: the primary
        assert fresh.stats["read_from"]["server"] == "primary"
        assert _seen(fresh) == {f"doc{i}" for i in range(25)}

        # past max_replica_lag_s the replica is skipped, with a warning that says why
        time.sleep(1.5 + replicas.CHECK_EVERY_S)
        skipped = vp.search("topic 3", [name], k=50)
        assert skipped.stats["read_from"]["server"] == "primary"
        assert _seen(skipped) == {f"doc{i}" for i in range(25)}
        assert any("behind the primary" in w and "max_replica_lag_s 1" in w for w in skipped.warnings), skipped.warnings

        # replay resumes: the replica catches up and serves again
        replica.execute(database, "SELECT pg_wal_replay_resume()")
        replica.wait_caught_up(pg_dsn, database)
        time.sleep(replicas.CHECK_EVERY_S)
        back = vp.search("topic 3", [name], k=50)
        assert back.stats["read_from"]["server"].startswith("replica ") and _seen(back) == {f"doc{i}" for i in range(25)}

        # the CLI and its --consistent flag read the same way
        env = {**cli_env(pg_dsn, tmp_path), "VP_PG_READ_DSN": replica_dsn}
        shown = subprocess.run(cli("search", "topic 3", "--collection", name, "--json", "-k", "50"), env=env,
                               capture_output=True, text=True, timeout=300)
        assert shown.returncode == 0, shown.stderr
        assert '"server": "replica ' in shown.stdout
        shown = subprocess.run(cli("search", "topic 3", "--collection", name, "--json", "-k", "50", "--consistent"),
                               env=env, capture_output=True, text=True, timeout=300)
        assert shown.returncode == 0 and '"server": "primary"' in shown.stdout, shown.stdout + shown.stderr

        # the replica goes away mid-life: searches carry on, on the primary, with a warning
        replica.stop("immediate")
        gone = vp.search("topic 3", [name], k=50)
        assert gone.stats["read_from"]["server"] == "primary" and _seen(gone) == {f"doc{i}" for i in range(25)}
        assert any("unreachable" in w for w in gone.warnings), gone.warnings
        assert "secret" not in " ".join(gone.warnings)
    finally:
        try:
            replica.stop("immediate")
        except Exception:  # noqa: BLE001 - already stopped
            pass
        replica.remove_socket_dir()
