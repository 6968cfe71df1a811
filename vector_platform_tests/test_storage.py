"""Quantized storage on real SciFact vectors: `vector`, `halfvec` and `binary` (an HNSW index of
signs re-ranked at full precision) side by side on the same rows, recall@10 against exact
search and the bytes each costs; and a storage change done the way users do it, through
`collections set --storage`, which rebuilds through the model-upgrade path without calling
the model again."""

import subprocess

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector
from psycopg import sql

from vector_platform import catalog, tables
from vector_platform.metrics import recall_at_k
from vector_platform.models import MINILM
from vector_platform.search import active
from vector_platform.search.active import DEFAULT_RERANK_FACTOR

from . import upgrade_data as data
from .conftest import cli, cli_env, write_jsonl
from .scifact import SCIFACT

ROWS = 5183  # every SciFact abstract
QUERIES = 300


@pytest.fixture(scope="module")
def scifact_vectors():
    docs = np.load(SCIFACT / "corpus_minilm.npy").astype(np.float32)[:ROWS]
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    queries = np.load(SCIFACT / "queries_minilm.npy").astype(np.float32)[:QUERIES]
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return docs, queries


def _rows(n: int):
    import uuid

    return [(uuid.UUID(int=i + 1), f"d{i}", 0, f"h{i}", f"text {i}", {}, None) for i in range(n)]


def test_each_storage_type_reports_its_recall_and_bytes_and_binary_is_reranked_to_within_002_of_vector(
        pg_dsn, unique_name, scifact_vectors):
    docs, queries = scifact_vectors
    truth = np.argsort(-(queries @ docs.T), axis=1)[:, :10]  # exact cosine neighbours, by numpy
    specs = {kind: MINILM.with_storage(kind) for kind in ("vector", "halfvec", "binary")}
    found: dict[str, dict] = {}
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        catalog.bootstrap(conn)
        register_vector(conn)
        for kind, spec in specs.items():
            table = f"{unique_name}_{kind}"
            tables.create_table(conn, table, spec)
            with conn.transaction():
                tables.copy_upsert(conn, table, spec, _rows(ROWS), docs, assume_new=True)
            tables.ensure_hnsw(conn, table, spec, m=16, ef_construction=64)
            conn.execute(sql.SQL("ANALYZE {}").format(tables.table_id(table)))
            relation = tables.table_id(table)
            plan = active.explain_nearest(conn, relation, spec, queries[0], exact=False, ef_search=40)
            assert "Index Scan using" in plan and tables.index_name(table) in plan, plan
            if kind == "binary":
                indexdef = conn.execute("SELECT pg_get_indexdef(to_regclass(%s))",
                                        (f"{tables.VECTORS}.{tables.index_name(table)}",)).fetchone()[0]
                assert "binary_quantize(embedding)" in indexdef and "bit_hamming_ops" in indexdef, indexdef

            def recall(factor: int) -> float:
                out = []
                for i, q in enumerate(queries):
                    rows = active.nearest(conn, relation, spec, q, 10, exact=False, ef_search=40,
                                          columns=sql.SQL("doc_id"), rerank_factor=factor)
                    if kind == "binary":  # ranked again by the full-precision distance it returns
                        distances = [r[-1] for r in rows]
                        assert distances == sorted(distances)
                    out.append(recall_at_k([int(r[0][1:]) for r in rows], list(truth[i]), 10))
                return float(np.mean(out))

            found[kind] = {"recall": recall(DEFAULT_RERANK_FACTOR), **tables.bytes_per_vector(conn, table)}
            if kind == "binary":
                found["binary_without_rerank"] = {"recall": recall(1)}
                # exact search over a binary table ranks the full-precision vectors: exactly numpy's
                rows = active.nearest(conn, relation, spec, queries[0], 10, exact=True, columns=sql.SQL("doc_id"))
                assert [int(r[0][1:]) for r in rows] == list(truth[0])
    print("storage on SciFact:", found)
    assert all(f["rows"] == ROWS for f in found.values() if "rows" in f)
    vector, halfvec, binary = found["vector"], found["halfvec"], found["binary"]
    assert vector["recall"] >= 0.95
    assert binary["recall"] >= vector["recall"] - 0.02
    # the re-rank is what makes binary usable: the signs alone miss many neighbours
    assert found["binary_without_rerank"]["recall"] < binary["recall"] - 0.1
    assert halfvec["recall"] >= vector["recall"] - 0.01
    # bytes: halfvec halves the vectors in table and index; binary keeps the table, and its
    # index holds 48 bytes of signs per vector instead of 1,536 of floats
    assert halfvec["table_bytes_per_vector"] < 0.75 * vector["table_bytes_per_vector"]
    assert halfvec["index_bytes_per_vector"] < 0.75 * vector["index_bytes_per_vector"]
    assert binary["index_bytes_per_vector"] < 0.25 * vector["index_bytes_per_vector"]
    assert abs(binary["table_bytes_per_vector"] - vector["table_bytes_per_vector"]) < 0.05 * vector["table_bytes_per_vector"]


def test_collections_set_storage_rebuilds_through_the_upgrade_path_from_the_cache(
        make_platform, pg_dsn, tmp_path, unique_name):
    srv = data.server()
    try:
        vp = make_platform()
        key = f"mini_{unique_name[-6:]}"
        vp.add_model(data.spec(key, srv))
        name = unique_name
        docs = data.docs_with_judged(600)
        vp.add_collection(name, write_jsonl(tmp_path / "docs.jsonl", docs), model=key)
        assert all(r.success for r in vp.ingest(name))
        texts = list(data.queries().values())[:30]
        before = {q: [h.doc_id for h in vp.search(q, [name]).hits] for q in texts}
        embedded = srv.counters.inputs

        outcome = vp.set_storage(name, "binary")
        binary = f"{key}_binary"
        assert outcome.to == binary and name in outcome.swaps, (outcome.refused, [r.error for r in outcome.runs])
        # the gate embeds the logged queries (for both models); no chunk goes to the model again
        assert srv.counters.inputs - embedded <= 2 * len(texts)
        sent = srv.counters.texts
        assert sum(sent.values()) == srv.counters.inputs and max(sent.values()) <= 3, sent.most_common(3)
        assert all(n == 1 for text, n in sent.items() if text not in texts), [t for t, n in sent.items() if n > 1 and t not in texts][:3]
        coll = vp.collection(name)
        assert coll.serving_model == binary
        with vp.pool().connection() as conn:
            spec = catalog.get_model(conn, binary)
            table = catalog.vector_table_name(conn, name, binary)
            assert spec.storage_type == "binary" and spec.cache_fingerprint == data.spec(key, srv).fingerprint
            rows = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(tables.table_id(table))).fetchone()[0]
        assert rows == 600
        after = {q: vp.search(q, [name]) for q in texts}
        assert all(r.hits and {h.model for h in r.hits} == {binary} for r in after.values())
        overlap = np.mean([len(set(before[q]) & {h.doc_id for h in after[q].hits}) / 10 for q in texts])
        assert overlap >= 0.95, overlap  # the re-rank answers what the full-precision index did

        # what users read: status shows the storage, its bytes and its recall
        status = {c["name"]: c for c in vp.status()["collections"]}[name]
        t = status["tables"]
        assert t[binary]["storage_type"] == "binary" and t[key]["storage_type"] == "vector"
        assert t[binary]["index_bytes_per_vector"] < 0.25 * t[key]["index_bytes_per_vector"]
        assert t[binary]["recall"]["recall"] >= 0.95
        shown = subprocess.run(cli("status"), env=cli_env(pg_dsn, tmp_path), capture_output=True, text=True, timeout=300)
        assert f"{binary} (serving): storage binary" in shown.stdout, shown.stdout + shown.stderr

        # unchanged storage is a no-op; a storage the platform does not know is refused
        assert vp.set_storage(name, "binary") is None
        with pytest.raises(ValueError, match="unknown storage type"):
            vp.set_storage(name, "int8")
        # back to vector: that model served before and is kept for rollback, which says so
        with pytest.raises(ValueError, match="models rollback"):
            vp.set_storage(name, "vector")
        assert vp.rollback(name).success
        assert vp.collection(name).serving_model == key
    finally:
        srv.stop()
