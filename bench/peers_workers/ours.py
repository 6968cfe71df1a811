"""bench/peers.py worker for the platform itself (runs on the product's venv).

The product's real path: a `Platform` with a collection over the JSONL of the documents,
`ingest` through the Dagster jobs in-process (source_documents, chunks, embeddings,
vector_table, hnsw_index with its checks, serving_view), `Platform.search(vector=...)`.

Modes (job["mode"]):
- `precomputed`: the embedder resource looks the shared precomputed vectors up by text (as
  the tests' fake embedder plugs in); one chunk per document (chunk_max_tokens above the
  longest abstract), so every system stores the same 5,183 vectors. Phases: ingest,
  ef_search tuning + latency (with the bare SQL query on the same view interleaved), re-ingest
  unchanged, re-ingest after 1 % of the documents changed, integrity counts.
- `live`: the bundled local model (the default embedder resource, batch 64), default
  chunking (the model's 256-token window); documents -> searchable only.
  The embedding-only baseline (the same model, batch size and chunk texts, nothing else) is
  timed in the same process just before and just after the ingest.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VP_RUN_MODE", "in_process")

import jobkit  # noqa: E402
from jobkit import log  # noqa: E402

NAME = "peers_ours"


def embed_only(embedder, texts: list[str], batch: int) -> float:
    """Seconds to embed `texts` with the model alone, in pipeline-sized batches."""
    started = time.perf_counter()
    for start in range(0, len(texts), batch):
        embedder.embed(texts[start : start + batch])
    return time.perf_counter() - started


def live_chunk_texts(docs: list[dict], max_tokens: int, overlap: int) -> list[str]:
    """The chunks the ingest will make (the same chunker, settings and ids)."""
    from vector_platform.ingest.embedders import LocalEmbedder
    from vector_platform.models import MINILM

    chunker = LocalEmbedder(MINILM).make_chunker(max_tokens, overlap)
    return [c.text for d in docs for c in chunker.split(NAME, str(d["id"]), jobkit.full_text(d))]


def make_platform(job: dict, work: Path):
    import dagster as dg

    from vector_platform.api import Platform
    from vector_platform.defs.resources import EmbedderResource, ObjectStoreResource, PostgresResource

    if job["mode"] == "precomputed":
        from lookup_embedder import LookupEmbedderResource

        embedder = LookupEmbedderResource(lookup_texts=job["lookup_texts"], lookup_vectors=job["lookup_vectors"])
    else:
        embedder = EmbedderResource(batch_size=job["batch_size"])
    resources = {
        "postgres": PostgresResource(dsn=job["dsn"]),
        "object_store": ObjectStoreResource(url=(work / "objects").as_uri()),
        "embedder": embedder,
    }
    instance = dg.DagsterInstance.ephemeral()
    return Platform(resources=resources, instance=instance), instance


def step_times(instance, runs, started_epoch: float) -> dict:
    """Per asset step: seconds; plus when (after `started_epoch`) vector_table finished."""
    import dagster as dg

    out: dict = {"steps": {}}
    for run in runs:
        starts = {}
        for entry in instance.all_logs(run.run_id):
            event = entry.dagster_event
            if event is None or event.step_key is None:
                continue
            if event.event_type == dg.DagsterEventType.STEP_START:
                starts[event.step_key] = entry.timestamp
            elif event.event_type == dg.DagsterEventType.STEP_SUCCESS:
                out["steps"][event.step_key] = round(entry.timestamp - starts[event.step_key], 3)
                if event.step_key == "vector_table":
                    out["loaded_after_s"] = round(entry.timestamp - started_epoch, 3)
    return out


def ingest(vp, instance) -> tuple[float, dict]:
    started_epoch, started = time.time(), time.perf_counter()
    runs = vp.ingest(NAME)
    seconds = time.perf_counter() - started
    for run in runs:
        if not run.success:
            raise SystemExit(f"{run.job} failed: {run.error}")
    steps = step_times(instance, runs, started_epoch)
    log(f"ingest: {seconds:.2f} s, steps {steps['steps']}")
    steps["runs"] = runs
    return round(seconds, 3), steps


def runs_metadata(runs, asset: str) -> dict:
    for run in runs:
        if asset in run.metadata:
            return {k: v for k, v in run.metadata[asset].items() if isinstance(v, (int, float, str))}
    return {}


def table_rows(vp) -> list[tuple[str, str]]:
    from psycopg import sql

    from vector_platform import tables

    with vp.pool().connection() as conn:
        return conn.execute(sql.SQL("SELECT doc_id, text FROM {}").format(tables.view_id(NAME))).fetchall()


def main() -> None:
    job = jobkit.load_job()
    work = Path(tempfile.mkdtemp(prefix="vp-peers-ours-"))
    source = work / "documents.jsonl"
    shutil.copyfile(job["docs"], source)
    watch = jobkit.Stopwatch()
    result: dict = {"system": "ours", "mode": job["mode"]}
    try:
        vp, instance = make_platform(job, work)
        with watch("setup"):
            vp.pool()  # the catalog's one-time bootstrap on this database
        if job["mode"] == "live":
            # The peers reach the model through a server that loaded it beforehand: load it
            # here too (the process-wide model cache keeps it for the ingest), timed apart.
            from vector_platform.models import MINILM

            embedder = vp.embedder.for_model(MINILM)
            with watch("model_load"):
                embedder._model()
                embedder.embed(["warm-up"])
            result["model_load_s"] = watch.seconds["model_load"]
            # The physical limit: the same model and batch size on the same chunk texts, just
            # before and just after the ingest (the machine is shared: its load drifts).
            texts = live_chunk_texts(jobkit.read_docs(job["docs"]), MINILM.max_tokens, job["chunk_overlap"])
            result["embed_only_before_s"] = round(embed_only(embedder, texts, job["batch_size"]), 3)
            log(f"embed only: {len(texts)} chunks in {result['embed_only_before_s']:.2f} s")
        with watch("declare"):
            settings = {"hnsw_m": job["hnsw_m"], "hnsw_ef_construction": job["hnsw_ef_construction"]}
            if job["mode"] == "precomputed":
                settings["chunk_max_tokens"] = job["one_chunk_max_tokens"]
            vp.add_collection(NAME, source, **settings)
        seconds, steps = ingest(vp, instance)
        last_runs = steps["runs"]
        result.update(ingest_s=round(seconds + watch.seconds["declare"], 3), steps=steps["steps"],
                      load_s=round(steps["loaded_after_s"] + watch.seconds["declare"], 3))
        result["peak_rss_after_ingest_mib"] = jobkit.peak_rss_mib()
        rows = table_rows(vp)
        result["rows"] = len(rows)
        if job["mode"] == "live":
            result["embed_only_after_s"] = round(embed_only(embedder, texts, job["batch_size"]), 3)
            log(f"embed only: {len(texts)} chunks in {result['embed_only_after_s']:.2f} s")
            embedding_step = runs_metadata(last_runs, "embeddings")
            result.update(chunks=len(rows), embed_only_chunks=len(texts), batch_size=job["batch_size"],
                          embedding_step=embedding_step, model_calls_s=round(embedding_step.get("seconds_embedding", 0.0), 3))
            jobkit.emit(result)
            return
        jobkit.analyze(job["dsn"])
        tuned, runners = search(vp, job)
        result.update(tuned)
        # The tuning above changed ef_search and logged searches: the first ingest after it measures
        # recall anew (at the new value, on the new sample), as it would for a user. The row is the
        # steady state, a re-ingest with nothing changed since the last one; the first is kept too.
        result["reingest_after_tuning_s"], steps = ingest(vp, instance)
        result["reingest_after_tuning_steps"] = steps["steps"]
        result["reingest_same_s"], steps = ingest(vp, instance)
        result["reingest_same_steps"] = steps["steps"]
        result["after_twice"] = jobkit.integrity(table_rows(vp), jobkit.read_docs(job["docs"]))
        shutil.copyfile(job["docs_changed"], source)  # the source now has 1 % of its documents edited
        result["reingest_changed_s"], steps = ingest(vp, instance)
        result["reingest_changed_steps"] = steps["steps"]
        result["after_change"] = jobkit.integrity(table_rows(vp), jobkit.read_docs(job["docs_changed"]))
        result["setup_s"] = watch.seconds["setup"]
        result["settings"] = {
            "runs": "Platform.ingest: the Dagster jobs in this process (in-process run mode, ephemeral instance)",
            "chunking": f"one chunk per document (chunk_max_tokens {job['one_chunk_max_tokens']})",
            "embedder": "lookup of the shared vectors, batch 64 (EmbedderResource default)",
            "load": "vector_table asset: binary COPY, 20,000 rows per transaction (product default)",
            "index": f"hnsw_index asset after the load, m {job['hnsw_m']}, ef_construction {job['hnsw_ef_construction']}, cosine",
        }
        jobkit.serve(runners, result["ef_search"], job)
        jobkit.emit(result)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def search(vp, job: dict) -> tuple[dict, dict]:
    """ef_search tuned through the collection's own setting; the searches to time: ours, and
    the bare query (the platform's SELECT on the same serving view, same planner settings,
    one connection) timed next to it."""
    import psycopg
    from pgvector.psycopg import register_vector
    from psycopg import sql

    from vector_platform import search as search_pkg
    from vector_platform import tables
    from vector_platform.models import MINILM
    from vector_platform.search import active

    view = tables.view_id(NAME)
    bare = psycopg.connect(job["dsn"], autocommit=True)
    register_vector(bare)
    session: dict[str, str] = {}
    bare_sql = sql.SQL(
        "SELECT chunk_id, doc_id, text, metadata, embedding <=> %(q)s::vector AS distance FROM {rel} "
        "ORDER BY embedding <=> %(q)s::vector LIMIT %(k)s"
    ).format(rel=view)
    current = {"ef": None}
    k = job["k"]

    def ours(q, ef):
        if current["ef"] != ef:
            vp.set_settings(NAME, hnsw_ef_search=ef)
            search_pkg.runtime(vp.pool()).facts.invalidate(NAME)  # do not wait for the catalog's notice
            current["ef"] = ef
        return [h.doc_id for h in vp.search(vector=q, collections=[NAME], k=k).hits]

    def bare_query(q, ef):
        active._apply_settings(bare, active.plan_settings(False, ef, iterative=False), session)
        return bare.execute(bare_sql, {"q": q, "k": k}, prepare=False).fetchall()

    out = jobkit.tune(ours, job)
    queries = jobkit.np.load(job["queries"]).astype("float32")
    plan = active.explain_nearest(bare, view, MINILM, queries[0], exact=False, ef_search=out["ef_search"])
    out["plan_uses_hnsw"] = "hnsw" in plan.lower()
    return out, {"search": ours, "bare_sql": bare_query}


if __name__ == "__main__":
    main()
