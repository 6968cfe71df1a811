"""bench/peers.py worker for LlamaIndex (runs on bench/.venv-peers).

The documented way to keep a Postgres vector store in step with a document source:
`IngestionPipeline(transformations=[splitter, embed_model], docstore=PostgresDocumentStore,
vector_store=PGVectorStore)` with the default `DocstoreStrategy.UPSERTS`: the docstore keeps
each document's hash, unchanged documents are skipped, changed ones are deleted from the
vector store by `ref_doc_id` and inserted again. PGVectorStore's `hnsw_kwargs` create the
HNSW index with the table (its documented way to get one), so rows are indexed as they are
inserted. Search: `PGVectorStore.query(VectorStoreQuery(query_embedding=...), hnsw_ef_search=ef)`.

Settings: SentenceSplitter with the MiniLM tokenizer (its default, tiktoken, needs the
network) — chunk_size 8192 in the precomputed run (one node per document), 256 / overlap 32
in the live run; embed_batch_size 64 (LlamaIndex's default is 10); the embedding is a
custom `BaseEmbedding` over the lookup (precomputed) or the live model's local server.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jobkit  # noqa: E402

TABLE = "scifact"  # PGVectorStore prefixes "data_"


def build(job: dict, embed):
    from llama_index.core.embeddings import BaseEmbedding
    from llama_index.core.ingestion import IngestionPipeline
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.storage.docstore.postgres import PostgresDocumentStore
    from llama_index.storage.kvstore.postgres import PostgresKVStore
    from llama_index.vector_stores.postgres import PGVectorStore
    from pydantic import PrivateAttr

    class SharedEmbedding(BaseEmbedding):
        """The benchmark's embedding function (lookup or live model) as a LlamaIndex embedding."""

        _embed = PrivateAttr()

        def __init__(self, embed, **kwargs):
            super().__init__(**kwargs)
            self._embed = embed

        def _get_text_embeddings(self, texts):
            return self._embed(texts).tolist()

        def _get_text_embedding(self, text):
            return self._get_text_embeddings([text])[0]

        def _get_query_embedding(self, query):
            return self._get_text_embedding(query)

        async def _aget_query_embedding(self, query):
            return self._get_query_embedding(query)

    sync_url = jobkit.sqlalchemy_url(job["dsn"], "psycopg2")
    async_url = jobkit.sqlalchemy_url(job["dsn"], "asyncpg")
    vector_store = PGVectorStore(
        connection_string=sync_url, async_connection_string=async_url, table_name=TABLE, embed_dim=384,
        use_jsonb=True,
        hnsw_kwargs={"hnsw_m": job["hnsw_m"], "hnsw_ef_construction": job["hnsw_ef_construction"],
                     "hnsw_ef_search": 40, "hnsw_dist_method": "vector_cosine_ops"},
    )
    docstore = PostgresDocumentStore(
        PostgresKVStore(table_name="docstore", connection_string=sync_url, async_connection_string=async_url, use_jsonb=True),
        namespace=TABLE,
    )
    if job["mode"] == "precomputed":
        splitter = SentenceSplitter(chunk_size=job["one_chunk_max_tokens"], chunk_overlap=0, tokenizer=_token_list(job))
    else:
        splitter = SentenceSplitter(chunk_size=job["chunk_tokens"], chunk_overlap=job["chunk_overlap"], tokenizer=_token_list(job))
    pipeline = IngestionPipeline(
        transformations=[splitter, SharedEmbedding(embed, embed_batch_size=job["batch_size"])],
        docstore=docstore, vector_store=vector_store,
    )
    return pipeline, vector_store


def _token_list(job: dict):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(job["tokenizer_json"])
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return lambda text: tokenizer.encode(text, add_special_tokens=False).ids


def documents(path: str):
    from llama_index.core import Document

    return [Document(text=jobkit.full_text(d), id_=str(d["id"])) for d in jobkit.read_docs(path)]


def ingest(job: dict, embed, path: str) -> int:
    """One ingest as a job would run it: stores and pipeline built, documents read, run."""
    pipeline, _ = build(job, embed)
    nodes = pipeline.run(documents=documents(path))
    return len(nodes)


def table_rows(job: dict) -> list[tuple[str, str]]:
    import psycopg

    with psycopg.connect(job["dsn"]) as conn:
        return conn.execute(f"SELECT metadata_->>'ref_doc_id', text FROM data_{TABLE}").fetchall()


def main() -> None:
    job = jobkit.load_job()
    import llama_index.core
    import llama_index.vector_stores.postgres  # noqa: F401 - imports are not timed
    from importlib.metadata import version

    embed = jobkit.embedder_for(job)
    watch = jobkit.Stopwatch()
    result: dict = {"system": "llamaindex", "mode": job["mode"],
                    "versions": {p: version(p) for p in ("llama-index-core", "llama-index-vector-stores-postgres",
                                                          "llama-index-storage-docstore-postgres")}}
    with watch("ingest"):
        written = ingest(job, embed, job["docs"])
    result["peak_rss_after_ingest_mib"] = jobkit.peak_rss_mib()
    rows = table_rows(job)
    result.update(ingest_s=watch.seconds["ingest"], load_s=watch.seconds["ingest"], rows=len(rows), nodes_written=written)
    if job["mode"] == "live":
        result["chunks"] = len(rows)
        jobkit.emit(result)
        return
    jobkit.analyze(job["dsn"])
    tuned, runners = search(job)
    result.update(tuned)
    with watch("reingest_same"):
        result["reingest_same_nodes"] = ingest(job, embed, job["docs"])
    result["reingest_same_s"] = watch.seconds["reingest_same"]
    result["after_twice"] = jobkit.integrity(table_rows(job), jobkit.read_docs(job["docs"]))
    with watch("reingest_changed"):
        result["reingest_changed_nodes"] = ingest(job, embed, job["docs_changed"])
    result["reingest_changed_s"] = watch.seconds["reingest_changed"]
    result["after_change"] = jobkit.integrity(table_rows(job), jobkit.read_docs(job["docs_changed"]))
    result["settings"] = {
        "pipeline": "IngestionPipeline, docstore PostgresDocumentStore, DocstoreStrategy.UPSERTS (default)",
        "chunking": f"SentenceSplitter chunk_size {job['one_chunk_max_tokens']} (one node per document), MiniLM tokenizer",
        "embedder": f"custom BaseEmbedding over the lookup, embed_batch_size {job['batch_size']}",
        "load": "PGVectorStore.add (SQLAlchemy ORM session, one transaction for the run's nodes)",
        "index": f"hnsw_kwargs: HNSW created with the table (before the rows), m {job['hnsw_m']}, "
                 f"ef_construction {job['hnsw_ef_construction']}, vector_cosine_ops",
    }
    jobkit.serve(runners, result["ef_search"], job)
    jobkit.emit(result)


def search(job: dict) -> tuple[dict, dict]:
    import psycopg
    from llama_index.core.vector_stores.types import VectorStoreQuery

    _, vector_store = build(job, None)
    k = job["k"]

    def query(q, ef):
        found = vector_store.query(VectorStoreQuery(query_embedding=q.tolist(), similarity_top_k=k), hnsw_ef_search=ef)
        return [node.ref_doc_id for node in found.nodes]

    out = jobkit.tune(query, job)
    with psycopg.connect(job["dsn"]) as conn:  # the plan of its query shape, under its settings
        conn.execute(f"SET hnsw.ef_search = {int(out['ef_search'])}")
        conn.execute("SET enable_bitmapscan = off")
        vec = "[" + ",".join("0.05" for _ in range(384)) + "]"
        plan = "\n".join(r[0] for r in conn.execute(
            f"EXPLAIN SELECT id FROM data_{TABLE} ORDER BY embedding <=> '{vec}'::vector LIMIT {k}"))
    out["plan_uses_hnsw"] = "embedding_idx" in plan or "hnsw" in plan.lower()
    return out, {"search": query}


if __name__ == "__main__":
    main()
