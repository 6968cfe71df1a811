"""Pure functions: names, sources, chunking, the vector gate, metrics, the object store."""

import json
import math

import numpy as np
import pytest

from vector_platform import metrics
from vector_platform.ingest.chunking import Chunker, chunk_id
from vector_platform.ingest.embedders import LocalEmbedder
from vector_platform.models import MINILM, ModelSpec
from vector_platform.names import InvalidName, bounded_identifier, validate_name
from vector_platform.settings import CollectionSettings
from vector_platform.ingest.sources import Document, Rejection, read_source
from vector_platform.ingest.validation import check_matrix, gate


@pytest.mark.parametrize("name", ["x; DROP TABLE y", "Docs", "1abc", "", "a" * 49, 'a"b', "ä", "a-b", "a b"])
def test_hostile_or_malformed_names_are_refused(name):
    with pytest.raises(InvalidName, match="invalid collection name"):
        validate_name(name)


def test_identifiers_never_exceed_postgres_limit_and_stay_distinct():
    a = bounded_identifier("a" * 48, "model_" + "x" * 40)
    b = bounded_identifier("a" * 48, "model_" + "y" * 40)
    assert len(a) <= 63 and len(b) <= 63 and a != b
    assert bounded_identifier("docs", "minilm_l6_v2") == "docs__minilm_l6_v2"


def test_model_spec_validation():
    with pytest.raises(ValueError, match="distance"):
        ModelSpec("m", "local", "x", 10, distance="manhattan")
    with pytest.raises(ValueError, match="1..4000 dimensions"):
        ModelSpec("m", "local", "x", 4001)
    wide = ModelSpec("m", "local", "x", 3072)  # a vector model over 2,000 dims: indexed as halfvec
    assert wide.index_type == "halfvec" and ModelSpec("m", "local", "x", 2000).index_type == "vector"
    assert ModelSpec("m", "local", "x", 3072, storage_type="halfvec").dims == 3072


def test_settings_refuse_nonsense():
    with pytest.raises(ValueError):
        CollectionSettings(hnsw_m=1)
    with pytest.raises(ValueError):
        CollectionSettings(hnsw_m=32, hnsw_ef_construction=40)
    assert CollectionSettings.from_json({"hnsw_m": 8, "unknown": 1}).hnsw_m == 8


def test_folder_source_reads_text_markdown_html_and_rejects_bad_files(tmp_path):
    (tmp_path / "a.txt").write_text("plain text here")
    (tmp_path / "b.md").write_text("# Title\n\nSome *markdown*.")
    (tmp_path / "c.html").write_text("<html><head><title>Page  T</title></head><body><p>Hello <b>web</b></p><script>x</script></body></html>")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / ".hidden").write_text("skip me")
    items = list(read_source(str(tmp_path), max_bytes=1_000_000))
    docs = {i.doc_id: i for i in items if isinstance(i, Document)}
    rejected = {i.ref: i.error for i in items if isinstance(i, Rejection)}
    assert set(docs) == {"a.txt", "b.md", "c.html"}
    assert docs["c.html"].title == "Page T" and "Hello web" in docs["c.html"].body and "<p>" not in docs["c.html"].body
    assert "not valid UTF-8" in rejected["bad.txt"]
    assert "binary" in rejected["image.png"]
    assert rejected["empty.txt"] == "empty text"


def test_jsonl_source_rejects_bad_lines_and_keeps_the_rest(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [
        json.dumps({"id": "1", "text": "good one", "title": "T", "timestamp": "2024-05-01T00:00:00Z", "metadata": {"k": 1}}),
        "{not json",
        json.dumps({"id": "2", "text": ""}),
        json.dumps({"id": "3", "text": "ok", "timestamp": "yesterday"}),
        json.dumps({"text": "no id"}),
        json.dumps({"id": 4, "text": "integer id", "timestamp": 1700000000}),
    ]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"id": "5", "text": "bad \xff bytes"}\n')
    items = list(read_source(str(path), max_bytes=10_000))
    docs = [i for i in items if isinstance(i, Document)]
    rejected = [i for i in items if isinstance(i, Rejection)]
    assert [d.doc_id for d in docs] == ["1", "4"]
    assert docs[0].source_ts.year == 2024 and docs[0].metadata == {"k": 1}
    assert docs[1].source_ts.year == 2023
    reasons = " | ".join(r.error for r in rejected)
    for expected in ("Expecting", "empty text", "not ISO 8601", "'id'", "not valid UTF-8"):
        assert expected in reasons
    assert len(rejected) == 5
    # Keyed by document id where one can be read (so a later good line resolves it), else by line.
    assert sorted(r.ref for r in rejected) == ["2", "3", "line 2", "line 5", "line 7"]


@pytest.fixture(scope="module")
def chunker():
    return Chunker(LocalEmbedder(MINILM).tokenizer(), max_tokens=MINILM.max_tokens, overlap=16)


def test_chunks_fit_the_model_and_ids_are_deterministic(chunker):
    text = "\n\n".join(f"Paragraph {i}. " + "The cell membrane regulates transport of ions. " * 12 for i in range(8))
    chunks = chunker.split("c", "doc", text)
    assert len(chunks) > 3
    assert max(c.token_count for c in chunks) <= MINILM.max_tokens
    # Every chunk's real token count (with [CLS]/[SEP]) is within the model's window.
    assert all(len(chunker.tokenizer.encode(c.text).ids) <= 256 for c in chunks)
    again = chunker.split("c", "doc", text)
    assert [c.chunk_id for c in chunks] == [c.chunk_id for c in again]
    assert chunks[0].chunk_id == chunk_id("c", "doc", chunks[0].text)
    assert chunker.split("other", "doc", text)[0].chunk_id != chunks[0].chunk_id


def test_split_many_is_split_of_each_and_one_failure_stays_with_its_document(chunker):
    long = "\n\n".join(f"Part {i}. " + "Ions cross the membrane through channels. " * 10 for i in range(6))
    docs = [("a", "short text"), ("b", long), ("c", "   "), ("d", "another short one")]
    assert chunker.split_many("c", docs) == [chunker.split("c", d, t) for d, t in docs]

    def count(text: str) -> int:  # a counter that refuses one text (an API tokenizer's error, say)
        if "BOOM" in text:
            raise ValueError("cannot count this")
        return len(text.split())

    counting = Chunker.from_token_counter(count, max_tokens=50, overlap=5)
    out = counting.split_many("c", [("ok1", "fine words here"), ("bad", "BOOM " + "word " * 80), ("ok2", " ".join(f"w{i}" for i in range(120)))])
    assert isinstance(out[1], ValueError)
    assert [c.text for c in out[0]] == ["fine words here"]
    assert len(out[2]) > 2 and all(c.token_count <= 50 for c in out[2])


def test_chunker_counts_tokens_not_characters(chunker):
    # 300 short words are ~300 tokens: more than one chunk, though far under 256 * 4 characters.
    chunks = chunker.split("c", "d", " ".join(["cat"] * 300))
    assert len(chunks) == 2


def test_a_text_that_fits_is_one_chunk_exactly_as_the_splitter_cuts_it(chunker):
    # The one-tokenization shortcut for a text that fits must give the splitter's own answer:
    # the text trimmed as the splitter trims (not U+001C..U+001F, which str.strip() takes),
    # the same count, and at the boundary (capacity, capacity + 1 tokens) the same cut.
    capacity = chunker.capacity
    texts = ["  Short abstract.\n\nWith a body.  \n", "\x1c kept separator \u3000", "\u00a0nbsp\u2028", "   ",
             " ".join(["cat"] * capacity), " ".join(["cat"] * (capacity + 1)), " ".join(["cat"] * 300)]
    for text in texts:
        fast = [(c.chunk_id, c.text, c.token_count) for c in chunker.split("c", "d", text)]
        pieces = [p for p in chunker._splitter.chunks(text) if p.strip()]
        slow = [(chunk_id("c", "d", p), p, len(chunker.tokenizer.encode(p).ids)) for p in pieces]
        assert fast == slow, text[:40]
    assert len(chunker.split("c", "d", " ".join(["cat"] * capacity))) == 1
    assert len(chunker.split("c", "d", " ".join(["cat"] * (capacity + 1)))) == 2


def test_api_models_are_chunked_by_their_own_bpe():
    from vector_platform.ingest.api_embedder import count_tokens_function

    count = count_tokens_function("cl100k_base")
    chunker = Chunker.from_token_counter(count, max_tokens=100, overlap=10)
    text = "\n\n".join(f"Paragraph {i}. " + "Enzymes lower the activation energy of reactions. " * 6 for i in range(10))
    chunks = chunker.split("c", "d", text)
    assert len(chunks) > 5
    assert all(c.token_count == count(c.text) <= 100 for c in chunks)


def test_gate_rejects_each_bad_vector_with_its_reason_and_normalises_the_rest():
    good = np.ones(4, np.float32) * 2
    result = gate([good, np.ones(3), [1, np.nan, 0, 0], np.zeros(4), "abc", [0, 3, 4, 0]], dims=4, normalise=True)
    assert list(result.accepted) == [0, 5]
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, rtol=1e-6)
    reasons = dict(result.rejected)
    assert "wrong dimensions" in reasons[1] and "non-finite" in reasons[2] and "zero vector" in reasons[3]
    assert "not a numeric vector" in reasons[4]
    assert check_matrix(result.vectors, 4, unit=True) == []
    assert check_matrix(np.ones((2, 4), np.float32), 4, unit=True)  # not unit length


def test_metrics():
    assert metrics.recall_at_k(["a", "b", "x"], ["a", "b", "c"], k=3) == pytest.approx(2 / 3)
    assert metrics.ndcg_at_k(["a", "b"], {"a": 1}) == 1.0
    assert metrics.ndcg_at_k(["b", "a"], {"a": 1}) == pytest.approx(1 / math.log2(3))
    assert metrics.percentile([1, 2, 3, 4], 50) == 2


def test_vector_table_names_never_collide_and_fit_postgres():
    from vector_platform.catalog.collections import table_name_for

    assert table_name_for("a__b", "c") != table_name_for("a", "b__c")
    long = table_name_for("c" * 48, "m" * 48)
    assert len(long) <= 63 and long != table_name_for("c" * 48, "m" * 47 + "n")
    assert table_name_for("docs", "minilm_l6_v2").startswith("docs__minilm_l6_v2_")


def test_settings_saved_by_an_older_release_stay_readable_but_new_changes_are_checked():
    old = CollectionSettings.from_json({"chunk_max_tokens": 48, "chunk_overlap_tokens": 32, "recall_target": 0.9})
    assert old.chunk_max_tokens == 48  # readable (the chunker clamps the overlap to half)
    with pytest.raises(ValueError, match="at most half"):
        old.changed(chunk_max_tokens=40)
    assert old.changed(chunk_overlap_tokens=8).chunk_overlap_tokens == 8


def test_the_quality_gate_latency_rule_fails_a_slow_shadow_and_times_stored_vectors_without_queries():
    from vector_platform.upgrade import gate as quality_gate

    def searcher(ms):  # a search that answers one fixed list in `ms` milliseconds
        def search(spec, vectors, k):
            return [[("c1", "d1")] for _ in vectors], [ms] * len(vectors)
        return search

    vectors = [np.ones(MINILM.dims, np.float32)] * 20
    strict = CollectionSettings(upgrade_latency_floor_ms=0.0)
    for settings, shadow_ms, fails in (
        (strict, 10.0, True),  # 10 x slower than the serving model, over the factor 2
        (strict, 1.5, False),  # within the factor
        (CollectionSettings(), 4.0, False),  # slower, but under the default 5 ms floor
        (CollectionSettings(), 12.0, True),  # over both
    ):
        figures, reasons = {}, []
        quality_gate._compare(figures, reasons, settings, None, MINILM, searcher(shadow_ms), MINILM, searcher(1.0),
                              [], [], stored=(vectors, vectors))
        assert figures["p95_ms_shadow"] == shadow_ms and figures["p95_ms_serving"] == 1.0
        assert "stored vectors" in figures["latency_queries"] and "overlap_at_10" not in figures
        assert bool(reasons) == fails, (shadow_ms, reasons)
        assert figures["latency_rounds"] == (3 if fails else 1)  # a slower round is measured again before it counts
    figures, reasons = {}, []
    quality_gate._compare(figures, reasons, strict, None, MINILM, searcher(10.0), MINILM, searcher(1.0), [], [], stored=None)
    assert "not measured" in figures["latency"] and reasons == []
    with pytest.raises(ValueError, match="upgrade_latency_floor_ms"):
        CollectionSettings().changed(upgrade_latency_floor_ms=-1.0)


def test_the_catalog_listener_says_an_outage_once_not_every_second(tmp_path, caplog):
    """A search process whose database is gone (a restart, a teardown) warns once that the
    catalog listener lost its connection, then keeps retrying quietly."""
    import logging
    import time

    from vector_platform.search.facts import FactsCache

    caplog.set_level(logging.DEBUG, logger="vector_platform.search.facts")
    cache = FactsCache(f"host={tmp_path} port=5999 dbname=none connect_timeout=1")  # no server on that socket
    time.sleep(1.5)  # the constructor waited 5 s for the listener: a few attempts each second
    cache.close()
    said = [r for r in caplog.records if "catalog listener" in r.getMessage()]
    assert [r.levelno for r in said].count(logging.WARNING) == 1
    assert len(said) >= 3  # it kept trying (the retries logged at debug)
