"""Ingest through the Dagster assets with a fake embedder: idempotence, edits, deletes, bad input."""


import psycopg
from psycopg import sql

from vector_platform import catalog
from vector_platform.cli import main as cli_main

from .conftest import write_jsonl


def _docs(n: int, prefix: str = "doc") -> list[dict]:
    return [
        {
            "id": f"{prefix}{i}",
            "title": f"Title {i}",
            "text": f"Document number {i} talks about topic {i % 7}. " + "Filler sentence with words. " * (5 + i % 40),
            "timestamp": f"2024-0{1 + i % 9}-01T00:00:00Z",
            "metadata": {"group": i % 3},
        }
        for i in range(n)
    ]


def _rows(pg_dsn, collection, model="minilm_l6_v2"):
    with psycopg.connect(pg_dsn) as conn:
        table = catalog.vector_table_name(conn, collection, model)
        return conn.execute(
            sql.SQL("SELECT chunk_id, doc_id, content_hash, metadata, embedding::text FROM {} ORDER BY chunk_id").format(
                sql.Identifier("vp_vectors", table)
            )
        ).fetchall()


def _chunk_count(pg_dsn, collection):
    with psycopg.connect(pg_dsn) as conn:
        return conn.execute(
            "SELECT count(*) FROM vector_platform.chunks c JOIN vector_platform.documents d USING (collection, doc_id) "
            "WHERE c.collection = %s AND d.deleted_at IS NULL",
            (collection,),
        ).fetchone()[0]


def test_ingest_twice_is_idempotent_and_embeds_nothing_new(make_platform, fake_embedder, tmp_path, unique_name, pg_dsn):
    vp = make_platform()
    source = write_jsonl(tmp_path / "docs.jsonl", _docs(60))
    vp.add_collection(unique_name, source)
    runs = vp.ingest(unique_name)
    assert [r.success for r in runs] == [True, True, True], [r.error for r in runs]
    assert runs[1].checks == {"embeddings_are_valid": True, "no_chunk_lost": True, "index_recall_meets_target": True,
        "shadow_passes_quality_gate": True}
    first = _rows(pg_dsn, unique_name)
    assert len(first) == _chunk_count(pg_dsn, unique_name) > 60  # long documents became several chunks
    embedded_first = len(fake_embedder.texts)
    assert embedded_first == len({r[2] for r in first})  # each distinct content embedded once

    runs = vp.ingest(unique_name)
    assert all(r.success for r in runs)
    assert len(fake_embedder.texts) == embedded_first, "a re-run must not call the model"
    assert _rows(pg_dsn, unique_name) == first
    assert runs[1].metadata["hnsw_index"]["action"] == "kept"

    # A fresh table for the same content (say, after a drop) comes from the cache, not the model.
    with psycopg.connect(pg_dsn) as conn:
        table = catalog.vector_table_name(conn, unique_name, "minilm_l6_v2")
        conn.execute(sql.SQL("DROP VIEW {}").format(sql.Identifier("vp_serving", unique_name)))
        conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier("vp_vectors", table)))
    runs = vp.ingest(unique_name)
    assert all(r.success for r in runs)
    assert len(fake_embedder.texts) == embedded_first
    assert runs[1].metadata["embeddings"]["from_cache"] == len(first)
    assert _rows(pg_dsn, unique_name) == first


def test_editing_one_document_re_embeds_only_its_chunks_and_deleting_removes_rows(
    make_platform, fake_embedder, tmp_path, unique_name, pg_dsn
):
    vp = make_platform()
    docs = _docs(30)
    source = write_jsonl(tmp_path / "docs.jsonl", docs)
    vp.add_collection(unique_name, source)
    assert all(r.success for r in vp.ingest(unique_name))
    before = {r[0]: r for r in _rows(pg_dsn, unique_name)}
    calls_before = len(fake_embedder.texts)

    docs[5]["text"] = "Completely new words about mitochondria and ribosomes. " * 3
    docs[7]["metadata"] = {"group": "changed"}  # metadata only: no re-embedding
    del docs[9]
    write_jsonl(source, docs)
    runs = vp.ingest(unique_name)
    assert all(r.success for r in runs), [r.error for r in runs]
    new_texts = fake_embedder.texts[calls_before:]
    assert len(new_texts) == 1 and "mitochondria" in new_texts[0]

    after = {r[0]: r for r in _rows(pg_dsn, unique_name)}
    assert not any(r[1] == "doc9" for r in after.values())
    assert {r[1] for r in after.values() if r[0] not in before} == {"doc5"}
    assert all(r[3] == {"group": "changed"} for r in after.values() if r[1] == "doc7")
    assert len(after) == _chunk_count(pg_dsn, unique_name)
    assert runs[1].checks["no_chunk_lost"] is True
    assert runs[0].metadata["source_documents"]["deleted"] == 1


def test_bad_input_is_dead_lettered_and_everything_else_is_ingested(
    make_platform, fake_embedder, tmp_path, unique_name, pg_dsn
):
    folder = tmp_path / "src"
    folder.mkdir()
    for i in range(12):
        (folder / f"good{i}.md").write_text(f"# Note {i}\n\nUseful text number {i} about proteins and cells.\n")
    (folder / "dims.txt").write_text("this text makes the model return POISON_DIMS a short vector")
    (folder / "nan.txt").write_text("this one makes it return POISON_NAN values")
    (folder / "zero.txt").write_text("and this one a POISON_ZERO vector")
    (folder / "empty.txt").write_text("  \n\n ")
    (folder / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (folder / "blob.bin").write_bytes(bytes(range(256)) * 64)
    big = "\n\n".join(f"Section {i}. " + f"Large document part {i} is split into many chunks. " * 20 for i in range(5200))
    (folder / "huge.txt").write_text(big)
    assert (folder / "huge.txt").stat().st_size > 5 * 2**20

    vp = make_platform()
    vp.add_collection(unique_name, folder)
    runs = vp.ingest(unique_name)
    assert all(r.success for r in runs), [r.error for r in runs]
    assert runs[1].checks["no_chunk_lost"] is True

    with psycopg.connect(pg_dsn) as conn:
        letters = {(r["stage"], r["ref"].split("/")[-1] if r["stage"] == "source" else r["error"][:14]): r["error"] for r in catalog.open_dead_letters(conn, unique_name)}
        chunk_docs = dict(conn.execute(
            "SELECT chunk_id::text, doc_id FROM vector_platform.chunks WHERE collection = %s", (unique_name,)
        ).fetchall())
        open_embed = {chunk_docs[r["ref"]]: r["error"] for r in catalog.open_dead_letters(conn, unique_name) if r["stage"] == "embed"}
    assert ("source", "empty.txt") in letters and ("source", "latin1.txt") in letters and ("source", "blob.bin") in letters
    assert "not valid UTF-8" in letters[("source", "latin1.txt")]
    assert "wrong dimensions" in open_embed["dims.txt"]
    assert "non-finite" in open_embed["nan.txt"]
    assert "zero vector" in open_embed["zero.txt"]

    rows = _rows(pg_dsn, unique_name)
    docs_in_table = {r[1] for r in rows}
    assert {f"good{i}.md" for i in range(12)} <= docs_in_table
    assert "huge.txt" in docs_in_table and sum(r[1] == "huge.txt" for r in rows) > 1000
    assert not docs_in_table & {"dims.txt", "nan.txt", "zero.txt", "empty.txt", "latin1.txt", "blob.bin"}

    # Fix the bad files: the next run ingests them and resolves (never deletes) their dead letters.
    (folder / "dims.txt").write_text("this text is fine now")
    (folder / "latin1.txt").write_text("café crème, in UTF-8 this time")
    assert all(r.success for r in vp.ingest(unique_name))
    with psycopg.connect(pg_dsn) as conn:
        resolved = conn.execute(
            "SELECT stage, count(*) FROM vector_platform.dead_letters WHERE collection = %s AND resolved_at IS NOT NULL GROUP BY stage",
            (unique_name,),
        ).fetchall()
    # latin1.txt now reads; dims.txt's old chunk is gone, so its dead letter is superseded.
    assert dict(resolved) == {"source": 1, "embed": 1}
    assert {"dims.txt", "latin1.txt"} <= {r[1] for r in _rows(pg_dsn, unique_name)}


def test_a_failing_embedding_call_dead_letters_its_batch_and_the_rest_goes_through(
    make_platform, fake_embedder, tmp_path, unique_name, pg_dsn
):
    docs = _docs(20)
    docs[3]["text"] = "EXPLODE " + docs[3]["text"]
    vp = make_platform(batch_size=4)
    vp.add_collection(unique_name, write_jsonl(tmp_path / "d.jsonl", docs))
    fake_embedder.fail_on = "EXPLODE"
    runs = vp.ingest(unique_name)
    assert all(r.success for r in runs)
    meta = runs[1].metadata["embeddings"]
    assert 1 <= meta["dead_lettered"] <= 4  # only the failing batch
    assert runs[1].checks["no_chunk_lost"] is True
    fake_embedder.fail_on = None
    runs = vp.ingest(unique_name)
    assert runs[1].metadata["embeddings"]["embedded"] == meta["dead_lettered"]
    with psycopg.connect(pg_dsn) as conn:
        assert not catalog.open_dead_letters(conn, unique_name)
    assert len(_rows(pg_dsn, unique_name)) == _chunk_count(pg_dsn, unique_name)


def test_hostile_collection_name_is_refused_by_the_cli(tmp_path, capsys, pg_dsn, monkeypatch):
    monkeypatch.setenv("VP_PG_DSN", pg_dsn)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    monkeypatch.setenv("VP_OBJECT_STORE", (tmp_path / "o").as_uri())
    source = write_jsonl(tmp_path / "d.jsonl", _docs(2))
    assert cli_main(["collections", "add", "x; DROP TABLE y", "--source", str(source)]) == 2
    assert "invalid collection name" in capsys.readouterr().err
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM vector_platform.collections WHERE name LIKE 'x;%%'").fetchone()[0] == 0
