"""bench/peers.py worker for LangChain (runs on bench/.venv-peers).

`langchain-postgres`' maintained store, `PGVectorStore` (its README: "In v0.0.14+, `PGVector`
is deprecated. Please migrate to `PGVectorStore`"), on a `PGEngine` (SQLAlchemy async,
psycopg 3), kept in step with the source by LangChain's indexing API: `index(docs,
SQLRecordManager, store, cleanup="incremental", source_id_key="source")`, which skips
unchanged documents, writes changed ones and deletes their old rows (the record manager's
table lives in the same database). The HNSW index is applied after the first load
(`apply_vector_index(HNSWIndex(m, ef_construction))`, the how-to's order; pgvector builds an
index faster over loaded rows); later writes go through it. Search:
`similarity_search_by_vector`, ef_search through `index_query_options=HNSWQueryOptions`.

Settings: documents go in as they are in the precomputed run (one row per document); the
live run splits with RecursiveCharacterTextSplitter at 254 / 32 MiniLM tokens (its
`length_function`); index(batch_size=64) and an `Embeddings` subclass over the lookup or the
live model's local server.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jobkit  # noqa: E402

TABLE = "scifact"


def make_embeddings(embed, batch: int):
    from langchain_core.embeddings import Embeddings

    class SharedEmbeddings(Embeddings):
        """The benchmark's embedding function (lookup or live model) as LangChain Embeddings."""

        def embed_documents(self, texts):
            out = []
            for start in range(0, len(texts), batch):
                out.extend(embed(texts[start : start + batch]).tolist())
            return out

        def embed_query(self, text):
            return embed([text])[0].tolist()

    return SharedEmbeddings()


def documents(job: dict, path: str):
    from langchain_core.documents import Document

    docs = [Document(page_content=jobkit.full_text(d), metadata={"source": str(d["id"])}) for d in jobkit.read_docs(path)]
    if job["mode"] == "live":
        from langchain_text_splitters import RecursiveCharacterTextSplitter

        splitter = RecursiveCharacterTextSplitter(
            chunk_size=job["chunk_tokens"], chunk_overlap=job["chunk_overlap"], length_function=jobkit.minilm_token_counter(job))
        docs = splitter.split_documents(docs)
    return docs


class LangChainSide:
    def __init__(self, job: dict, embed):
        from langchain_community.indexes._sql_record_manager import SQLRecordManager
        from langchain_postgres import PGEngine

        self.job = job
        self.engine = PGEngine.from_connection_string(url=jobkit.sqlalchemy_url(job["dsn"], "psycopg"))
        self.embeddings = make_embeddings(embed, job["batch_size"])
        self.record_manager = SQLRecordManager(f"pgvector/{TABLE}", db_url=jobkit.sqlalchemy_url(job["dsn"], "psycopg"))

    def store(self, ef_search: int | None = None):
        from langchain_postgres import PGVectorStore
        from langchain_postgres.v2.indexes import HNSWQueryOptions

        options = HNSWQueryOptions(ef_search=ef_search) if ef_search else None
        return PGVectorStore.create_sync(engine=self.engine, table_name=TABLE, embedding_service=self.embeddings,
                                         index_query_options=options)

    def setup(self) -> None:
        self.engine.init_vectorstore_table(table_name=TABLE, vector_size=384)
        self.record_manager.create_schema()

    def ingest(self, path: str) -> dict:
        from langchain_core.indexing import index

        result = index(documents(self.job, path), self.record_manager, self.store(), cleanup="incremental",
                       source_id_key="source", batch_size=self.job["batch_size"])
        return dict(result)

    def build_index(self) -> None:
        from langchain_postgres.v2.indexes import HNSWIndex

        self.store().apply_vector_index(HNSWIndex(m=self.job["hnsw_m"], ef_construction=self.job["hnsw_ef_construction"]))


def table_rows(job: dict) -> list[tuple[str, str]]:
    import psycopg

    with psycopg.connect(job["dsn"]) as conn:
        return conn.execute(f"SELECT langchain_metadata->>'source', content FROM {TABLE}").fetchall()


def main() -> None:
    job = jobkit.load_job()
    from importlib.metadata import version

    import langchain_postgres  # noqa: F401 - imports are not timed

    embed = jobkit.embedder_for(job)
    watch = jobkit.Stopwatch()
    result: dict = {"system": "langchain", "mode": job["mode"],
                    "versions": {p: version(p) for p in ("langchain-postgres", "langchain-core", "langchain-community")}}
    with watch("ingest"):
        side = LangChainSide(job, embed)
        side.setup()
        with watch("load"):
            result["first_index"] = side.ingest(job["docs"])
        with watch("hnsw_build"):
            side.build_index()
    result["peak_rss_after_ingest_mib"] = jobkit.peak_rss_mib()
    rows = table_rows(job)
    result.update(ingest_s=watch.seconds["ingest"], load_s=watch.seconds["load"], index_s=watch.seconds["hnsw_build"],
                  rows=len(rows))
    if job["mode"] == "live":
        result["chunks"] = len(rows)
        jobkit.emit(result)
        return
    jobkit.analyze(job["dsn"])
    tuned, runners = search(side, job)
    result.update(tuned)
    with watch("reingest_same"):
        result["reingest_same_index"] = LangChainSide(job, embed).ingest(job["docs"])
    result["reingest_same_s"] = watch.seconds["reingest_same"]
    result["after_twice"] = jobkit.integrity(table_rows(job), jobkit.read_docs(job["docs"]))
    with watch("reingest_changed"):
        result["reingest_changed_index"] = LangChainSide(job, embed).ingest(job["docs_changed"])
    result["reingest_changed_s"] = watch.seconds["reingest_changed"]
    result["after_change"] = jobkit.integrity(table_rows(job), jobkit.read_docs(job["docs_changed"]))
    result["settings"] = {
        "store": "PGVectorStore on PGEngine (SQLAlchemy async + psycopg 3)",
        "sync": 'indexing API: index(..., SQLRecordManager, cleanup="incremental", source_id_key="source")',
        "chunking": "none: one Document per abstract",
        "embedder": f"Embeddings subclass over the lookup, index(batch_size={job['batch_size']})",
        "load": "PGVectorStore.add_documents via index(): one INSERT ... ON CONFLICT and commit per row (the library's only path)",
        "index": f"apply_vector_index(HNSWIndex(m={job['hnsw_m']}, ef_construction={job['hnsw_ef_construction']})) "
                 "after the first load, cosine",
    }
    jobkit.serve(runners, result["ef_search"], job)
    jobkit.emit(result)


def search(side: LangChainSide, job: dict) -> tuple[dict, dict]:
    import psycopg

    stores: dict[int, object] = {}
    k = job["k"]

    def query(q, ef):
        if ef not in stores:
            stores[ef] = side.store(ef)
        return [d.metadata["source"] for d in stores[ef].similarity_search_by_vector(q.tolist(), k=k)]

    out = jobkit.tune(query, job)
    with psycopg.connect(job["dsn"]) as conn:
        conn.execute(f"SET hnsw.ef_search = {int(out['ef_search'])}")
        vec = "[" + ",".join("0.05" for _ in range(384)) + "]"
        plan = "\n".join(r[0] for r in conn.execute(  # its query's shape (__query_collection)
            f"EXPLAIN SELECT langchain_id, content, embedding, langchain_metadata, cosine_distance(embedding, '{vec}') "
            f"AS distance FROM {TABLE} ORDER BY embedding <=> '{vec}' LIMIT {k}"))
    out["plan_uses_hnsw"] = "index scan" in plan.lower()
    return out, {"search": query}


if __name__ == "__main__":
    main()
