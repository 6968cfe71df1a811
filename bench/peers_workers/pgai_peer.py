"""bench/peers.py worker for pgai's vectorizer (runs on bench/.venv-peers).

pgai's documented set-up: `pgai.install(db_url)` puts its catalog in the database, the
documents live in an ordinary table, `ai.create_vectorizer(...)` adds triggers that queue
every inserted or updated row, and the vectorizer worker (`Worker(db_url, once=True)`, what
`pgai vectorizer worker --once` runs, here in this process) embeds the queue into
`<table>_embedding_store` (view `<table>_embedding`). The application loads the documents
with COPY (the bulk path PostgreSQL offers); a re-ingest is an upsert that only touches rows
whose text changed (`ON CONFLICT ... DO UPDATE ... WHERE ... IS DISTINCT FROM`), so unchanged
rows are never queued. Without TimescaleDB (not in this server) pgai's own index creation
(`ai.indexing_hnsw`, run by a TimescaleDB job) is unavailable, so the HNSW index is created
on the store table after the first load, as pgai's docs say to do with `scheduling_none`.
Search: SQL on the view, `ORDER BY embedding <=> query LIMIT k` (pgai has no search API).

Embeddings: pgai can only embed through a provider (OpenAI-compatible, Ollama, …): it calls
bench/peers_workers/embed_server.py on 127.0.0.1 — the precomputed vectors by text, or the
live model.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jobkit  # noqa: E402

TABLE = "scifact"
STORE = f"{TABLE}_embedding_store"
VIEW = f"{TABLE}_embedding"


def setup(job: dict) -> None:
    import psycopg

    chunking = ("ai.chunking_none()" if job["mode"] == "precomputed" else
                f"ai.chunking_recursive_character_text_splitter({job['pgai_chunk_chars']}, {job['pgai_chunk_overlap_chars']})")
    with psycopg.connect(job["dsn"], autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {TABLE} (id text PRIMARY KEY, title text, body text NOT NULL)")
        conn.execute(
            f"""SELECT ai.create_vectorizer(
                    '{TABLE}'::regclass,
                    loading => ai.loading_column('body'),
                    parsing => ai.parsing_none(),
                    chunking => {chunking},
                    formatting => ai.formatting_python_template('$chunk'),
                    embedding => ai.embedding_openai('all-MiniLM-L6-v2', 384, base_url => %s),
                    indexing => ai.indexing_none(),
                    scheduling => ai.scheduling_none(),
                    processing => ai.processing_default(batch_size => %s))""",
            (job["embed_url"], job["pgai_batch_size"]),
        )


def load(job: dict, path: str, first: bool) -> int:
    """The application's write: COPY (first load) or COPY into a temporary table and an
    upsert that leaves unchanged rows alone. Returns rows inserted or changed."""
    import psycopg

    docs = jobkit.read_docs(path)
    with psycopg.connect(job["dsn"]) as conn:
        target = TABLE if first else "incoming"
        if not first:
            conn.execute(f"CREATE TEMPORARY TABLE incoming (LIKE {TABLE}) ON COMMIT DROP")
        with conn.cursor().copy(f"COPY {target} (id, title, body) FROM STDIN") as copy:
            for d in docs:
                copy.write_row((str(d["id"]), d["title"], jobkit.full_text(d)))
        if first:
            return len(docs)
        return conn.execute(
            f"""INSERT INTO {TABLE} AS t SELECT * FROM incoming ON CONFLICT (id) DO UPDATE
                SET title = EXCLUDED.title, body = EXCLUDED.body
                WHERE (t.title, t.body) IS DISTINCT FROM (EXCLUDED.title, EXCLUDED.body)""").rowcount


def vectorize(job: dict) -> None:
    """The vectorizer worker until the queue is empty; its error, if any, fails the job."""
    from pgai.vectorizer import Worker

    error = asyncio.run(Worker(job["dsn"], once=True).run())
    if error is not None:
        raise RuntimeError(f"pgai vectorizer worker: {error}")
    pending, failures = queue_state(job)
    if pending or failures:
        raise RuntimeError(f"pgai vectorizer left {pending} queued rows and {failures} errors: {last_errors(job)}")


def queue_state(job: dict) -> tuple[int, int]:
    import psycopg

    with psycopg.connect(job["dsn"]) as conn:
        pending = conn.execute("SELECT ai.vectorizer_queue_pending(id) FROM ai.vectorizer").fetchone()[0]
        failures = conn.execute("SELECT count(*) FROM ai.vectorizer_errors").fetchone()[0]
    return pending, failures


def last_errors(job: dict) -> str:
    import psycopg

    with psycopg.connect(job["dsn"]) as conn:
        return "; ".join(f"{m}: {d}" for m, d in conn.execute(
            "SELECT message, details::text FROM ai.vectorizer_errors ORDER BY recorded DESC LIMIT 3"))


def build_index(job: dict) -> None:
    import psycopg

    with psycopg.connect(job["dsn"], autocommit=True) as conn:
        conn.execute(f"CREATE INDEX {STORE}_embedding_idx ON {STORE} USING hnsw (embedding vector_cosine_ops) "
                     f"WITH (m = {int(job['hnsw_m'])}, ef_construction = {int(job['hnsw_ef_construction'])})")


def table_rows(job: dict) -> list[tuple[str, str]]:
    import psycopg

    with psycopg.connect(job["dsn"]) as conn:
        return conn.execute(f"SELECT id, chunk FROM {STORE}").fetchall()


def main() -> None:
    job = jobkit.load_job()
    os.environ.setdefault("OPENAI_API_KEY", "bench")  # the local server takes any key
    from importlib.metadata import version

    import pgai.vectorizer  # noqa: F401 - imports are not timed

    watch = jobkit.Stopwatch()
    result: dict = {"system": "pgai", "mode": job["mode"], "versions": {"pgai": version("pgai")}}
    with watch("install"):
        import pgai

        pgai.install(job["dsn"])  # once per database: not part of any ingest
    with watch("ingest"):
        setup(job)
        with watch("load"):
            load(job, job["docs"], first=True)
            vectorize(job)
        with watch("hnsw_build"):
            build_index(job)
    result["peak_rss_after_ingest_mib"] = jobkit.peak_rss_mib()
    rows = table_rows(job)
    result.update(setup_s=watch.seconds["install"], ingest_s=watch.seconds["ingest"], load_s=watch.seconds["load"],
                  index_s=watch.seconds["hnsw_build"], rows=len(rows))
    if job["mode"] == "live":
        result["chunks"] = len(rows)
        jobkit.emit(result)
        return
    jobkit.analyze(job["dsn"])
    tuned, runners = search(job)
    result.update(tuned)
    with watch("reingest_same"):
        result["reingest_same_rows_touched"] = load(job, job["docs"], first=False)
        vectorize(job)
    result["reingest_same_s"] = watch.seconds["reingest_same"]
    result["after_twice"] = jobkit.integrity(table_rows(job), jobkit.read_docs(job["docs"]))
    with watch("reingest_changed"):
        result["reingest_changed_rows_touched"] = load(job, job["docs_changed"], first=False)
        vectorize(job)
    result["reingest_changed_s"] = watch.seconds["reingest_changed"]
    result["after_change"] = jobkit.integrity(table_rows(job), jobkit.read_docs(job["docs_changed"]))
    result["settings"] = {
        "vectorizer": "loading_column('body'), parsing_none, chunking_none (one chunk per document), "
                      "formatting '$chunk', embedding_openai via the local server, scheduling_none, indexing_none",
        "processing": f"processing_default(batch_size => {job['pgai_batch_size']}) (default 50; 500 loaded 1.1-1.5x "
                      "faster in a trial), concurrency 1 (default)",
        "load": "COPY into the source table; re-ingest: COPY to a temporary table + upsert of changed rows only",
        "index": f"CREATE INDEX ... USING hnsw (embedding vector_cosine_ops) WITH (m {job['hnsw_m']}, "
                 f"ef_construction {job['hnsw_ef_construction']}) after the first load",
    }
    jobkit.serve(runners, result["ef_search"], job)
    jobkit.emit(result)


def search(job: dict) -> tuple[dict, dict]:
    import psycopg
    from pgvector.psycopg import register_vector

    conn = psycopg.connect(job["dsn"], autocommit=True)
    register_vector(conn)
    k = job["k"]
    current = {"ef": None}
    query_sql = f"SELECT id, chunk, embedding <=> %(q)s AS distance FROM {VIEW} ORDER BY distance LIMIT %(k)s"

    def query(q, ef):
        if current["ef"] != ef:
            conn.execute(f"SET hnsw.ef_search = {int(ef)}")
            current["ef"] = ef
        return [row[0] for row in conn.execute(query_sql, {"q": q, "k": k})]

    out = jobkit.tune(query, job)
    queries = jobkit.np.load(job["queries"]).astype("float32")
    plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + query_sql, {"q": queries[0], "k": k}))
    out["plan_uses_hnsw"] = "embedding_idx" in plan
    return out, {"search": query}


if __name__ == "__main__":
    main()
