"""Backup, list, drop and restore of collections: against the embedded PostgreSQL, a file://
primary store, and backup locations on file:// and on moto's S3 over HTTP."""

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest

from vector_platform import catalog, tables
from vector_platform.backup import BackupCorrupt, BackupError
from vector_platform.backup.drop import DropRefused
from vector_platform.backup.restore import RestoreRefused

from .conftest import FAKES, cli, cli_env, write_jsonl

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()
QUERIES = ["gamma delta", "alpha kappa sigma", "tau rho pi omicron", "beta", "zeta eta theta iota"]


def corpus(n: int, tag: str) -> list[dict]:
    return [
        {
            "id": f"{tag}{i}",
            "title": f"title {tag}{i}",
            "text": f"{tag}{i} " + " ".join(WORDS[(i * 7 + j * (1 + i % 3)) % len(WORDS)] for j in range(4 + i % 7)),
            "timestamp": f"2024-{1 + i % 12:02d}-15T00:00:00Z",
            "metadata": {"tag": tag, "odd": i % 2},
        }
        for i in range(n)
    ]


def ingested(vp, tmp_path, n=80, tag="d"):
    name = f"bk_{uuid.uuid4().hex[:8]}"
    vp.add_collection(name, write_jsonl(tmp_path / f"{name}.jsonl", corpus(n, tag)))
    runs = vp.ingest(name)
    assert all(r.success for r in runs), [r.error for r in runs]
    return name


def answers(vp, name: str, exact: bool) -> dict:
    """Per query: (doc id, chunk id, score) of the hits, and the tier they came from."""
    out = {}
    for q in QUERIES:
        result = vp.search(q, [name], k=10, exact=exact)
        out[q] = [(h.doc_id, h.chunk_id, h.score) for h in result.hits]
        assert result.hits
    return out


def without_chunk_ids(found: dict) -> dict:
    return {q: [(doc, score) for doc, _, score in hits] for q, hits in found.items()}


def table_rows(pg_dsn, name: str) -> int:
    with psycopg.connect(pg_dsn) as conn:
        table = catalog.vector_table_name(conn, name, "minilm_l6_v2")
        return tables.table_stats(conn, table)[0]


def vector_tables_of(pg_dsn, name: str) -> list[str]:
    with psycopg.connect(pg_dsn) as conn:
        return [r[0] for r in conn.execute(
            "SELECT relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname IN ('vp_vectors', 'vp_serving') AND relname LIKE %s", (name + "%",))]


def test_backup_drop_restore_returns_the_same_answers_without_embedding(make_platform, pg_dsn, tmp_path):
    vp = make_platform()
    name = ingested(vp, tmp_path)
    hnsw, exact = answers(vp, name, exact=False), answers(vp, name, exact=True)
    docs = {d: vp.get(name, d) for d in ("d0", "d7", "d42")}
    location = (tmp_path / "backups").as_uri()

    info = vp.backup(name, to=location)
    assert info.rows == {"minilm_l6_v2": table_rows(pg_dsn, name)} and info.documents == 80 and info.tier == "active"
    listed = vp.backups(name, location)
    assert [b.id for b in listed] == [info.id]
    assert listed[0].bytes == info.bytes > 0 and listed[0].row_archive["included"] is False

    report = vp.drop_collection(name, backups=location)
    assert report.backup_id == info.id and report.tables
    with pytest.raises(KeyError):
        vp.collection(name)
    assert vector_tables_of(pg_dsn, name) == []
    assert name not in vp.instance.get_dynamic_partitions("collection")

    embedded = FAKES["minilm_l6_v2"].calls
    restored = vp.restore(name, location)
    assert restored.collection == name and restored.backup_id == info.id and restored.vectors == info.rows
    assert FAKES["minilm_l6_v2"].calls == embedded, "a restore never embeds"
    assert name in vp.instance.get_dynamic_partitions("collection")
    assert answers(vp, name, exact=True) == exact
    assert answers(vp, name, exact=False) == hnsw
    assert {d: vp.get(name, d) for d in docs} == docs
    with psycopg.connect(pg_dsn) as conn:
        assert tables.current_index(conn, catalog.vector_table_name(conn, name, "minilm_l6_v2")) is not None
