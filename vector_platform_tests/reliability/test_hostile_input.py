"""Hostile input at every door of the Python API and the CLI, property-based: collection
names, model keys, settings, metadata filters, query texts and vectors, JSONL records.

What a user may see: the product's own validation error (ValueError / KeyError with a message
that says what is wrong; exit code 2 and `error: ...` from the CLI), a warning in a search
result, or a dead letter with its reason. Never a psycopg error, a RecursionError or a
traceback. And after every example the canary table still holds its row, and the catalog,
the other collections' vectors, the roles and the databases are as they were.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import uuid

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from psycopg import sql

from vector_platform import catalog
from vector_platform.models import ModelSpec
from vector_platform.names import NAME_PATTERN
from vector_platform.search import filters as filter_language
from vector_platform.search import flush_query_log

from ..conftest import write_jsonl
from .hostile import (
    CORE, DEEP, DEEP_JSON, DEEP_OPAQUE, HUGE_NUMBERS, INJECTIONS, PAYLOADS, TARGETED_FILTERS, WORDS, Opaque, Sentinel, any_text,
    bounded, corpus, every, json_objects, json_texts, json_values, numbers, shared_collections, storable_text, unwrap,
)

# The errors a caller may get for bad input: the product's own, with a message.
VALIDATION = (ValueError, KeyError)


class World:
    """The shared active and cold collections, plus a target the JSONL property re-ingests and
    the settings property changes; the sentinel guards everything else."""

    def __init__(self, shared, target: str, sentinel: Sentinel):
        self.vp, self.active, self.cold, self.folder = shared.vp, shared.active, shared.cold, shared.folder
        self.target, self.sentinel = target, sentinel


@pytest.fixture(scope="module")
def world(pg_dsn, dagster_instance, tmp_path_factory):
    shared = shared_collections(pg_dsn, dagster_instance, tmp_path_factory)
    target = f"hostile_{uuid.uuid4().hex[:6]}_target"
    shared.vp.add_collection(target, write_jsonl(shared.folder / "target.jsonl", corpus(3, "t")))  # ingested by the JSONL property
    sentinel = Sentinel(pg_dsn, spare=(target,)).plant()
    yield World(shared, target, sentinel)
    sentinel.check()
    sentinel.remove()


def _no_database_error(err: BaseException) -> None:
    """The error a user got is the product's own: no psycopg error under it, no internals in it."""
    chain, seen = err, set()
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        assert not isinstance(chain, psycopg.Error), f"a database error reached the caller: {chain!r}"
        chain = chain.__cause__ or chain.__context__
    text = str(err)
    for leak in ("psycopg", "Traceback", "syntax error at or near", "SQLSTATE"):
        assert leak not in text, f"{leak!r} in the error {text!r}"


def _refused(call, *args, **kwargs) -> BaseException | None:
    """Call; None when it answered, the validation error when it refused. Anything else fails."""
    try:
        call(*args, **kwargs)
    except VALIDATION as err:
        _no_database_error(err)
        return err
    return None


# ---------------------------------------------------------------- names

@bounded(60)
@every("name", CORE)
@given(name=any_text)
def test_hostile_collection_names_are_refused_with_a_clear_error_at_every_door(world, name):
    vp = world.vp
    valid = bool(NAME_PATTERN.fullmatch(name))
    if not valid:
        err = _refused(vp.add_collection, name, world.folder / "target.jsonl")
        assert err is not None and "invalid collection name" in str(err)
        for call, args in ((vp.collection, ()), (vp.ingest, ()), (vp.set_settings, ()), (vp.set_rules, ()),
                           (vp.get, ("doc1",)), (vp.tier, ("cold",)), (vp.archive_rows, ())):
            err = _refused(call, name, *args)
            assert err is not None, f"{call.__name__}({name!r}) did not refuse"
        err = _refused(vp.search, "alpha", [world.active, name])
        assert err is not None and "invalid collection name" in str(err)
    else:  # a well-formed name nobody declared: unknown, said plainly
        assert _refused(vp.collection, name) is not None
        result = vp.search("alpha", [world.active, name], k=3)
        assert len(result.hits) == 3 and f"unknown collection {name!r} skipped" in result.warnings
    world.sentinel.check()


@bounded(30)
@every("key", CORE)
@given(key=any_text)
def test_hostile_model_keys_are_refused(world, key):
    vp = world.vp
    if NAME_PATTERN.fullmatch(key):
        return  # a well-formed key would be registered: not what this property is about
    err = _refused(lambda: vp.add_model(ModelSpec(key, "openai", "fake", 8)))
    assert err is not None and "invalid model key name" in str(err)
    if key:  # an empty model means none given: the collection keeps its models
        assert _refused(vp.add_collection, world.target, None, model=key) is not None
    world.sentinel.check()


@bounded(40)
@every("value", [*HUGE_NUMBERS, "\x00", "16; DROP TABLE canary", 10**400, {"a": "\x00"}], setting="retain_previous_days")
@every("value", [*HUGE_NUMBERS, "\x00", "16; DROP TABLE canary", "16", 16.0, True], setting="hnsw_m")
@every("value", [{"a": "\x00"}, {"\ud800": 1}, {"a": float("nan")}, "x", [1], DEEP_OPAQUE[1]], setting="extra")
@given(setting=st.sampled_from(["hnsw_m", "hnsw_ef_search", "recall_target", "chunk_max_tokens", "max_delete_fraction",
                                 "no_such_setting", "extra", "'; DROP TABLE canary; --"]),
       value=st.one_of(numbers, any_text, st.none(), st.booleans(), json_values))
def test_hostile_settings_and_rules_are_refused_or_stored_exactly(world, setting, value):
    vp, value = world.vp, unwrap(value)
    before = vp.collection(world.target).settings
    try:
        _, after = vp.set_settings(world.target, **{setting: value})
    except VALIDATION as err:
        _no_database_error(err)
        assert vp.collection(world.target).settings == before
    else:
        stored = getattr(vp.collection(world.target).settings, setting)
        assert stored == getattr(after, setting) and stored == value
        vp.set_settings(world.target, **{setting: getattr(before, setting)})
    for rule in ("evict_after_days", "archive_after_days", "archive_rows_older_than_days", "rehydrate_on_query"):
        _refused(vp.set_rules, world.target, **{rule: value})
    world.sentinel.check()


# ---------------------------------------------------------------- the CLI

def _cli(world, *argv: str) -> tuple[int, str]:
    """The CLI's main() in this process on the world's platform: exit code and what it printed."""
    from vector_platform import cli

    out = io.StringIO()
    original = cli._platform
    cli._platform = lambda: world.vp
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                code = cli.main(list(argv))
            except SystemExit as exit_:  # argparse's own usage errors
                code = exit_.code
    finally:
        cli._platform = original
    return code, out.getvalue()


def _no_traceback(argv, code: int, printed: str) -> None:
    for leak in ("Traceback", "psycopg", "SQLSTATE"):
        assert leak not in printed, (argv, printed)
    if code != 0:
        assert code in (1, 2) and ("error:" in printed or "usage:" in printed), (argv, printed)


@bounded(15)
@every("name", CORE + ["-x", "--help-me"])
@given(name=any_text)
def test_the_cli_answers_hostile_names_with_an_error_line_and_exit_code_2(world, name):
    source = str(world.folder / "target.jsonl")
    adds = [("collections", "add", name, "--source", source)] if not NAME_PATTERN.fullmatch(name) else []
    for argv in (*adds, ("search", "alpha", "--collection", name, "--json"), ("get", name, name or "x"),
                 ("tier", name, "cold"), ("collections", "rules", name),
                 ("dead-letters", "--collection", name), ("audit", "--collection", name), ("audit", "--principal", name)):
        code, printed = _cli(world, *argv)
        _no_traceback(argv, code, printed)
        if argv[0] in ("collections", "tier", "get") and not NAME_PATTERN.fullmatch(name) and not name.startswith("-"):
            assert code == 2 and "invalid collection name" in printed, (argv, printed)
    world.sentinel.check()


@bounded(20)
@every("filters", DEEP_JSON + ['{"a": NaN}', '{"a": 1e999}', '{"a": -Infinity}', '{"a": "\\u0000"}', '{"\\ud800": 1}',
                               '{"tag": "\') ; DROP TABLE canary; --"}', '{"a": 1', "[1]", "9" * 5000, "{" * 5000])
@given(filters=json_texts)
def test_the_cli_answers_hostile_filters_with_an_error_line_or_matching_hits(world, filters):
    argv = ("search", "alpha", "--collection", world.active, "--filters", filters, "--json")
    code, printed = _cli(world, *argv)
    _no_traceback(argv, code, printed)
    if code == 0:
        result = json.loads(printed.splitlines()[0])
        given = json.loads(filters) if filters else None  # "" and "null" mean no filter
        assert all(filter_language.contains(h["metadata"], given) for h in result["hits"] if given)
    world.sentinel.check()


# ---------------------------------------------------------------- filters

@bounded(60)
@every("filters", TARGETED_FILTERS)
@given(filters=st.one_of(json_objects, json_values, st.sampled_from(DEEP_OPAQUE).map(lambda o: Opaque(o.label, {"a": o.value}))))
def test_hostile_filters_get_one_verdict_in_every_tier_and_never_a_database_error(world, filters):
    vp, filters = world.vp, unwrap(filters)
    verdicts = []
    for names, exact in (([world.active], False), ([world.active], True), ([world.cold], True)):
        try:
            result = vp.search("alpha beta", names, k=5, exact=exact, filters=filters)
        except VALIDATION as err:
            _no_database_error(err)
            verdicts.append("refused")
            continue
        verdicts.append("answered")
        assert all(filter_language.contains(h.metadata, filters) for h in result.hits) or not filters, filters
        assert not any("could not be read" in w for w in result.warnings), result.warnings
    assert len(set(verdicts)) == 1, f"tiers disagree on {filters!r}: {verdicts}"
    world.sentinel.check()


@bounded(40)
@given(key=any_text, value=st.one_of(any_text, numbers))
def test_a_filter_built_from_an_injection_matches_nothing_it_should_not(world, key, value):
    """A filter of one hostile key/value: refused, or answered with only documents that hold
    exactly that pair (none of the active collection's documents do, except by its tag)."""
    vp = world.vp
    try:
        result = vp.search("alpha", [world.active], k=60, exact=True, filters={key: value})
    except VALIDATION as err:
        _no_database_error(err)
    else:
        assert all(h.metadata.get(key) == value for h in result.hits)
        if key == "tag" and value in INJECTIONS:
            assert result.hits, "an injection stored as metadata is found by its exact value"
    world.sentinel.check()


# ---------------------------------------------------------------- queries and vectors

@bounded(60)
@every("query", CORE, k=5)
@every("k", [*HUGE_NUMBERS, 0, 1000, 1001, True, "5"], query="alpha")
@given(query=st.one_of(any_text, st.sampled_from(PAYLOADS).map(lambda p: p * 500)), k=st.one_of(st.integers(-5, 1005), numbers))
def test_hostile_query_texts_and_k_are_answered_or_refused(world, query, k):
    vp = world.vp
    try:
        result = vp.search(query, [world.active, world.cold], k=k)
    except VALIDATION as err:
        _no_database_error(err)
    else:
        assert isinstance(k, int) and 1 <= k <= 1000
        assert len(result.hits) == min(k, 90)
    world.sentinel.check()


@bounded(40)
@every("vector", [[x] * 384 for x in HUGE_NUMBERS] + [[1.0] * 383, [1.0] * 385, [True] * 384, ["1"] * 384, [None] * 384,
                  [[0.1]] * 384, [], "0.1", {"0": 0.1}])
@given(vector=st.one_of(
    st.lists(numbers, min_size=384, max_size=384),
    st.lists(st.floats(-1, 1), min_size=0, max_size=400),
    st.lists(st.one_of(numbers, st.booleans(), any_text, st.none()), max_size=384),
    st.sampled_from([[10**400] * 384, [1e308] * 384, [float("nan")] * 384, [0.0] * 384, [[0.1] * 384], "0.1" * 384]),
))
def test_hostile_query_vectors_are_refused_with_a_clear_error(world, vector):
    vp = world.vp
    try:
        result = vp.search(None, [world.active, world.cold], vector=vector, k=4)
    except VALIDATION as err:
        _no_database_error(err)
    else:
        assert len(result.hits) == 4 and all(math.isfinite(h.score) for h in result.hits)
    world.sentinel.check()


def test_one_query_text_the_database_cannot_store_does_not_cost_the_batch_its_other_rows(world, pg_dsn):
    """The query log writes in batches: a text with NUL or a lone surrogate is stored cleaned,
    and the entries beside it in the same batch are stored too."""
    import datetime as dt

    import numpy as np

    from vector_platform.search.log import QueryLog

    pool = world.vp.pool()
    log = QueryLog(lambda: pool, flush_s=3600)
    marker = f"beside the hostile one {uuid.uuid4().hex}"
    vec = np.ones(384, np.float32) / np.sqrt(384)
    at = dt.datetime.now(dt.timezone.utc)
    for text in ("nul \x00 inside", "lone \ud800 surrogate", marker):
        log.record(at, [(world.active, "minilm_l6_v2", "ann", 5, 1.0, 5, text, vec)], [world.active], [])
    log._wake.set()
    log.flush()
    assert log.dropped == 0
    with psycopg.connect(pg_dsn) as conn:
        texts = {r[0] for r in conn.execute("SELECT query_text FROM vector_platform.query_stats WHERE queried_at = %s", (at,))}
    assert texts == {"nul  inside", "lone \ufffd surrogate", marker}
    world.sentinel.check()


def test_the_query_log_still_records_after_hostile_queries(world, pg_dsn):
    """A query text PostgreSQL cannot store must not poison the batched query log: the searches
    after it are logged, and last_queried_at moves."""
    vp = world.vp
    for query in ("a\x00b", "broken \ud800 text", "'; DROP TABLE canary; --", "x" * 100_000):
        try:
            vp.search(query, [world.active], k=1)
        except VALIDATION as err:
            _no_database_error(err)
    marker = f"after the storm {uuid.uuid4().hex}"
    vp.search(marker, [world.active], k=1)
    flush_query_log(vp.pool())
    with psycopg.connect(pg_dsn) as conn:
        logged = conn.execute("SELECT count(*) FROM vector_platform.query_stats WHERE query_text = %s", (marker,)).fetchone()[0]
        injection = conn.execute("SELECT count(*) FROM vector_platform.query_stats WHERE query_text = %s",
                                 ("'; DROP TABLE canary; --",)).fetchone()[0]
    assert logged == 1 and injection >= 1
    world.sentinel.check()


# ---------------------------------------------------------------- JSONL sources

good_ids = st.one_of(storable_text.filter(lambda s: 0 < len(s) <= 200 and s.strip() == s and s), st.integers(0, 10**12))
good_metadata = st.dictionaries(storable_text, st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53), st.floats(allow_nan=False, allow_infinity=False),
              storable_text),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(storable_text, inner, max_size=3)),
    max_leaves=8,
), max_size=4)


@st.composite
def good_record(draw, i: int):
    words = " ".join(draw(st.lists(st.sampled_from(WORDS), min_size=2, max_size=6)))
    record = {"id": f"g{i}:{draw(good_ids)}", "text": f"{words} {draw(storable_text)}", "metadata": draw(good_metadata)}
    if draw(st.booleans()):
        record["title"] = draw(storable_text)
    return record


# Each bad record has one defect a reader must turn into a dead letter, and its reason.
BAD_KINDS = {
    "nul_text": (lambda i, p: json.dumps({"id": f"b{i}", "text": f"x {p} \u0000 y"}), "NUL character"),
    "nul_metadata_key": (lambda i, p: json.dumps({"id": f"b{i}", "text": "ok words", "metadata": {f"{p}\u0000": 1}}),
                         "NUL character"),
    "nul_metadata_value": (lambda i, p: json.dumps({"id": f"b{i}", "text": "ok words", "metadata": {"k": [p, "\u0000"]}}),
                           "NUL character"),
    "nul_id": (lambda i, p: json.dumps({"id": f"b{i}\u0000{p}", "text": "ok words"}), "NUL character"),
    "surrogate_text": (lambda i, p: '{"id": "b%d", "text": "broken \\udc00 %s"}' % (i, json.dumps(p)[1:-1]),
                       "surrogate"),
    "surrogate_key": (lambda i, p: '{"id": "b%d", "text": "ok words", "metadata": {"\\ud800": 1}}' % i, "surrogate"),
    "nan": (lambda i, p: '{"id": "b%d", "text": "ok words", "metadata": {"v": NaN}}' % i, "NaN"),
    "infinity": (lambda i, p: '{"id": "b%d", "text": "ok words", "metadata": {"v": [-Infinity]}}' % i, "inf"),
    "huge_float": (lambda i, p: '{"id": "b%d", "text": "ok words", "metadata": {"v": 1e999}}' % i, "inf"),
    "deep": (lambda i, p: json.dumps({"id": f"b{i}", "text": "ok words", "metadata": {"d": DEEP[1]}}), "nested deeper"),
    "deeper_than_python": (lambda i, p: '{"id": "b%d", "text": "x", "metadata": %s}' % (i, "[" * 50_000 + "]" * 50_000),
                           "nested too deeply"),
    "long_id": (lambda i, p: json.dumps({"id": f"b{i}" + p * 600 + "x" * 600, "text": "ok words"}), "over the limit"),
    "empty_text": (lambda i, p: json.dumps({"id": f"b{i}", "text": " \t\n"}), "empty text"),
    "text_not_string": (lambda i, p: json.dumps({"id": f"b{i}", "text": {"sql": p}}), "'text' must be a string"),
    "metadata_not_object": (lambda i, p: json.dumps({"id": f"b{i}", "text": "ok", "metadata": [p]}), "must be an object"),
    "bool_id": (lambda i, p: json.dumps({"id": True, "text": p or "x"}), "missing or invalid 'id'"),
    "no_id": (lambda i, p: json.dumps({"text": p or "x"}), "missing or invalid 'id'"),
    "not_an_object": (lambda i, p: json.dumps([p, i]), "must be a JSON object"),
    "broken_json": (lambda i, p: '{"id": "b%d", "text": "unterminated' % i, ("Unterminated string", "Invalid control character")),
    "epoch_overflow": (lambda i, p: json.dumps({"id": f"b{i}", "text": "ok", "timestamp": 10**400}), "out of range"),
    "bad_timestamp": (lambda i, p: json.dumps({"id": f"b{i}", "text": "ok", "timestamp": p + "2024-13-45"}), "not ISO 8601"),
}


@st.composite
def jsonl_file(draw, good_range=(1, 8), bad_range=(1, 8), every_kind=False):
    """Lines (good and bad shuffled), the good records, and each bad line's expected reason;
    with `every_kind`, each kind of bad record at least once."""
    n_good = draw(st.integers(*good_range))
    good = [draw(good_record(i)) for i in range(n_good)]
    kinds = (sorted(BAD_KINDS) if every_kind else []) + draw(
        st.lists(st.sampled_from(sorted(BAD_KINDS)), min_size=bad_range[0], max_size=bad_range[1]))
    bad = [(BAD_KINDS[kind][0](i, draw(storable_text.filter(lambda s: len(s) < 60))), BAD_KINDS[kind][1])
           for i, kind in enumerate(kinds)]
    lines = [json.dumps(r, ensure_ascii=draw(st.booleans())) for r in good] + [line for line, _ in bad]
    order = draw(st.permutations(range(len(lines))))
    return [lines[i] for i in order], good, [reason for _, reason in bad]


def _exact(value):
    """JSON as jsonb compares it: numbers by their decimal value (1e16 == 10000000000000000)."""
    from decimal import Decimal

    return json.loads(json.dumps(value), parse_float=Decimal, parse_int=Decimal)


def _expect_reasons(errors: list[str], reasons: list[str]) -> None:
    """Each bad line has its own rejection, and each rejection says its line's defect."""
    assert len(errors) == len(reasons), errors
    remaining = list(errors)
    for reason in sorted(reasons, key=lambda r: -len(str(r))):
        alternatives = reason if isinstance(reason, tuple) else (reason,)
        match = next((e for e in remaining if any(a in e for a in alternatives)), None)
        assert match is not None, (reason, errors)
        remaining.remove(match)
    for error in errors:
        assert "psycopg" not in error and "Traceback" not in error


@bounded(60)
@given(case=jsonl_file())
def test_the_jsonl_reader_turns_every_hostile_record_into_a_rejection_with_its_reason(world, case):
    from vector_platform.ingest.sources import Document, Rejection, read_source

    lines, good, reasons = case
    path = world.folder / "reader.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    read = list(read_source(str(path), 20 * 2**20))
    documents = {d.doc_id: d for d in read if isinstance(d, Document)}
    assert {k: (d.body, _exact(d.metadata)) for k, d in documents.items()} == {
        str(r["id"]): (r["text"], _exact(r["metadata"])) for r in good}
    _expect_reasons([r.error for r in read if isinstance(r, Rejection)], reasons)


def _varied(case) -> bool:
    """Not hypothesis' first, simplest file (every record alike): this property has one example."""
    _, good, _ = case
    return len({json.dumps(r["metadata"]) for r in good}) >= 10 and len({r["text"] for r in good}) >= 10


@bounded(1, shrink=False)  # an example is an ingest (three Dagster runs): one large, varied file, reported as found
@given(case=jsonl_file(good_range=(30, 45), bad_range=(0, 10), every_kind=True).filter(_varied))
def test_hostile_jsonl_records_are_dead_lettered_and_every_good_one_goes_through(world, pg_dsn, case):
    lines, good, reasons = case
    vp, name = world.vp, world.target
    (world.folder / "target.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    runs = vp.ingest(name, allow_deletes=True)
    assert all(r.success for r in runs), [r.error for r in runs]
    with psycopg.connect(pg_dsn) as conn:
        live = dict(conn.execute(
            "SELECT doc_id, metadata FROM vector_platform.documents WHERE collection = %s AND deleted_at IS NULL", (name,)))
        letters = [row[0] for row in conn.execute(
            "SELECT error FROM vector_platform.dead_letters WHERE collection = %s AND stage = 'source' AND resolved_at IS NULL",
            (name,))]
        table = catalog.vector_table_name(conn, name, "minilm_l6_v2")
        vectors = conn.execute(sql.SQL("SELECT count(DISTINCT doc_id) FROM {}").format(sql.Identifier("vp_vectors", table))).fetchone()[0]
    # every good document, its metadata exactly (as JSON numbers: jsonb keeps the decimal digits)
    assert {k: _exact(v) for k, v in live.items()} == {str(r["id"]): _exact(r["metadata"]) for r in good}
    assert vectors == len(good)
    _expect_reasons(letters, reasons)
    hits = vp.search(good[0]["text"], [name], k=3 * len(good), exact=True).hits
    assert {h.doc_id for h in hits} == {str(r["id"]) for r in good}
    world.sentinel.check()
