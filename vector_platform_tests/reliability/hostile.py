"""Shared by the hostile-input, HTTP-hardening and least-privilege tests: the payloads, the
hypothesis strategies and settings, and the sentinels that prove nothing outside the
attacked call changed (a canary table with a known row, the catalog, other collections).

Hypothesis runs derandomized (the same examples on every run, no example database), so a
failure in CI reproduces on a laptop; VP_HYPOTHESIS_RANDOM=1 explores new examples locally.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass

import psycopg
from hypothesis import HealthCheck, Phase, example, settings
from hypothesis import strategies as st
from psycopg import sql

_RANDOM = os.environ.get("VP_HYPOTHESIS_RANDOM", "").strip() in ("1", "true", "yes")


def every(argument: str, values, **fixed):
    """Explicit examples: each of `values` as `argument` (the other arguments `fixed`), run on
    every run before the generated ones, so no targeted payload is left to chance."""
    def decorate(test):
        for value in reversed(list(values)):
            test = example(**{argument: value}, **fixed)(test)
        return test

    return decorate


def bounded(max_examples: int, shrink: bool = True):
    """Settings for one property: `max_examples`, no deadline (a shared CI machine), the fixtures
    are module-scoped (reused across examples on purpose: their state is checked after each).
    `shrink=False` for properties whose every example costs seconds: the failing example is
    reported as generated rather than minimised by dozens of reruns."""
    return settings(
        max_examples=max_examples,
        phases=[Phase.explicit, Phase.reuse, Phase.generate, *([Phase.shrink] if shrink else [])],
        deadline=None,
        derandomize=not _RANDOM,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        print_blob=True,
    )


CANARY = "canary"
CANARY_ROW = (1, "the canary sings")

# What an attacker (or an unlucky export) sends: SQL injection in every quoting context,
# identifiers over PostgreSQL's 63 bytes, NUL, lone surrogates, odd Unicode, path tricks,
# operator keys of other query languages.
INJECTIONS = [
    "'; DROP TABLE canary; --",
    "\"; DROP TABLE canary; --",
    "\") ; DROP TABLE canary; --",
    "') ; DROP TABLE canary; --",
    "x' OR '1'='1",
    "x\" OR \"1\"=\"1",
    "1; DELETE FROM canary",
    "1); UPDATE canary SET v = 'pwned'; --",
    "$$; DROP TABLE canary; $$",
    "$tag$ DROP TABLE canary $tag$",
    "Robert'); DROP TABLE canary;--",
    "canary\"; DELETE FROM vector_platform.collections; --",
    "'; TRUNCATE vector_platform.collections CASCADE; --",
    "'; DROP SCHEMA vp_vectors CASCADE; --",
    "'; CREATE ROLE pwned SUPERUSER LOGIN; --",
    "'; COPY canary TO PROGRAM 'touch /tmp/vp_pwned'; --",
    "' UNION SELECT usename, passwd FROM pg_shadow --",
    "\\'; DROP TABLE canary; --",
    "E'\\x27; DROP TABLE canary; --",
    "%27%3B%20DROP%20TABLE%20canary%3B--",
    "canary; --",
    "vector_platform.collections",
    "vp_vectors.canary",
    "pg_catalog.pg_class",
    "select",
    "drop",
    "user",
    "public",
]
ODD = [
    "",
    " ",
    "a" * 49,
    "a" * 63,
    "a" * 64,
    "a" * 200,
    "é" * 32,  # 32 characters, 64 bytes
    "\x00",
    "a\x00b",
    "'\x00; DROP TABLE canary; --",
    "\ud800",
    "a\udfffb",
    "\ufeffname",
    "\u202ereversed",
    "e\u0301",
    "日本語のコレクション",
    "ДокументЫ",
    "🚀rocket",
    "Ｃａｎａｒｙ",
    "../../etc/passwd",
    "..",
    "/",
    "\\",
    "\r\n",
    "\t",
    "%00",
    "%",
    "_",
    "*",
    "$gt",
    "{}",
    "[]",
    "null",
    "NaN",
    "Infinity",
    "1e309",
    "9" * 400,
]
PAYLOADS = INJECTIONS + ODD
# Tried explicitly on every run, at every door (the rest of PAYLOADS by sampling).
CORE = [
    "'; DROP TABLE canary; --", "\") ; DROP TABLE canary; --", "') ; DROP TABLE canary; --", "$$; DROP TABLE canary; $$",
    "x' OR '1'='1", "'; TRUNCATE vector_platform.collections CASCADE; --", "a" * 64, "a" * 200, "é" * 32, "\x00", "a\x00b",
    "'\x00; DROP TABLE canary; --", "\ud800", "a\udfffb", "日本語のコレクション", "Ｃａｎａｒｙ", "\u202ereversed", "", "select",
    "9" * 400, "%00", "../../etc/passwd",
]


class Opaque:
    """A value hypothesis must not pretty-print (it recurses into 100,000 levels of nesting):
    shown by its label, unwrapped by the test."""

    def __init__(self, label: str, value):
        self.label, self.value = label, value

    def __repr__(self) -> str:
        return f"<{self.label}>"


def unwrap(value):
    return value.value if isinstance(value, Opaque) else value


payload_text = st.sampled_from(PAYLOADS)
# Any Python string, lone surrogates and NUL included, mixed with the payloads.
any_text = st.one_of(payload_text, st.text(max_size=80), st.builds(lambda a, b: a + b, payload_text, st.text(max_size=20)))
# Text PostgreSQL can store (no NUL, no lone surrogates), payloads included.
storable_text = any_text.filter(lambda s: "\x00" not in s and not any(0xD800 <= ord(c) <= 0xDFFF for c in s))

HUGE_NUMBERS = [10**400, -(10**400), 2**63, 2**64, -(2**63) - 1, 1e308, -1e308, 5e-324, 0.0, -0.0,
                float("inf"), float("-inf"), float("nan")]
numbers = st.one_of(st.sampled_from(HUGE_NUMBERS), st.integers(), st.floats(allow_nan=True, allow_infinity=True))


def nested(depth: int, leaf=1, kind: str = "object"):
    value = leaf
    for _ in range(depth):
        value = {"a": value} if kind == "object" else [value]
    return value


DEEP = [nested(65), nested(200), nested(2000), nested(5000, kind="array"), nested(100_000, kind="array")]
DEEP_OPAQUE = [Opaque(f"{n} levels", d) for n, d in zip((65, 200, 2000, 5000, 100_000), DEEP)]
# The same as JSON text (json.dumps itself gives up on the deepest).
DEEP_JSON = ['{"a": ' + "[" * n + "1" + "]" * n + "}" for n in (65, 200, 2000, 100_000)] + [
    '{"a": ' + '{"a": ' * 5000 + "1" + "}" * 5000 + "}"]

json_scalars = st.one_of(st.none(), st.booleans(), numbers, any_text)
# JSON-like values a filter or metadata may hold: hostile keys and scalars at any depth.
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(any_text, inner, max_size=4)),
    max_leaves=12,
)
# Filters aimed at the SQL and at jsonb: injections as keys and values, numbers jsonb or JSON
# cannot hold, depth, operator keys.
_SHALLOW_FILTERS = ([{p: 1} for p in CORE] + [{"tag": p} for p in CORE] + [{"n": x} for x in HUGE_NUMBERS]
                    + [{"$where": "1=1"}, {"a": {"$gt": 1}}, {"nested": {"k": [0, "x"]}}, {"tag": INJECTIONS[2]}])
TARGETED_FILTERS = _SHALLOW_FILTERS + [Opaque(f"filter {o.label} deep", {"a": o.value}) for o in DEEP_OPAQUE]
TARGETED_FILTER_TEXTS = DEEP_JSON + [json.dumps(f) for f in _SHALLOW_FILTERS] + [
    '{"a": NaN}', '{"a": 1e999}', '{"a": -Infinity}', '{"a": "\\u0000"}', '{"\\ud800": 1}', '{"a": 1', "[1]", '"text"',
    "9" * 5000, "{" * 5000]
json_objects = st.one_of(st.dictionaries(any_text, json_values, max_size=5), st.sampled_from(DEEP[:2]).map(lambda d: {"x": d}))
# Filters as a user types them: JSON text, hostile, deep, or not JSON at all.
json_texts = st.one_of(payload_text, st.sampled_from(DEEP_JSON), json_objects.map(lambda f: json.dumps(f, ensure_ascii=False)))


WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()


def corpus(n: int, tag: str) -> list[dict]:
    """Documents whose metadata holds injections (stored, and found, verbatim)."""
    return [{"id": f"{tag}{i}", "text": f"{tag}{i} " + " ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(6)),
             "metadata": {"n": i, "even": i % 2 == 0, "tag": INJECTIONS[i % len(INJECTIONS)], "nested": {"k": [i, "x"]}}}
            for i in range(n)]


@dataclass
class Shared:
    """Collections the three modules attack and never change: one active (60 documents), one
    cold (30, evicted to a snapshot). Built once per test session (each costs Dagster runs)."""

    vp: object
    active: str
    cold: str
    folder: object


_shared: dict[str, Shared] = {}


def shared_collections(pg_dsn: str, dagster_instance, tmp_path_factory) -> Shared:
    from ..conftest import build_platform, write_jsonl

    if pg_dsn not in _shared:
        folder = tmp_path_factory.mktemp("hostile_shared")
        vp = build_platform(pg_dsn, dagster_instance, (folder / "objects").as_uri())
        suffix = uuid.uuid4().hex[:6]
        active, cold = f"hostile_{suffix}_active", f"hostile_{suffix}_cold"
        for name, n in ((active, 60), (cold, 30)):
            vp.add_collection(name, write_jsonl(folder / f"{name}.jsonl", corpus(n, name[-4:])))
            assert all(r.success for r in vp.ingest(name))
        assert vp.tier(cold, "cold").success
        _shared[pg_dsn] = Shared(vp, active, cold, folder)
    return _shared[pg_dsn]


def is_storable_text(value: str) -> bool:
    return "\x00" not in value and not any(0xD800 <= ord(c) <= 0xDFFF for c in value)


# ---------------------------------------------------------------- sentinels

@dataclass
class Sentinel:
    """A canary table with a known row, and a picture of what nobody may change: the catalog
    rows of the collections not under test, their vectors, every relation in the platform's
    schemas (and public), the roles and the databases."""

    dsn: str
    spare: tuple[str, ...] = ()  # collections a test changes on purpose

    def plant(self) -> "Sentinel":
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (id int PRIMARY KEY, v text NOT NULL)").format(
                sql.Identifier("public", CANARY)))
            conn.execute(sql.SQL("INSERT INTO {} VALUES (%s, %s) ON CONFLICT (id) DO UPDATE SET v = excluded.v").format(
                sql.Identifier("public", CANARY)), CANARY_ROW)
        self.before = self.picture()
        return self

    def picture(self) -> dict:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            spare = list(self.spare)
            canary = conn.execute("SELECT to_regclass('public.canary') IS NOT NULL").fetchone()[0]
            rows = conn.execute("SELECT id, v FROM public.canary ORDER BY id").fetchall() if canary else None
            collections = conn.execute(
                "SELECT name, source, tier, serving_model, settings::text, tier_rules::text FROM vector_platform.collections "
                "WHERE name <> ALL(%s) ORDER BY name", (spare,)).fetchall()
            models = conn.execute("SELECT key, fingerprint FROM vector_platform.models ORDER BY key").fetchall()
            relations = conn.execute(
                "SELECT n.nspname, c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname IN ('public', 'vector_platform', 'vp_vectors', 'vp_serving') AND c.relkind IN ('r', 'p', 'v') "
                "AND NOT EXISTS (SELECT 1 FROM unnest(%s::text[]) s WHERE c.relname LIKE s || '%%') "
                "ORDER BY 1, 2", (spare,)).fetchall()
            tables = conn.execute(
                "SELECT m.collection, m.table_name FROM vector_platform.collection_models m "
                "WHERE m.collection <> ALL(%s) AND to_regclass(format('vp_vectors.%%I', m.table_name)) IS NOT NULL "
                "ORDER BY 1, 2", (spare,)).fetchall()
            vectors = {
                table: conn.execute(sql.SQL(
                    "SELECT count(*), md5(coalesce(string_agg(chunk_id::text || md5(embedding::text) || metadata::text, ',' "
                    "ORDER BY chunk_id), '')) FROM {}").format(sql.Identifier("vp_vectors", table))).fetchone()
                for _, table in tables
            }
            roles = conn.execute("SELECT rolname, rolsuper FROM pg_roles WHERE rolname NOT LIKE 'vp\\_reader%%' "
                                 "ORDER BY 1").fetchall()
            databases = conn.execute("SELECT datname FROM pg_database ORDER BY 1").fetchall()
        return {"canary_exists": canary, "canary_rows": rows, "collections": collections, "models": models,
                "relations": relations, "vectors": vectors, "roles": roles, "databases": databases}

    def check(self) -> None:
        now = self.picture()
        assert now["canary_exists"], "the canary table is gone"
        assert now["canary_rows"] == [CANARY_ROW], f"the canary row changed: {now['canary_rows']}"
        for key in ("collections", "models", "relations", "vectors", "roles"):
            assert now[key] == self.before[key], f"{key} changed"
        assert set(self.before["databases"]) <= set(now["databases"]), "a database was dropped"

    def remove(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier("public", CANARY)))
