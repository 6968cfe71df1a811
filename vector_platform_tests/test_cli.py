"""The CLI contract: collections add, ingest, search --json/--queries, status --json, dead-letters."""

import json
import subprocess

from vector_platform.models import MINILM

from .conftest import cli, cli_env


def test_cli_contract_end_to_end(pg_dsn, tmp_path, unique_name):
    env = cli_env(pg_dsn, tmp_path)
    docs = tmp_path / "notes"
    docs.mkdir()
    (docs / "postgres.md").write_text("# PostgreSQL\n\nPostgreSQL is a relational database with extensions such as pgvector.")
    (docs / "dagster.md").write_text("# Dagster\n\nDagster orchestrates data assets, schedules and sensors.")
    (docs / "bread.html").write_text("<html><title>Bread</title><body><p>Knead the dough and bake the bread in a hot oven.</p></body></html>")
    (docs / "broken.txt").write_bytes(b"\xff\xfe\xfa not utf-8")

    def run(*args, check=True):
        done = subprocess.run(cli(*args), env=env, capture_output=True, text=True, timeout=600)
        if check:
            assert done.returncode == 0, done.stdout + done.stderr
        return done

    added = run("collections", "add", unique_name, "--source", str(docs), "--hnsw-m", "8", "--hnsw-ef-construction", "32")
    assert unique_name in added.stdout
    ingest = run("ingest", unique_name, "--quiet")
    assert "serving_view_job" in ingest.stdout and "FAILED" not in ingest.stdout

    queries = tmp_path / "queries.txt"
    queries.write_text("how do I bake bread\nvector database extension\n")
    out = run("search", "--collection", unique_name, "--queries", str(queries), "--json", "-k", "2").stdout.splitlines()
    results = [json.loads(line) for line in out]
    assert [r["query"] for r in results] == ["how do I bake bread", "vector database extension"]
    for r in results:
        assert set(r) == {"query", "hits", "stats", "warnings"}
        assert len(r["hits"]) == 2
        for hit in r["hits"]:
            assert set(hit) == {"collection", "chunk_id", "doc_id", "score", "text", "metadata", "source_tier", "exact",
                                "model", "fingerprint"}
            assert hit["source_tier"] == "active" and hit["exact"] is False and hit["collection"] == unique_name
            assert hit["model"] == MINILM.key and hit["fingerprint"] == MINILM.fingerprint
    assert results[0]["hits"][0]["doc_id"] == "bread.html"
    assert results[1]["hits"][0]["doc_id"] == "postgres.md"

    exact = json.loads(run("search", "vector database extension", "--collection", unique_name, "--exact", "--json").stdout)
    assert exact["stats"]["mode"] == "exact" and exact["hits"][0]["doc_id"] == "postgres.md"

    status = json.loads(run("status", "--json").stdout)
    mine = next(c for c in status["collections"] if c["name"] == unique_name)
    for key in ("name", "tier", "documents", "chunks", "vectors", "dead_letters", "bytes_postgres", "bytes_object_store"):
        assert key in mine
    assert mine["tier"] == "active" and mine["documents"] == 3 and mine["vectors"] == mine["chunks"] == 3
    assert mine["dead_letters"] == 1 and mine["bytes_postgres"] > 0
    assert mine["settings"]["hnsw_m"] == 8

    letters = json.loads(run("dead-letters", "--collection", unique_name, "--json").stdout)["dead_letters"]
    assert [(d["ref"], d["stage"]) for d in letters] == [("broken.txt", "source")]
    assert "UTF-8" in letters[0]["error"]

    unknown = run("ingest", "no_such_collection", check=False)
    assert unknown.returncode == 2 and "unknown collection" in unknown.stderr
