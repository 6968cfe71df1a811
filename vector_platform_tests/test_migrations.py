"""Upgrading a catalog made by the previous release: migrations apply once, keep every row,
and the platform goes on with the old tables (no re-embedding, same search results)."""

import datetime as dt
import uuid
from pathlib import Path

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql
from psycopg.types.json import Jsonb

from vector_platform import catalog
from vector_platform.catalog import schema
from vector_platform.ingest.sources import read_source
from vector_platform.models import MINILM

from .conftest import FakeEmbedder, build_platform, write_jsonl

V1_SQL = Path(__file__).parent / "data" / "schema_v1.sql"


def _release_1_database(pg_server, tmp_path, name):
    """A database as release 1 left it: its schema, a collection with documents, chunks, a vector
    table (release-1 naming), an HNSW index, a serving view and a dead letter keyed by line."""
    with psycopg.connect(pg_server.get_uri(), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = pg_server.get_uri(database=name)
    source = write_jsonl(tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": f"release one document {i} about topic {i % 4}"} for i in range(30)])
    chunker = FakeEmbedder(MINILM).make_chunker(256, 32)
    fake = FakeEmbedder(MINILM)
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION vector")
        register_vector(conn)
        conn.execute(V1_SQL.read_text())
        conn.execute(
            "INSERT INTO vector_platform.models (key, provider, model_name, dims, distance, storage_type, max_tokens, options) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, '{}')",
            (MINILM.key, MINILM.provider, MINILM.model_name, MINILM.dims, MINILM.distance, MINILM.storage_type, MINILM.max_tokens),
        )
        conn.execute(
            "INSERT INTO vector_platform.collections (name, source, settings, serving_model, tier_changed_at) "
            "VALUES ('legacy', %s, %s, %s, %s)",
            (str(source), Jsonb({"hnsw_m": 12, "hnsw_ef_construction": 48}), MINILM.key, now),
        )
        conn.execute(
            "INSERT INTO vector_platform.collection_models (collection, model_key, table_name) "
            "VALUES ('legacy', %s, 'legacy__minilm_l6_v2')",
            (MINILM.key,),
        )
        conn.execute(
            "CREATE TABLE vp_vectors.legacy__minilm_l6_v2 (chunk_id uuid PRIMARY KEY, doc_id text NOT NULL, seq int NOT NULL, "
            "content_hash text NOT NULL, text text NOT NULL, metadata jsonb NOT NULL DEFAULT '{}', source_ts timestamptz, "
            "embedding vector(384) NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())"
        )
        for doc in read_source(str(source), 10**6):
            conn.execute(
                "INSERT INTO vector_platform.documents (collection, doc_id, title, body, content_hash, metadata, source_ts, "
                "chunked_hash, first_seen_at, updated_at) VALUES ('legacy', %s, NULL, %s, %s, '{}', NULL, %s, %s, %s)",
                (doc.doc_id, doc.body, doc.content_hash, doc.content_hash, now, now),
            )
            for ch in chunker.split("legacy", doc.doc_id, doc.text_for_chunking()):
                conn.execute(
                    "INSERT INTO vector_platform.chunks VALUES (%s, 'legacy', %s, %s, %s, %s, %s)",
                    (ch.chunk_id, doc.doc_id, ch.seq, ch.text, ch.content_hash, ch.token_count),
                )
                vec = np.asarray(fake.embed([ch.text])[0], np.float32)
                conn.execute(
                    "INSERT INTO vp_vectors.legacy__minilm_l6_v2 (chunk_id, doc_id, seq, content_hash, text, embedding) "
                    "VALUES (%s, %s, %s, %s, %s, %s)",
                    (ch.chunk_id, doc.doc_id, ch.seq, ch.content_hash, ch.text, vec / np.linalg.norm(vec)),
                )
        conn.execute(
            "CREATE INDEX legacy__minilm_l6_v2_hnsw ON vp_vectors.legacy__minilm_l6_v2 "
            "USING hnsw (embedding vector_cosine_ops) WITH (m = 12, ef_construction = 48)"
        )
        conn.execute("CREATE VIEW vp_serving.legacy AS SELECT chunk_id, doc_id, seq, content_hash, text, metadata, source_ts, "
                     "embedding FROM vp_vectors.legacy__minilm_l6_v2")
        conn.execute(
            "INSERT INTO vector_platform.dead_letters (collection, stage, ref, error, created_at, last_seen_at) "
            "VALUES ('legacy', 'source', 'line 31', 'Expecting value', %s, %s)",
            (now, now),
        )
    return dsn


def test_a_release_1_catalog_is_upgraded_in_place_and_keeps_serving(pg_server, dagster_instance, tmp_path, fake_embedder):
    dsn = _release_1_database(pg_server, tmp_path, f"vp_v1_{uuid.uuid4().hex[:8]}")
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert schema.current_version(conn) == 1
        assert schema.migrate(conn) == [v for v, _, _ in schema.migrations() if v > 1]
        assert schema.current_version(conn) == schema.LATEST_VERSION >= 2
        assert schema.migrate(conn) == []  # once only
        fingerprint = conn.execute("SELECT fingerprint FROM vector_platform.models WHERE key = %s", (MINILM.key,)).fetchone()[0]
        table_fp = catalog.table_fingerprint(conn, "legacy", MINILM.key)
        assert fingerprint == table_fp == MINILM.fingerprint
        assert catalog.get_collection(conn, "legacy").settings.hnsw_m == 12  # settings kept
        rows_before = conn.execute("SELECT count(*) FROM vp_vectors.legacy__minilm_l6_v2").fetchone()[0]

    vp = build_platform(dsn, dagster_instance, (tmp_path / "objects").as_uri())
    before = vp.search("topic 2", ["legacy"], k=5)
    assert len(before.hits) == 5 and not before.warnings
    calls = fake_embedder.calls  # the query above was embedded
    runs = vp.ingest("legacy")
    assert all(r.success for r in runs), [r.error for r in runs]
    assert fake_embedder.calls == calls, "an upgrade must not re-embed what release 1 loaded"
    assert runs[1].metadata["vector_table"]["inserted"] == 0
    assert runs[1].metadata["hnsw_index"]["action"] == "kept"
    assert runs[1].checks["no_chunk_lost"] is True
    after = vp.search("topic 2", ["legacy"], k=5)
    assert [h.chunk_id for h in after.hits] == [h.chunk_id for h in before.hits]
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM vp_vectors.legacy__minilm_l6_v2").fetchone()[0] == rows_before
        # release 1's line-keyed dead letter is resolved by a clean read of the source
        assert conn.execute(
            "SELECT count(*) FROM vector_platform.dead_letters WHERE collection = 'legacy' AND resolved_at IS NULL"
        ).fetchone()[0] == 0


def test_release_1_embedding_cache_files_are_adopted_not_re_embedded(pg_server, dagster_instance, tmp_path, fake_embedder):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    dsn = _release_1_database(pg_server, tmp_path, f"vp_v1_{uuid.uuid4().hex[:8]}")
    objects = tmp_path / "objects"
    # Release 1's layout: embedding_cache/<model key>/<time>-<uuid>.parquet (content_hash, embedding).
    with psycopg.connect(dsn) as conn:
        register_vector(conn)
        rows = conn.execute("SELECT DISTINCT content_hash, embedding FROM vp_vectors.legacy__minilm_l6_v2").fetchall()
    hashes = [r[0] for r in rows]
    matrix = np.vstack([np.asarray(r[1].to_numpy(), np.float32) for r in rows])
    table = pa.table({"content_hash": pa.array(hashes), "embedding": pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), 384)})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    legacy = objects / "embedding_cache" / MINILM.key
    legacy.mkdir(parents=True)
    (legacy / f"{1:020d}-{uuid.uuid4().hex}.parquet").write_bytes(buf.getvalue())

    vp = build_platform(dsn, dagster_instance, objects.as_uri())
    source = vp.collection("legacy").source  # the platform migrates the catalog before reading it
    vp.add_collection("legacy_copy", source)
    calls = fake_embedder.calls
    runs = vp.ingest("legacy_copy")
    assert all(r.success for r in runs), [r.error for r in runs]
    embeddings = runs[1].metadata["embeddings"]
    assert fake_embedder.calls == calls and embeddings["embedded"] == 0
    assert embeddings["from_cache"] == embeddings["chunks"] == len(hashes)


def test_a_catalog_newer_than_the_code_is_refused(pg_server):
    name = f"vp_future_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server.get_uri(), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    with psycopg.connect(pg_server.get_uri(database=name), autocommit=True) as conn:
        schema.migrate(conn)
        conn.execute("INSERT INTO vector_platform.schema_version (version, name) VALUES (%s, 'future')", (schema.LATEST_VERSION + 1,))
        try:
            schema.migrate(conn)
        except RuntimeError as err:
            assert "newer than this release" in str(err)
        else:
            raise AssertionError("a newer catalog must be refused")


def test_a_migration_missing_below_the_highest_applied_is_still_applied(pg_server):
    """Two branches each add a migration (0008 and 0009): a database that ran 0009 first must
    still get 0008, although 8 < 9."""
    name = f"gap_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server.get_uri(), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    with psycopg.connect(pg_server.get_uri(database=name), autocommit=True) as conn:
        schema.migrate(conn)
        conn.execute("DROP TABLE vector_platform.audit_log, vector_platform.recall_history")
        conn.execute("DELETE FROM vector_platform.schema_version WHERE version = 8")
        assert schema.current_version(conn) == schema.LATEST_VERSION > 8

        assert schema.migrate(conn) == [8]
        assert conn.execute("SELECT to_regclass('vector_platform.audit_log') IS NOT NULL").fetchone()[0]
        assert schema.migrate(conn) == []
