"""Search across collections and tiers: embed the query once per model, ask each collection in
its tier, merge.

Usable on its own (a pool, a query embedder and the object store; no Dagster `Definitions`):
the CLI, the Python API and the HTTP API all call `search`.

- active collections: HNSW (or exact with `exact=True`) in PostgreSQL, `active.py`;
- cold collections: exact brute force over their verified snapshot, `cold.py`;
- archived collections: skipped with a warning (an error when every target is archived);
- with `include_archive`, each collection's row archive (issue 9: aged rows moved to Parquet),
  exact brute force over the archived vectors, `archive/reads.py`.

Every hit carries `source_tier` (active | cold | archive), `exact`, and for cold hits `snapshot_id`. Scores are
computed as pgvector computes them in both tiers, so hits of one model merge by score; lists
of different models merge by reciprocal rank fusion (`merge.py`). Stats say hits, latency
and (cold) rows scanned per tier and where the cold data came from.

The hot path is one round trip per active collection: catalog facts come from a cache the
catalog invalidates itself (`facts.py`), planner settings are sent only when they change,
and the query log is written in batches off the request path (`log.py`).
"""

from __future__ import annotations

import datetime as dt
import math
import re
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import psycopg
from psycopg_pool import ConnectionPool

from vector_platform import clock, db, tables
from vector_platform.models import ModelSpec
from vector_platform.names import validate_name
from vector_platform.object_store import ObjectStore
from vector_platform.search import active, cold, cold_ivf, merge
from vector_platform.search import filters as filter_language
from vector_platform.search.active import MAX_K
from vector_platform.search.facts import Facts, FactsCache, read_facts
from vector_platform.search.log import QueryLog
from vector_platform.telemetry.metrics import observe_query

QueryEmbedder = Callable[[ModelSpec, str], np.ndarray]
_FINGERPRINT = re.compile(r"[0-9a-f]{16}")


class AllArchived(ValueError):
    """Every collection a search named is archived: nothing can answer it."""


class _ServingChanged(Exception):
    """The serving view holds another model's vectors than the cached facts said (a swap)."""


@dataclass
class Hit:
    collection: str
    chunk_id: str
    doc_id: str
    score: float
    text: str
    metadata: dict[str, Any]
    source_tier: str
    exact: bool
    snapshot_id: int | None = None
    model: str = ""  # the model key whose vectors answered
    fingerprint: str = ""  # the fingerprint of those vectors

    def as_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        if out["snapshot_id"] is None:
            del out["snapshot_id"]
        return out


@dataclass
class SearchResult:
    query: str | None
    hits: list[Hit]
    stats: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"query": self.query, "hits": [h.as_json() for h in self.hits], "stats": self.stats, "warnings": self.warnings}


class Runtime:
    """Per process and database (the owner's DSN): the facts cache, the search pools, the query log.

    Search reads through `pool(read_dsn)`: the read-only role's DSN when one is given, else
    the owner's. What a search writes (the query log, last_queried_at, rehydrate requests)
    always goes through the owner's DSN, in the background: a reader role needs no write
    grant, and a read replica (which takes none) can serve the reads. The catalog's change
    notices are heard on the owner's DSN too (a standby cannot LISTEN)."""

    def __init__(self, dsn: str):
        self.dsn = dsn
        self.facts = FactsCache(dsn)
        self.log = QueryLog(lambda: db.get_pool(dsn))
        # planner settings each search connection holds (see active._apply_settings)
        self.sessions: weakref.WeakKeyDictionary[psycopg.Connection, dict[str, str]] = weakref.WeakKeyDictionary()

    def pool(self, read_dsn: str | None = None) -> ConnectionPool:
        """Looked up on each use: pools closed (e.g. by `db.close_pools`) are replaced. A read
        server's loans wait briefly: one that went away is skipped (replicas.py), not waited for."""
        if read_dsn and read_dsn != self.dsn:
            return db.get_search_pool(read_dsn, wait_s=READ_SERVER_WAIT_S)
        return db.get_search_pool(self.dsn)


# How long a search waits for a connection to a read server (VP_PG_READ_DSN) before it skips it.
READ_SERVER_WAIT_S = 3.0

_runtimes: dict[str, Runtime] = {}
_runtimes_lock = threading.Lock()
cold_cache = cold.ColdCache()
ivf_cache = cold_ivf.IvfCache()


def runtime(pool: ConnectionPool) -> Runtime:
    dsn = pool.conninfo
    with _runtimes_lock:
        if dsn not in _runtimes:
            _runtimes[dsn] = Runtime(dsn)
        return _runtimes[dsn]


def flush_query_log(pool: ConnectionPool) -> None:
    """Write the pending query log now (tests, and before reading last_queried_at)."""
    runtime(pool).log.flush()


@dataclass
class _Tally:
    hits: int = 0
    latency_ms: float = 0.0
    collections: int = 0
    rows_scanned: int = 0
    data_from: dict[str, str] = field(default_factory=dict)

    def as_json(self, tier: str) -> dict[str, Any]:
        out: dict[str, Any] = {"hits": self.hits, "latency_ms": round(self.latency_ms, 3), "collections": self.collections}
        if tier in ("cold", "archive"):
            out.update(rows_scanned=self.rows_scanned, data_from=self.data_from)
        return out


def search(
    pool: ConnectionPool,
    embed_query: QueryEmbedder,
    collections: Sequence[str],
    query: str | None = None,
    vector: Sequence[float] | None = None,
    k: int = 10,
    exact: bool = False,
    filters: dict[str, Any] | None = None,
    log_query: bool = True,
    store: ObjectStore | None = None,
    include_archive: bool = False,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    read_dsn: str | None = None,
    fingerprint: str | None = None,
) -> SearchResult:
    """Search collections in their tiers and merge the hits by score (or by reciprocal rank
    fusion across models). `include_archive` adds each collection's row archive, searched
    exactly; `since` / `until` keep rows whose source timestamp is in [since, until) in every
    tier (and read only the archive months they overlap). `pool` is the owner's (the query
    log is written through it); `read_dsn`, when given, is where the search reads (a
    read-only role, VP_PG_READ_DSN).

    `fingerprint`: the model fingerprint the caller's `vector` was made with. A collection
    whose serving vectors carry another fingerprint is refused with a warning, even when the
    dimensions match, and a swap during the search answers nothing from the new model rather
    than ranking the vector against it. A text query needs none: it is embedded by each
    collection's own serving model."""
    if (query is None) == (vector is None):
        raise ValueError("give either a query text or a vector")
    if fingerprint is not None and (not isinstance(fingerprint, str) or not _FINGERPRINT.fullmatch(fingerprint)):
        raise ValueError("fingerprint must be a model fingerprint: 16 hexadecimal digits (see `vector-platform models list`)")
    if query is not None:
        if not isinstance(query, str):
            raise ValueError(f"the query must be text, got {type(query).__name__}")
        try:
            query.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("the query holds an unpaired UTF-16 surrogate (not valid Unicode text)") from None
    if not collections or isinstance(collections, str):
        raise ValueError("name at least one collection (a list of names)")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ValueError(f"k must be between 1 and {MAX_K} (pgvector's largest hnsw.ef_search), got {k}")
    filters = filter_language.validate(filters) or None
    window = _window(since, until)
    rt = runtime(pool)
    reads = rt.pool(read_dsn)
    result = SearchResult(query=query, hits=[])
    tally: dict[str, _Tally] = {}
    vectors: dict[str, np.ndarray] = {}
    lists: list[list[Hit]] = []
    fingerprints: dict[str, str] = {}
    logged: list[tuple] = []
    queried: list[str] = []
    rehydrate: list[str] = []
    archived: list[str] = []
    exact_fallbacks: list[str] = []

    def vector_for(spec: ModelSpec) -> np.ndarray:
        if spec.key not in vectors:
            vectors[spec.key] = _query_vector(spec, query, vector, embed_query)
        return vectors[spec.key]

    names = list(dict.fromkeys(validate_name(name) for name in collections))  # refused before any SQL
    targets = [(name, rt.facts.cached(name)) for name in names]
    if any(facts is None for _, facts in targets):  # a pool checkout only when the cache lacks some
        targets = _on_a_connection(reads, lambda conn: [(name, rt.facts.get(conn, name)) for name in names])
    known = [f for _, f in targets if f is not None]
    if known and all(f.tier == "archived" for f in known):
        raise AllArchived(
            "every collection searched is archived (" + ", ".join(f.name for f in known) + "): archived collections "
            "keep only their catalog rows and cannot be searched"
        )
    # The query is embedded, and cold snapshots are read, without holding a search connection:
    # a slow model or a first cold load must not starve active searches of connections.
    for _, facts in targets:
        if facts is not None and facts.tier != "archived" and facts.spec is not None and _refusal(facts, fingerprint) is None:
            vector_for(facts.spec)
    outcomes: dict[str, tuple[str, Any]] = {}
    settled: dict[str, Facts] = {}

    def active_pass(conn) -> None:
        session = rt.sessions.setdefault(conn, {})
        for name, facts in targets:
            if facts is None or facts.tier == "cold":
                continue
            for attempt in (1, 2):
                try:
                    outcomes[name] = _search_one(conn, session, facts, vector_for, k, exact, filters, store, tally, window,
                                                 fingerprint)
                    break
                except (psycopg.errors.UndefinedTable, psycopg.errors.InternalError, psycopg.errors.ObjectInUse,
                        _ServingChanged) as err:
                    # The tier or the serving model changed under a cached fact (a table dropped by
                    # an evict, a view swapped to a new model): read the facts afresh and ask again.
                    if attempt == 2:
                        if isinstance(err, _ServingChanged):
                            outcomes[name] = ("warning", f"collection {name!r} skipped: its serving model changed twice while searched")
                            break
                        raise
                    rt.facts.invalidate(name)
                    facts = read_facts(conn, name)
                    if facts is None:
                        outcomes[name] = ("warning", f"collection {name!r} was removed while searched")
                        break
                    if facts.tier == "cold":  # searched below, outside the connection
                        break
            settled[name] = facts

    def fresh_pass(conn) -> None:
        outcomes.clear()  # a pass cut short by a lost connection starts over
        settled.clear()
        tally.pop("active", None)
        active_pass(conn)

    _on_a_connection(reads, fresh_pass)
    for name, facts in targets:
        facts = settled.get(name, facts)
        if facts is not None and facts.tier == "cold" and name not in outcomes:
            if facts.spec is not None:
                vector_for(facts.spec)
            outcomes[name] = _search_one(None, None, facts, vector_for, k, exact, filters, store, tally, window,
                                         fingerprint)
            settled[name] = facts
    archive_outcomes: dict[str, tuple[str, Any]] = {}
    if include_archive:  # outside the connection, as cold search: files may have to be fetched
        for name, facts in targets:
            facts = settled.get(name, facts)
            if (facts is not None and facts.tier in ("active", "cold") and facts.spec is not None
                    and outcomes.get(name, ("",))[0] == "hits"):
                archive_outcomes[name] = _search_archive(reads, facts, vector_for, k, filters, store, tally, window)
    for name, facts in targets:
        if facts is None:
            result.warnings.append(f"unknown collection {name!r} skipped")
            continue
        facts = settled.get(name, facts)
        kind, payload = outcomes[name]
        if kind == "warning":
            result.warnings.append(payload)
            continue
        if kind == "archived":
            archived.append(name)
            continue
        hits, spec, fingerprint, mode, elapsed, fallback = payload
        if name in archive_outcomes:
            archive_kind, archive_payload = archive_outcomes[name]
            if archive_kind == "warning":
                result.warnings.append(archive_payload)
            else:
                archive_hits, notes = archive_payload
                result.warnings.extend(notes)
                # One list per collection, by score (the same model and fingerprint): a chunk
                # whose batch was deleted between the two reads is answered once, live.
                live = {h.chunk_id for h in hits}
                hits = merge.by_score([hits, [h for h in archive_hits if h.chunk_id not in live]], lambda h: h.score, k)
        lists.append(hits)
        fingerprints[name] = fingerprint
        queried.append(name)
        if fallback:
            exact_fallbacks.append(name)
        if facts.tier == "cold" and facts.rules.rehydrate_on_query:
            rehydrate.append(name)
        logged.append((name, spec.key, mode, k, elapsed, len(hits), query, vector_for(spec)))
    if archived:
        result.warnings.append("archived collections skipped (vectors deleted; catalog rows only): " + ", ".join(archived))
    if rehydrate:
        result.warnings.append(
            "answered from the cold tier; a rehydrate was requested for " + ", ".join(rehydrate)
            + " (the tiering sensor starts it)"
        )
    if log_query and (logged or queried):
        rt.log.record(clock.now(), logged, queried, rehydrate)
    distinct = set(fingerprints.values())
    if len(distinct) <= 1:
        result.hits = merge.by_score(lists, lambda h: h.score, k)
        merged_by = "score"
    else:
        result.hits = [hit for _, hit in merge.reciprocal_rank_fusion(lists, k)]
        merged_by = "reciprocal_rank_fusion"
        result.warnings.append(
            "collections use different models or distances (fingerprints "
            + ", ".join(f"{c}={f}" for c, f in fingerprints.items())
            + "): results merged by reciprocal rank fusion, not by score"
        )
    if len(result.hits) < k and lists:
        result.warnings.append(
            f"{len(result.hits)} hits for k={k}: the searched collections hold no more"
            + (" that match the filters" if filters else "")
        )
    result.stats = {
        "mode": "exact" if exact else "ann",
        "k": k,
        "merge": merged_by,
        "exact_fallback": exact_fallbacks,
        "candidates": sum(len(hits) for hits in lists),
        "tiers": {tier: t.as_json(tier) for tier, t in tally.items()},
    }
    if rehydrate:
        result.stats["rehydrate_requested"] = rehydrate
    return result


def _on_a_connection(pool: ConnectionPool, work: Callable[[psycopg.Connection], Any]) -> Any:
    """`work(conn)` on a connection of `pool`; once more on a fresh one when the first was cut
    while it sat in the pool (a server restart or failover: the pool lends a search connection
    unchecked when it was lent less than db.SEARCH_CHECK_IDLE_S ago, and drops a broken one)."""
    conn = None
    try:
        with pool.connection() as conn:
            return work(conn)
    except psycopg.OperationalError:
        if conn is None or not conn.broken:
            raise
    with pool.connection() as conn:
        return work(conn)


def _window(since, until) -> tuple[dt.datetime | None, dt.datetime | None]:
    for name, value in (("since", since), ("until", until)):
        if value is not None and not isinstance(value, dt.datetime):
            raise ValueError(f"{name} must be a datetime, got {type(value).__name__}")
    since, until = (None if v is None else (v if v.tzinfo else v.replace(tzinfo=dt.timezone.utc)) for v in (since, until))
    if since is not None and until is not None and since >= until:
        raise ValueError(f"since ({since.isoformat()}) must be before until ({until.isoformat()})")
    return since, until


def _refusal(facts: Facts, expected: str | None) -> str | None:
    """Why a collection cannot answer a vector made with fingerprint `expected` (None: it can)."""
    if expected is None or facts.spec is None:
        return None
    served = facts.snapshot.manifest.get("fingerprint") if facts.tier == "cold" and facts.snapshot else facts.spec.fingerprint
    if served == expected:
        return None
    return (
        f"collection {facts.name!r} refused: it serves model {facts.spec.key!r} (fingerprint {served}), "
        f"not the query vector's fingerprint {expected}; vectors of different fingerprints are never compared"
    )


def _search_one(conn, session, facts: Facts, vector_for, k, exact, filters, store, tally, window=(None, None),
                expected: str | None = None) -> tuple[str, Any]:
    """One collection in its tier: ("hits", (...)) | ("warning", text) | ("archived", None).
    `expected`: the fingerprint the query vector was made with, when the caller said."""
    name = facts.name
    if facts.tier == "archived":
        return "archived", None
    if facts.spec is None:
        return "warning", f"collection {name!r} has no serving model"
    refused = _refusal(facts, expected)
    if refused:
        return "warning", refused
    if facts.tier == "cold":
        return _search_cold(facts, vector_for, k, filters, store, tally, window, exact)
    if not facts.has_view:
        return "warning", f"collection {name!r} has no serving view yet; ingest it first"
    spec = facts.spec
    if facts.fingerprint != spec.fingerprint:
        return "warning", (
            f"collection {name!r} refused: its table holds vectors of fingerprint {facts.fingerprint}, "
            f"not of model {spec.key!r} ({spec.fingerprint}); vectors of different fingerprints are never compared"
        )
    qvec = vector_for(spec)
    relation = tables.view_id(name)
    began = time.perf_counter()
    pin = facts.fingerprint
    since, until = window
    rows = active.nearest(
        conn, relation, spec, qvec, k, exact, facts.settings.hnsw_ef_search, filters, session=session, fingerprint=pin,
        since=since, until=until, rerank_factor=facts.settings.rerank_factor,
    )
    mode, fallback = ("exact" if exact else "ann"), False
    if len(rows) < k:
        serving = active.view_fingerprint(conn, relation)
        if serving is not None and serving != pin:
            raise _ServingChanged(name)
    if len(rows) < k and not exact and active.count_matching(conn, relation, filters, k, since, until) > len(rows):
        # The index scan stopped short of k rows that exist (a very selective filter):
        # exact search finds them all.
        rows = active.nearest(conn, relation, spec, qvec, k, True, filters=filters, session=session, fingerprint=pin,
                              since=since, until=until)
        mode, fallback = "exact_fallback", True
        if len(rows) < k and active.view_fingerprint(conn, relation) not in (None, pin):
            raise _ServingChanged(name)
    elapsed = (time.perf_counter() - began) * 1000
    observe_query("active", elapsed / 1000)
    t = tally.setdefault("active", _Tally())
    t.hits += len(rows)
    t.latency_ms += elapsed
    t.collections += 1
    is_exact = mode != "ann"
    hits = [
        Hit(name, chunk_id, doc_id, tables.score_from_distance(spec, distance), text, metadata, "active",
            is_exact, None, spec.key, pin)
        for chunk_id, doc_id, text, metadata, distance in rows
    ]
    return "hits", (hits, spec, facts.fingerprint, mode, elapsed, fallback)


def _search_cold(facts: Facts, vector_for, k, filters, store, tally, window=(None, None), exact: bool = False) -> tuple[str, Any]:
    """A cold collection over its snapshot: every row scored exactly, or, over an IVF snapshot
    (tiers/ivf.py) unless `exact`, only the rows of the `cold_nprobe` lists nearest the query
    (those hits say `exact: false`)."""
    name, receipt = facts.name, facts.snapshot
    if receipt is None:
        return "warning", f"cold collection {name!r} has no snapshot recorded; skipped"
    if store is None:
        return "warning", f"cold collection {name!r} skipped: no object store to read its snapshot from"
    spec = facts.spec
    if receipt.manifest.get("model_key") != spec.key or receipt.manifest.get("fingerprint") != spec.fingerprint:
        return "warning", (
            f"cold collection {name!r} skipped: its snapshot holds {receipt.manifest.get('model_key')!r} vectors "
            f"(fingerprint {receipt.manifest.get('fingerprint')}), not the serving model {spec.key!r} ({spec.fingerprint})"
        )
    qvec = vector_for(spec)
    pruned = receipt.manifest.get("layout") == "ivf" and not exact
    began = time.perf_counter()
    try:
        if pruned:
            answer = cold_ivf.search(ivf_cache, store, receipt, spec, qvec, k, filters, window, facts.settings.cold_nprobe)
            pairs, scanned, source = answer.found, answer.rows_scanned, answer.data_from
            pruned = not answer.every_list  # every list read (nprobe >= lists, or a filter read on): exact
        else:
            data, source = cold_cache.get(store, receipt)
            found = cold.nearest(data, spec, qvec, k, filters, mask=cold.time_mask(data.rows, *window))
            pairs = list(zip([d for _, d in found], cold.rows_of(data, [i for i, _ in found])))
            scanned = data.count
    except Exception as err:  # noqa: BLE001 - a cold read that fails leaves the rest of the answer
        return "warning", f"cold collection {name!r} skipped: its snapshot {receipt.id} could not be read ({err})"
    elapsed = (time.perf_counter() - began) * 1000
    observe_query("cold", elapsed / 1000)
    t = tally.setdefault("cold", _Tally())
    t.hits += len(pairs)
    t.latency_ms += elapsed
    t.collections += 1
    t.rows_scanned += scanned
    t.data_from[name] = source
    hits = [
        Hit(name, row["chunk_id"], row["doc_id"], tables.score_from_distance(spec, distance), row["text"], row["metadata"],
            "cold", not pruned, receipt.id, spec.key, receipt.manifest["fingerprint"])
        for distance, row in pairs
    ]
    return "hits", (hits, spec, receipt.manifest.get("fingerprint"), "cold_pruned" if pruned else "cold_exact", elapsed, False)


def _search_archive(pool, facts: Facts, vector_for, k, filters, store, tally, window) -> tuple[str, Any]:
    """The collection's row archive, searched exactly under its serving model: ("hits", (hits,
    notes)) | ("warning", text)."""
    from vector_platform.archive.reads import archive_search  # archive.reads builds on search.cold

    name, spec = facts.name, facts.spec
    if store is None:
        return "warning", f"the row archive of {name!r} was not searched: no object store to read it from"
    began = time.perf_counter()
    try:
        answer = archive_search.search(pool, store, name, spec, spec.fingerprint, vector_for(spec), k, filters, *window)
    except Exception as err:  # noqa: BLE001 - an archive that cannot be read leaves the rest of the answer
        return "warning", f"the row archive of {name!r} was not searched: {err}"
    elapsed = (time.perf_counter() - began) * 1000
    observe_query("archive", elapsed / 1000)
    t = tally.setdefault("archive", _Tally())
    t.hits += len(answer.hits)
    t.latency_ms += elapsed
    t.collections += 1
    t.rows_scanned += answer.rows_scanned
    t.data_from[name] = ", ".join(f"{where}: {n} files" for where, n in sorted((answer.data_from or {}).items())) or "none"
    notes = [
        f"{name}: {rows} archived rows hold vectors of model {model!r}, not the serving {spec.key!r}: not searched"
        for model, rows in sorted((answer.other_models or {}).items())
    ]
    hits = [
        Hit(name, row["chunk_id"], row["doc_id"], tables.score_from_distance(spec, distance), row["text"], row["metadata"],
            "archive", True, None, spec.key, spec.fingerprint)
        for row, distance in answer.hits
    ]
    return "hits", (hits, notes)


def _query_vector(spec: ModelSpec, query, vector, embed_query: QueryEmbedder) -> np.ndarray:
    if vector is not None:
        try:
            vec = np.asarray(vector, dtype=np.float32)
        except (TypeError, ValueError, OverflowError):  # not numbers, ragged, or beyond any float
            vec = None
        if vec is None or vec.shape != (spec.dims,):
            raise ValueError(f"query vector must be {spec.dims} finite numbers for model {spec.key!r}")
    else:
        if not query or not query.strip():
            raise ValueError("empty query")
        vec = np.asarray(embed_query(spec, query), dtype=np.float32).reshape(-1)
    # The common case in one dot product: a squared length that is finite (NaN and infinity
    # propagate into it) and well clear of 32-bit underflow.
    squared = float(np.dot(vec, vec))
    if 1e-30 < squared < math.inf:
        return vec / np.float32(math.sqrt(squared)) if spec.normalise else vec
    if not np.isfinite(vec).all():
        raise ValueError(
            f"query vector must be {spec.dims} finite numbers for model {spec.key!r}" if vector is not None
            else f"model {spec.key!r} embedded the query as numbers that are not finite"
        )
    if spec.normalise:
        # the squares over- or underflow 32-bit floats (components near 1e19 or 1e-23):
        # the length in 64 bits, so a finite vector is a direction, not NaN scores
        wide = vec.astype(np.float64)
        norm = np.linalg.norm(wide)
        if norm == 0:
            raise ValueError("query vector has zero length")
        return (wide / norm).astype(np.float32)
    if squared < math.inf:
        return vec
    raise ValueError("query vector too large: its length overflows 32-bit floats")
