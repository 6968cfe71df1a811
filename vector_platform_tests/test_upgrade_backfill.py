"""`models upgrade` as a real Dagster asset backfill: the CLI records one backfill over three
active collections and a cold one, starts a dagster-daemon for it (none was running), the
multi-run policy packs the three table partitions into one run (the cold collection gets its
new snapshot in a run of its own); one partition fails, and `models retry` re-executes from
failure only what was not materialized (the failed partition's embeddings, not the others').
In that retry one collection's quality gate cannot be measured (the new model's API refuses
its logged query): the others are still gated and swapped, and a second `models retry` runs
only that collection's last step again, which gates it. A rollback then runs under the same
search loop."""

import json
import os
import subprocess
import threading
import time

import dagster as dg

from . import upgrade_data as data
from vector_platform.search import flush_query_log

from .conftest import build_platform, cli, instance_env, write_jsonl

INSTANCE_VARS = ("DAGSTER_HOME", "VP_DAGSTER_PG_URL", "VP_DAGSTER_ARTIFACTS")


class SearchLoop:
    """Searches each collection in turn on a thread of its own, counting errors and empty answers."""

    def __init__(self, vp, names, queries):
        self.vp, self.names, self.queries = vp, names, queries
        self.stop, self.errors, self.empty, self.answers = threading.Event(), [], [], []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        i = 0
        while not self.stop.is_set():
            name, query = self.names[i % len(self.names)], self.queries[i % len(self.queries)]
            try:
                hits = self.vp.search(query, [name], k=10).hits
                if not hits:
                    self.empty.append((name, query))
                self.answers.append({(h.model, h.fingerprint) for h in hits})
            except Exception as err:  # noqa: BLE001 - counted: the test fails on any
                self.errors.append(f"{name}: {err!r}")
            i += 1
            time.sleep(0.05)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(30)


def test_upgrade_backfill_packs_partitions_and_a_retry_redoes_only_the_failed_one(
    pg_server, pg_dsn, tmp_path, unique_name, make_platform
):
    home, env = instance_env(pg_server, pg_dsn, tmp_path, VP_BACKFILL_PARTITIONS_PER_RUN="3")
    mini, flaky = data.server(), data.server(space=data.rotation(seed=3))
    suffix = unique_name[-6:]
    loop = instance = None
    saved_env = {key: os.environ.get(key) for key in INSTANCE_VARS}
    try:
        def run(*args, timeout=600):
            return subprocess.run(cli(*args), env=env, capture_output=True, text=True, timeout=timeout)

        for key, srv in ((f"mini_{suffix}", mini), (f"flaky_{suffix}", flaky)):
            done = run("models", "add", key, "--model-name", f"test-{key}", "--dims", "384", "--base-url", srv.base_url,
                       "--max-tokens", "8191", "--option", "timeout_s=5", "--option", "backoff_base_s=0.05")
            assert done.returncode == 0, done.stderr
        # The collections are set up in this process (a CLI command each would cost seconds of
        # start-up): the Platform the CLI builds, on the same catalog, object store and Dagster
        # instance, with no daemon yet, so in-process runs recorded in that instance, as
        # `vector-platform ingest` and `tier` make them.
        for key in INSTANCE_VARS:
            os.environ[key] = env[key]
        instance = dg.DagsterInstance.from_config(str(home))
        setup = build_platform(pg_dsn, instance, env["VP_OBJECT_STORE"])

        def ingested(name, docs):
            setup.add_collection(name, write_jsonl(tmp_path / f"{name}.jsonl", docs), model=f"mini_{suffix}")
            runs = setup.ingest(name)
            assert all(r.success and r.mode == "in_process" for r in runs), [r.error for r in runs]

        names = [f"{unique_name[:40]}_{c}" for c in "abc"]
        corpus = data.docs_with_judged(360)
        for i, name in enumerate(names):
            docs = corpus[i * 120:(i + 1) * 120]
            if i == 1:  # collection b: every text carries a word the new model's key may not embed
                docs = [{**d, "text": d["text"] + " FORBIDDEN_TOPIC"} for d in docs]
            ingested(name, docs)
        cold = f"{unique_name[:40]}_d"
        ingested(cold, data.docs_with_judged(420)[360:])
        moved = setup.tier(cold, "cold")
        assert moved.success, moved.error
        gate_query = "cancer GATE_DOWN"  # logged for c only: c's gate embeds it with the new model
        assert setup.search(gate_query, [names[2]]).hits
        flush_query_log(setup.pool())

        flaky.faults.forbidden_marker = "FORBIDDEN_TOPIC"
        vp = make_platform()  # the same catalog and object store, searching while the CLI upgrades
        loop = SearchLoop(vp, [*names, cold], list(data.queries().values())[:30]).__enter__()
        done = run("models", "upgrade", *names, cold, "--to", f"flaky_{suffix}", "--wait")
        assert done.returncode == 1, done.stdout + done.stderr[-3000:]
        assert "starting one for this backfill" in done.stderr
        backfill_id = done.stdout.split("backfill ")[1].split(":")[0]
        assert f"models retry {backfill_id}" in done.stdout
        assert all(f"{n}: NOT swapped" in done.stdout for n in names)
        assert f"{cold}: now serving flaky_{suffix}" in done.stdout  # its own run passed its gate

        try:
            backfill = instance.get_backfill(backfill_id)
            assert backfill.tags["vector_platform/upgrade_to"] == f"flaky_{suffix}"
            first_runs = instance.get_runs(dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
            [cold_run] = [r for r in first_runs if r.asset_selection == {dg.AssetKey("cold_snapshot")}]
            assert cold_run.status == dg.DagsterRunStatus.SUCCESS
            assert f"{cold}|flaky_{suffix}" in (cold_run.tags.get("dagster/partition"), cold_run.tags.get("dagster/asset_partition_range_start"))
            [first_run] = [r for r in first_runs if r.run_id != cold_run.run_id]
            # One run for three partitions: the multi-run policy packed the range.
            assert first_run.tags["dagster/asset_partition_range_start"] == f"{names[0]}|flaky_{suffix}"
            assert first_run.tags["dagster/asset_partition_range_end"] == f"{names[2]}|flaky_{suffix}"
            assert first_run.status == dg.DagsterRunStatus.FAILURE

            flaky.faults.forbidden_marker = "GATE_DOWN"  # b's documents pass now; c's logged query does not
            flaky.counters.reset()
            done = run("models", "retry", backfill_id, "--wait")
            assert done.returncode == 1, done.stdout + done.stderr[-3000:]
            retry_id = done.stdout.split("backfill ")[1].split(":")[0]
            assert all(f"{n}: now serving flaky_{suffix}" in done.stdout for n in names[:2])
            assert f"{names[2]}: NOT swapped" in done.stdout  # its gate could not measure: no swap

            retry_runs = instance.get_runs(dg.RunsFilter(tags={"dagster/backfill": retry_id}))
            embedded = set()
            for r in retry_runs:
                for record in instance.get_records_for_run(r.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records:
                    mat = record.event_log_entry.dagster_event.event_specific_data.materialization
                    if mat.asset_key == dg.AssetKey("embeddings"):
                        embedded.add(mat.partition)
            assert embedded == {f"{names[1]}|flaky_{suffix}"}  # a and c were embedded by the first backfill
            b_texts = {t: n for t, n in flaky.counters.texts.items() if "FORBIDDEN_TOPIC" in t}
            assert len(b_texts) == sum(b_texts.values()) == 120  # b's documents went to the model again, once each
            others = set(flaky.counters.texts) - set(b_texts)
            assert others <= set(loop.queries)  # and nothing else but the search loop's (and gates') queries

            flaky.faults.forbidden_marker = None
            done = run("models", "retry", retry_id, "--wait")
            assert done.returncode == 0, done.stdout + done.stderr[-3000:]
            assert f"{names[2]}: now serving flaky_{suffix}" in done.stdout
            again_id = done.stdout.split("backfill ")[1].split(":")[0]
            made = set()
            for r in instance.get_runs(dg.RunsFilter(tags={"dagster/backfill": again_id})):
                for record in instance.get_records_for_run(r.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records:
                    mat = record.event_log_entry.dagster_event.event_specific_data.materialization
                    made.add((mat.asset_key.path[-1], mat.partition))
            assert made == {("hnsw_index", f"{names[2]}|flaky_{suffix}")}  # only c's last step, which its gate checks

            done = run("search", "cancer", "--collection", names[0], "--collection", names[2], "--json")
            assert done.returncode == 0, done.stderr
            assert f'"model": "flaky_{suffix}"' in done.stdout and f"mini_{suffix}" not in done.stdout
            assert run("models", "rollback", names[0]).returncode == 0  # under the search loop
        finally:
            loop.__exit__()
        # Through the first backfill, its failure, two retries, four swaps and a rollback: no
        # search failed or came back empty, and no answer mixed two models.
        assert loop.errors == [] and loop.empty == [], (loop.errors[:3], loop.empty[:3])
        assert len(loop.answers) > 50 and all(len(models) == 1 for models in loop.answers)
        assert {m for a in loop.answers for m, _ in a} == {f"mini_{suffix}", f"flaky_{suffix}"}

        done = run("search", "cancer", "--collection", cold, "--json")
        hits = json.loads(done.stdout)["hits"]
        assert hits and {(h["source_tier"], h["model"]) for h in hits} == {("cold", f"flaky_{suffix}")}

        # the rollback was one transaction: the old model serves again
        mini_fp = next(fp for answer in loop.answers for model, fp in answer if model == f"mini_{suffix}")
        assert {(h.model, h.fingerprint) for h in vp.search("cancer", [names[0]]).hits} == {(f"mini_{suffix}", mini_fp)}
    finally:
        if loop is not None:
            loop.__exit__()
        if instance is not None:
            instance.dispose()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        mini.stop()
        flaky.stop()
