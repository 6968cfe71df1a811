"""Vector tables against the real server: binary COPY encoding, the conflict fallback,
halfvec storage, HNSW rebuilds on parameter changes."""

import datetime as dt
import uuid

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector
from psycopg import sql

from vector_platform import catalog, tables
from vector_platform.search import active
from vector_platform.models import MINILM, ModelSpec


@pytest.fixture
def conn(pg_dsn):
    with psycopg.connect(pg_dsn) as c:
        catalog.bootstrap(c)
        register_vector(c)
        yield c


def _rows(n, start=0, meta=None):
    ts = dt.datetime(2023, 3, 4, 5, 6, 7, 891011, tzinfo=dt.timezone.utc)
    return [
        (uuid.uuid4() if meta is None else uuid.UUID(int=i + 1), f"doc-{i} ✓", i, f"h{i}", f"text ünïcödé {i}\n\"quoted\"",
         meta or {"i": i, "nested": {"list": [1, 2.5, None, "x"]}}, ts if i % 2 else None)
        for i in range(start, start + n)
    ]


def _vectors(n, dims=384, seed=0):
    v = np.random.default_rng(seed).standard_normal((n, dims)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_binary_copy_round_trips_every_column(conn, unique_name):
    tables.create_table(conn, unique_name, MINILM)
    rows, vecs = _rows(50), _vectors(50)
    assert tables.copy_upsert(conn, unique_name, MINILM, rows, vecs, assume_new=True) == 50
    back = conn.execute(
        sql.SQL("SELECT chunk_id, doc_id, seq, content_hash, text, metadata, source_ts, embedding FROM {} ORDER BY seq").format(
            tables.table_id(unique_name)
        )
    ).fetchall()
    for row, vec, got in zip(rows, vecs, back):
        assert tuple(got[:7]) == tuple(row)
        np.testing.assert_array_equal(got[7].to_numpy(), vec)


def test_conflicting_rows_fall_back_to_the_staged_upsert(conn, unique_name):
    tables.create_table(conn, unique_name, MINILM)
    first = _rows(10, meta={"v": 1})
    tables.copy_upsert(conn, unique_name, MINILM, first, _vectors(10), assume_new=True)
    conn.commit()
    # Rows 5..14: 5..9 exist already (as if a concurrent run loaded them), 10..14 are new.
    second = _rows(10, start=5, meta={"v": 2})
    with conn.transaction():
        written = tables.copy_upsert(conn, unique_name, MINILM, second, _vectors(10, seed=1), assume_new=True)
    assert written == 10
    got = dict(conn.execute(sql.SQL("SELECT seq, metadata FROM {}").format(tables.table_id(unique_name))).fetchall())
    assert len(got) == 15
    assert all(got[i] == {"v": 1} for i in range(5)) and all(got[i] == {"v": 2} for i in range(5, 15))


def test_halfvec_tables_store_index_and_search(conn, unique_name):
    spec = ModelSpec("half_test", "local", MINILM.model_name, 384, storage_type="halfvec")
    tables.create_table(conn, unique_name, spec)
    vecs = _vectors(300)
    tables.copy_upsert(conn, unique_name, spec, _rows(300), vecs, assume_new=True)
    conn.commit()
    conn.autocommit = True
    report = tables.ensure_hnsw(conn, unique_name, spec, m=8, ef_construction=32)
    assert report.action == "built" and report.rows == 300
    conn.autocommit = False
    hits = active.nearest(conn, tables.table_id(unique_name), spec, vecs[7], 3, exact=False)
    assert hits[0][-1] < 1e-3  # itself, up to half precision
    exact = active.nearest(conn, tables.table_id(unique_name), spec, vecs[7], 3, exact=True)
    assert [h[0] for h in hits] == [h[0] for h in exact]


def test_hnsw_index_is_kept_or_rebuilt_by_its_parameters(conn, unique_name):
    tables.create_table(conn, unique_name, MINILM)
    tables.copy_upsert(conn, unique_name, MINILM, _rows(500), _vectors(500), assume_new=True)
    conn.commit()
    conn.autocommit = True
    assert tables.ensure_hnsw(conn, unique_name, MINILM, 16, 64).action == "built"
    assert tables.ensure_hnsw(conn, unique_name, MINILM, 16, 64).action == "kept"
    rebuilt = tables.ensure_hnsw(conn, unique_name, MINILM, 8, 40)
    assert rebuilt.action == "rebuilt"
    assert tables.current_index(conn, unique_name) == {"name": rebuilt.name, "m": 8, "ef_construction": 40, "bytes": rebuilt.bytes}
    count = conn.execute(
        "SELECT count(*) FROM pg_indexes WHERE schemaname = 'vp_vectors' AND tablename = %s", (unique_name,)
    ).fetchone()[0]
    assert count == 2  # the primary key and exactly one HNSW index


def test_an_invalid_leftover_index_is_dropped_and_rebuilt(conn, unique_name):
    tables.create_table(conn, unique_name, MINILM)
    tables.copy_upsert(conn, unique_name, MINILM, _rows(200), _vectors(200), assume_new=True)
    conn.commit()
    conn.autocommit = True
    built = tables.ensure_hnsw(conn, unique_name, MINILM, 16, 64)
    # What an interrupted CREATE INDEX CONCURRENTLY leaves behind: an index marked invalid.
    conn.execute(
        "UPDATE pg_index SET indisvalid = false WHERE indexrelid = %s::regclass", (f'vp_vectors."{built.name}"',)
    )
    assert tables.current_index(conn, unique_name) is None  # an invalid index never counts
    again = tables.ensure_hnsw(conn, unique_name, MINILM, 16, 64)
    assert again.action == "built" and again.dropped_invalid == [built.name]
    valid = conn.execute(
        "SELECT bool_and(x.indisvalid), count(*) FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
        "JOIN pg_am am ON am.oid = i.relam WHERE am.amname = 'hnsw' AND x.indrelid = %s::regclass",
        (f'vp_vectors."{unique_name}"',),
    ).fetchone()
    assert valid == (True, 1)
