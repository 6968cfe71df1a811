"""What users do to sources by accident: truncate, empty, move them, fill them with hostile
records. Nothing is deleted without --allow-deletes; every record is a document or a dead
letter with its reason; no database error reaches the user."""

import json
import math
import subprocess

import psycopg
from psycopg import sql

from vector_platform import catalog

from .conftest import cli, cli_env, write_jsonl


def _docs(n, prefix="doc"):
    return [{"id": f"{prefix}{i}", "text": f"Document {i} is about subject {i % 5}. " * 4} for i in range(n)]


def _live(pg_dsn, collection):
    with psycopg.connect(pg_dsn) as conn:
        return conn.execute(
            "SELECT count(*) FROM vector_platform.documents WHERE collection = %s AND deleted_at IS NULL", (collection,)
        ).fetchone()[0]


def _rows(pg_dsn, collection):
    with psycopg.connect(pg_dsn) as conn:
        table = catalog.vector_table_name(conn, collection, "minilm_l6_v2")
        return conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier("vp_vectors", table))).fetchone()[0]


def test_truncated_emptied_or_missing_source_changes_nothing_without_allow_deletes(
    make_platform, fake_embedder, tmp_path, unique_name, pg_dsn
):
    vp = make_platform()
    source = write_jsonl(tmp_path / "docs.jsonl", _docs(40))
    vp.add_collection(unique_name, source)
    assert all(r.success for r in vp.ingest(unique_name))
    rows = _rows(pg_dsn, unique_name)
    assert _live(pg_dsn, unique_name) == 40 and rows >= 40

    source.write_bytes(b"")  # a failed export
    runs = vp.ingest(unique_name)
    assert not runs[0].success and len(runs) == 1
    assert "reads as empty" in runs[0].error and "--allow-deletes" in runs[0].error and "40 live documents" in runs[0].error
    assert _live(pg_dsn, unique_name) == 40 and _rows(pg_dsn, unique_name) == rows
    assert len(vp.search("subject 3", [unique_name], k=5).hits) == 5

    write_jsonl(source, _docs(40)[:15])  # truncated mid-line: 25 of 40 would go
    with source.open("a") as f:
        f.write('{"id": "doc15", "text": "the export stopp')
    runs = vp.ingest(unique_name)
    assert not runs[0].success and "25 of 40" in runs[0].error and "max_delete_fraction" in runs[0].error
    assert _live(pg_dsn, unique_name) == 40
    with psycopg.connect(pg_dsn) as conn:  # a refused read records nothing, not even its dead letters
        assert conn.execute(
            "SELECT count(*) FROM vector_platform.dead_letters WHERE collection = %s", (unique_name,)
        ).fetchone()[0] == 0

    source.rename(tmp_path / "moved.jsonl")  # unmounted, moved, not synced yet
    runs = vp.ingest(unique_name)
    assert not runs[0].success and "does not exist" in runs[0].error and "nothing was changed" in runs[0].error
    assert _live(pg_dsn, unique_name) == 40

    # A delete below the threshold goes through; a larger one with allow_deletes too.
    (tmp_path / "moved.jsonl").rename(source)
    write_jsonl(source, _docs(40)[:30])
    assert all(r.success for r in vp.ingest(unique_name))
    assert _live(pg_dsn, unique_name) == 30
    write_jsonl(source, _docs(40)[:5])
    assert all(r.success for r in vp.ingest(unique_name, allow_deletes=True))
    assert _live(pg_dsn, unique_name) == 5 and _rows(pg_dsn, unique_name) < rows


def test_cli_refuses_an_emptied_folder_and_allow_deletes_applies_it(pg_dsn, tmp_path, unique_name):
    folder = tmp_path / "notes"
    folder.mkdir()
    for i in range(4):
        (folder / f"note{i}.txt").write_text(f"note number {i} about gardening")
    env = cli_env(pg_dsn, tmp_path)
    subprocess.run(cli("collections", "add", unique_name, "--source", str(folder)), env=env, check=True)
    # Only the documents step: the model does not matter here.
    first = subprocess.run(cli("ingest", unique_name, "--quiet"), env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout + first.stderr
    for f in folder.iterdir():
        f.unlink()
    refused = subprocess.run(cli("ingest", unique_name, "--quiet"), env=env, capture_output=True, text=True)
    assert refused.returncode == 1
    assert "reads as empty" in refused.stderr and "--allow-deletes" in refused.stderr
    assert "Traceback" not in refused.stderr + refused.stdout
    assert _live(pg_dsn, unique_name) == 4
    applied = subprocess.run(cli("ingest", unique_name, "--quiet", "--allow-deletes"), env=env, capture_output=True, text=True)
    assert "source_documents" in applied.stdout and _live(pg_dsn, unique_name) == 0


HOSTILE = {
    "nan_metadata": '{"id": "h_nan", "text": "fine text", "metadata": {"score": NaN}}',
    "infinity_metadata": '{"id": "h_inf", "text": "fine text", "metadata": {"x": [1, Infinity]}}',
    "nul_in_text": json.dumps({"id": "h_nul", "text": "before\u0000after"}),
    "nul_in_metadata_key": json.dumps({"id": "h_nulkey", "text": "ok text", "metadata": {"a\u0000b": 1}}),
    "lone_surrogate": '{"id": "h_surrogate", "text": "broken \\ud800 text"}',
    "id_too_long": json.dumps({"id": "x" * 5000, "text": "long id"}),
    "deep_metadata": '{"id": "h_deep", "text": "deep", "metadata": {"a": ' + "[" * 200 + "]" * 200 + "}}",
    "deeper_than_python": '{"id": "h_vdeep", "text": "x", "metadata": {"a": ' + "[" * 100_000 + "]" * 100_000 + "}}",
    "epoch_overflow": json.dumps({"id": "h_epoch", "text": "time", "timestamp": 1e300}),
    "bad_timestamp": json.dumps({"id": "h_ts", "text": "time", "timestamp": "2024-13-45"}),
    "metadata_not_object": json.dumps({"id": "h_meta", "text": "meta", "metadata": [1, 2]}),
    "text_not_string": json.dumps({"id": "h_num", "text": 42}),
    "title_not_string": json.dumps({"id": "h_title", "text": "t", "title": {"a": 1}}),
    "whitespace_text": json.dumps({"id": "h_blank", "text": " \t\n "}),
    "not_an_object": "[1, 2, 3]",
    "no_id": json.dumps({"text": "who am i"}),
    "bool_id": json.dumps({"id": True, "text": "boolean id"}),
    "broken_json": '{"id": "h_broken", "text": "unterminated',
    "duplicate_id": json.dumps({"id": "good_1", "text": "a second record with the same id"}),
}


def test_hostile_jsonl_lines_become_dead_letters_and_every_good_document_goes_through(
    make_platform, fake_embedder, tmp_path, unique_name, pg_dsn
):
    good = [{"id": f"good_{i}", "text": f"A perfectly good document number {i}.", "metadata": {"n": i}} for i in range(12)]
    lines = []
    for i, doc in enumerate(good):
        lines.append(json.dumps(doc).encode())
        kinds = list(HOSTILE.values())
        if i < len(kinds):
            lines.append(kinds[i].encode())
    for kind in list(HOSTILE.values())[len(good):]:
        lines.append(kind.encode())
    lines.append(b'{"id": "h_utf8", "text": "caf\xe9"}')  # not UTF-8
    lines.append(b'{"id": "h_truncated", "text": "the export stopped he')  # a truncated last line, no newline
    source = tmp_path / "hostile.jsonl"
    source.write_bytes(b"\n".join(lines))

    vp = make_platform()
    vp.add_collection(unique_name, source)
    runs = vp.ingest(unique_name)
    assert all(r.success for r in runs), [r.error for r in runs]
    assert _live(pg_dsn, unique_name) == len(good)
    documents = runs[0].metadata["source_documents"]
    assert documents["added"] == len(good) and documents["rejected"] == len(HOSTILE) + 2

    with psycopg.connect(pg_dsn) as conn:
        letters = dict(
            conn.execute(
                "SELECT ref, error FROM vector_platform.dead_letters WHERE collection = %s AND stage = 'source' "
                "AND resolved_at IS NULL",
                (unique_name,),
            ).fetchall()
        )
    assert len(letters) == len(HOSTILE) + 2
    text = " | ".join(letters.values())
    for expected in ("NaN", "inf", "NUL character", "surrogate", "over the limit of 512", "nested deeper", "nested too deeply",
                     "out of range", "not ISO 8601", "'metadata' must be an object", "'text' must be a string",
                     "'title' must be a string", "empty text", "must be a JSON object", "missing or invalid 'id'",
                     "duplicate id 'good_1'", "not valid UTF-8", "Unterminated string"):
        assert expected in text, expected
    assert "psycopg" not in text and "Traceback" not in text
    # Keyed by document id where one could be read.
    assert {"h_nan", "h_nul", "h_epoch", "h_utf8"} - set(letters) == {"h_utf8"}  # undecodable: only its line is known
    assert letters["h_nan"].startswith("line 2:")

    # Fixing the records resolves their dead letters; good documents are untouched.
    fixed = good + [{"id": "h_nan", "text": "fine text", "metadata": {"score": None}}]
    write_jsonl(source, fixed)
    runs = vp.ingest(unique_name)
    assert all(r.success for r in runs)
    with psycopg.connect(pg_dsn) as conn:
        still_open = conn.execute(
            "SELECT count(*) FROM vector_platform.dead_letters WHERE collection = %s AND stage = 'source' AND resolved_at IS NULL",
            (unique_name,),
        ).fetchone()[0]
        nan_doc = conn.execute(
            "SELECT metadata FROM vector_platform.documents WHERE collection = %s AND doc_id = 'h_nan'", (unique_name,)
        ).fetchone()[0]
    assert still_open == 0 and nan_doc == {"score": None}
    assert not math.isnan(vp.search("perfectly good", [unique_name], k=3).hits[0].score)


def test_a_bad_new_version_of_a_document_keeps_the_old_one_live(make_platform, fake_embedder, tmp_path, unique_name, pg_dsn):
    vp = make_platform()
    docs = _docs(10)
    source = write_jsonl(tmp_path / "docs.jsonl", docs)
    vp.add_collection(unique_name, source)
    assert all(r.success for r in vp.ingest(unique_name))
    lines = [json.dumps(d) for d in docs]
    lines[3] = '{"id": "doc3", "text": "new text", "metadata": {"v": NaN}}'
    source.write_text("\n".join(lines) + "\n")
    assert all(r.success for r in vp.ingest(unique_name))
    with psycopg.connect(pg_dsn) as conn:
        body, deleted = conn.execute(
            "SELECT body, deleted_at FROM vector_platform.documents WHERE collection = %s AND doc_id = 'doc3'", (unique_name,)
        ).fetchone()
    assert deleted is None and body.startswith("Document 3")
    assert _live(pg_dsn, unique_name) == 10


def test_a_file_name_that_is_not_utf8_is_a_dead_letter_and_the_folder_goes_through(
    make_platform, fake_embedder, tmp_path, unique_name, pg_dsn
):
    import os

    folder = tmp_path / "notes"
    folder.mkdir()
    for i in range(3):
        (folder / f"note{i}.txt").write_text(f"note {i} about moss and lichen")
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.txt"), "wb") as f:  # a Latin-1 name from an old archive
        f.write(b"text in a badly named file")
    vp = make_platform()
    vp.add_collection(unique_name, folder)
    runs = vp.ingest(unique_name)
    assert all(r.success for r in runs), [r.error for r in runs]
    assert _live(pg_dsn, unique_name) == 3
    with psycopg.connect(pg_dsn) as conn:
        ref, error = conn.execute(
            "SELECT ref, error FROM vector_platform.dead_letters WHERE collection = %s AND stage = 'source'", (unique_name,)
        ).fetchone()
    assert ref == "caf\\xe9.txt" and "surrogate" in error
    assert all(r.success for r in vp.ingest(unique_name))  # and again: the same dead letter, nothing breaks
