"""The steps behind the ingest assets, as plain functions over a pool, an object store and an embedder.

Dagster assets in `defs/ingest/` are thin wrappers around these (and hold the writer lock
while they run); each returns a dict of figures that becomes the materialization's metadata.
Every step is idempotent, walks its collection in keyset pages (memory stays flat), commits
each page in a transaction of its own (a kill loses at most the page in flight), and converges
on a re-run.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from psycopg_pool import ConnectionPool

from vector_platform import catalog, clock, faults, tables
from vector_platform.catalog import documents as docs_sql
from vector_platform.catalog import tiers as tier_sql
from vector_platform.catalog.dead_letters import clean_ref
from vector_platform.ingest import embedding_cache
from vector_platform.ingest.chunking import Chunker
from vector_platform.ingest.embedders import Embedder, FatalEmbedderError
from vector_platform.ingest.sources import Document, Rejection, SourceMissing, read_source
from vector_platform.ingest.validation import gate
from vector_platform.object_store import ObjectStore
from vector_platform.telemetry import figures

Progress = Callable[[str, int, int], None]
log = logging.getLogger(__name__)

# Rows per transaction. Environment variables override them (smaller batches commit more
# often; larger ones load faster): VP_CHUNK_BATCH_DOCUMENTS, VP_LOAD_BATCH_ROWS.
STAGE_BATCH = 2_000
CHUNK_BATCH_DOCUMENTS = 200
EMBED_PAGE_ROWS = 4_096
LOAD_BATCH_ROWS = 20_000


def _tuned(name: str, default: int) -> int:
    value = int(os.environ.get(name, default))
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return value


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


class SourceRefused(ValueError):
    """The source reads as missing, empty, or deleting too much: nothing was changed."""


# ---------------------------------------------------------------- source_documents

def register_documents(pool: ConnectionPool, collection: str, allow_deletes: bool = False) -> dict[str, Any]:
    """Read the source into a staging table, check that applying it is not destructive, then
    add/update documents by content hash and soft-delete the ones that vanished, in one
    transaction: the collection moves to the new snapshot of its source, or not at all.

    Refused (nothing changes) unless `allow_deletes`: a missing source, a source with no
    readable document, or one that would soft-delete more than `max_delete_fraction` of the
    live documents. Unreadable records become dead letters (keyed by document id when one
    can be read); a document whose new record is unreadable keeps its last good version.
    """
    with pool.connection() as conn:
        coll = catalog.get_collection(conn, collection)
        settings = coll.settings
        with conn.transaction():
            docs_sql.create_source_stage(conn)
            rejections = _Rejections(conn, collection)
            batch: list[Document] = []

            def flush() -> None:
                for doc, reason in docs_sql.stage_documents(conn, batch):
                    rejections.add(doc.doc_id, reason, None, keeps_document=True)
                batch.clear()

            try:
                for item in read_source(coll.source, settings.max_document_bytes):
                    if isinstance(item, Rejection):
                        rejections.add(item.ref, item.error, item.payload, keeps_document=not item.ref.startswith("line "))
                        continue
                    batch.append(item)
                    if len(batch) >= STAGE_BATCH:
                        flush()
                flush()
            except SourceMissing as err:
                raise SourceRefused(f"{err}; nothing was changed (the source may be unmounted or not synced yet)") from None
            rejections.flush()
            for doc_id, position, kept in docs_sql.drop_staged_duplicates(conn):
                rejections.add(f"{doc_id}@{position}", f"duplicate id {doc_id!r} at position {position}: the one at {kept} is kept", None)
            rejections.flush()
            archived = docs_sql.drop_staged_archived(conn, collection, clock.now())
            plan = docs_sql.plan_source(conn, collection)
            plan["read"] += archived  # read fine, and left in the archive
            # Refusing raises inside the transaction: the dead letters written so far roll back too.
            _refuse_destructive(coll.source, plan, rejections.count, settings.max_delete_fraction, allow_deletes)
            docs_sql.apply_source(conn, collection, clock.now())
            revived = docs_sql.forget_revived_archived(conn, collection)
            resolved = docs_sql.resolve_source_letters_not_failing(conn, collection, "read fine (or gone from the source) on a later run")
        live = docs_sql.live_document_count(conn, collection)
    return {
        "read": plan["read"],
        "left_archived": archived,
        "revived_from_archive": revived,
        "added": plan["added"],
        "changed": plan["changed"],
        "unchanged": plan["unchanged"],
        "restored": plan["restored"],
        "deleted": plan["deleted"],
        "rejected": rejections.count,
        "dead_letters_resolved": resolved,
        "live_documents": live,
    }


class _Rejections:
    """Dead letters of one source read, written in batches inside its transaction (memory stays
    flat however bad the source), with the refs that failed and the ids whose old version stays."""

    BATCH = 1_000

    def __init__(self, conn, collection: str):
        self.conn, self.collection = conn, collection
        self.count = 0
        self.pending: list[tuple[str, str, str | None]] = []
        self.kept: list[str] = []

    def add(self, ref: str, error: str, payload: str | None, keeps_document: bool = False) -> None:
        self.count += 1
        self.pending.append((ref, error, payload))
        if keeps_document:
            self.kept.append(ref)
        if len(self.pending) >= self.BATCH:
            self.flush()

    def flush(self) -> None:
        catalog.dead_letter_many(self.conn, self.collection, "source", self.pending)
        docs_sql.stage_failing_refs(self.conn, [clean_ref(ref) for ref, _, _ in self.pending])
        docs_sql.stage_rejected_ids(self.conn, self.kept)
        self.pending, self.kept = [], []


def _refuse_destructive(source: str, plan: dict[str, int], rejected: int, max_fraction: float, allow: bool) -> None:
    if allow:
        return
    hint = "nothing was changed; if this is what you want, run again with --allow-deletes"
    live, gone = plan["live_before"], plan["deleted"]
    if plan["read"] == 0:
        raise SourceRefused(
            f"source {source!r} reads as empty ({rejected} records rejected, 0 readable documents) "
            f"while the collection has {live} live documents; {hint}"
        )
    if live and gone / live > max_fraction:
        raise SourceRefused(
            f"source {source!r} would soft-delete {gone} of {live} live documents ({gone / live:.0%}), "
            f"more than max_delete_fraction {max_fraction:.0%} ({plan['read']} documents read, {rejected} rejected); {hint}"
        )


# ---------------------------------------------------------------- chunks

def chunk_documents(
    pool: ConnectionPool, collection: str, chunker: Chunker, progress: Progress = _no_progress
) -> dict[str, Any]:
    """Re-chunk documents whose content (or chunking settings) changed; drop chunks of deleted ones.

    One transaction per batch of documents: a kill leaves each batch all old or all new.
    A document that cannot be chunked becomes a `chunk` dead letter and keeps its old chunks.
    """
    with pool.connection() as conn:
        with conn.transaction():
            dropped, gone_docs = docs_sql.drop_chunks_of_deleted_documents(conn, collection)
            catalog.resolve_dead_letters(conn, collection, "chunk", gone_docs, "document deleted")
        total = docs_sql.count_documents_to_chunk(conn, collection)
        made = chunked = failed = 0
        after: str | None = None
        while True:
            page = docs_sql.documents_to_chunk(conn, collection, after, _tuned("VP_CHUNK_BATCH_DOCUMENTS", CHUNK_BATCH_DOCUMENTS))
            if not page:
                break
            after = page[-1][0]
            done, letters = [], []
            texts = [(doc_id, Document(doc_id=doc_id, body=body, title=title).text_for_chunking()) for doc_id, title, body, _ in page]
            for (doc_id, _, _, doc_hash), chunks in zip(page, chunker.split_many(collection, texts)):
                if isinstance(chunks, Exception):  # one document's failure is its dead letter
                    letters.append((doc_id, f"chunking failed: {type(chunks).__name__}: {chunks}", None))
                    continue
                if not chunks:
                    letters.append((doc_id, "no text left to embed after chunking", None))
                done.append((doc_id, doc_hash, chunks))
            began = time.perf_counter()
            with conn.transaction():
                written = docs_sql.replace_chunks(conn, collection, done)
                catalog.dead_letter_many(conn, collection, "chunk", letters)
                failing = {ref for ref, _, _ in letters}
                catalog.resolve_dead_letters(
                    conn, collection, "chunk", [d for d, _, c in done if c and d not in failing], "chunked on a later run"
                )
            _count_batch(pool, collection, "", "chunks", written, time.perf_counter() - began)
            made += written
            chunked += len(done)
            failed += len(letters)
            progress("chunks", chunked + failed, total)
        with conn.transaction():
            superseded = docs_sql.resolve_superseded_embed_letters(conn, collection)
        chunks_total, tokens_max = docs_sql.chunk_totals(conn, collection)
    figures.recorder(pool).flush()
    return {
        "documents_chunked": chunked,
        "chunks_written": made,
        "chunk_dead_letters": failed,
        "chunks_dropped_for_deleted_documents": dropped,
        "dead_letters_superseded": superseded,
        "chunks_total": chunks_total,
        "max_chunk_tokens": tokens_max,
        "chunk_capacity_tokens": chunker.capacity,
    }


# ---------------------------------------------------------------- embeddings

@dataclass
class EmbedStats:
    chunks: int = 0
    already_in_table: int = 0
    from_cache: int = 0
    embedded: int = 0
    embed_calls: int = 0
    dead_lettered: int = 0
    cache_files_written: int = 0
    cache_files_compacted: int = 0
    seconds_embedding: float = 0.0
    api: dict[str, Any] | None = None  # requests, retries, 429s, seconds throttled... (API embedders)

    def as_metadata(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        api = data.pop("api") or {}
        data.update({f"api_{k}": v for k, v in api.items()})
        data["chunks_per_second"] = round(self.embedded / self.seconds_embedding, 1) if self.seconds_embedding else 0.0
        return data


def embed_chunks(
    pool: ConnectionPool,
    store: ObjectStore,
    embedder: Embedder,
    collection: str,
    model_key: str,
    batch_size: int = 64,
    progress: Progress = _no_progress,
) -> EmbedStats:
    """Make sure every live chunk missing from the vector table has a valid vector in the cache.

    Pages of chunks in document order; per page the cache index says what is cached, the
    rest goes to the model in batches, each gated and written to the cache (one file) before
    the next starts; rejects become dead letters. A killed run resumes from the cache.
    """
    spec = embedder.spec
    fingerprint = spec.cache_fingerprint  # a storage change re-uses the vectors (see ModelSpec)
    stats = EmbedStats()
    counters_before = embedder.counters()
    embedding_cache.adopt_legacy_files(pool, store, model_key, fingerprint)
    with pool.connection() as conn:
        table = tables.existing_table_id(conn, catalog.vector_table_name(conn, collection, model_key))
        live = docs_sql.count_chunks_missing(conn, collection, None)
        missing = docs_sql.count_chunks_missing(conn, collection, table) if table is not None else live
    stats.chunks, stats.already_in_table = live, live - missing
    done = 0
    for page in docs_sql.pages_of_missing_chunks(pool, collection, table, EMBED_PAGE_ROWS):
        needed: dict[str, tuple[str, list[str]]] = {}  # content hash -> (text, chunk ids)
        for chunk_id, _, _, content_hash, text, _, _ in page:
            needed.setdefault(content_hash, (text, []))[1].append(str(chunk_id))
        hit = embedding_cache.cached(pool, store, fingerprint, needed)
        stats.from_cache += sum(len(needed[h][1]) for h in hit)
        if hit:
            with pool.connection() as conn, conn.transaction():
                refs = [cid for h in hit for cid in needed[h][1]]
                catalog.resolve_dead_letters(conn, collection, "embed", refs, "found in cache", model_key)
        todo = [(h, text, ids) for h, (text, ids) in needed.items() if h not in hit]
        for start in range(0, len(todo), batch_size):
            embed_batch(pool, store, embedder, collection, model_key, todo[start : start + batch_size], stats)
        done += len(page)
        progress("embeddings", done, missing)
    try:
        stats.cache_files_compacted = embedding_cache.compact(pool, store, fingerprint)
    except Exception as err:  # noqa: BLE001 - housekeeping: every vector is already cached and indexed
        log.warning("embedding cache compaction skipped: %s: %s", type(err).__name__, err)
    if counters_before:
        after_counters = embedder.counters()
        stats.api = {k: round(after_counters[k] - counters_before[k], 3) for k in after_counters}
    figures.recorder(pool).flush()
    return stats


def embed_batch(pool, store, embedder: Embedder, collection: str, model_key: str, batch, stats: EmbedStats) -> None:
    spec = embedder.spec
    texts = [text for _, text, _ in batch]
    retries_before = embedder.counters().get("retries", 0)
    began = time.perf_counter()
    try:
        raw = embedder.embed(texts)
        if len(raw) != len(texts):
            raise ValueError(f"embedder returned {len(raw)} vectors for {len(texts)} inputs")
    except FatalEmbedderError:
        raise  # misconfiguration: no input is at fault, fail the step
    except Exception as err:  # noqa: BLE001 - the batch is dead-lettered with the reason, the run goes on
        raw = None
        batch_error = f"{type(err).__name__}: {err}"
    took = time.perf_counter() - began
    stats.seconds_embedding += took
    stats.embed_calls += 1
    if raw is None:
        rejects = [(i, batch_error) for i in range(len(batch))]
        good_hashes, good_vectors = [], np.zeros((0, spec.dims), np.float32)
        refused = {}
    else:
        result = gate(raw, spec.dims, spec.normalise)
        rejects, refused = result.rejected, result.refused
        good_hashes = [batch[i][0] for i in result.accepted]
        good_vectors = result.vectors
    if embedding_cache.write(pool, store, spec.cache_fingerprint, good_hashes, good_vectors):
        stats.cache_files_written += 1
    ok_refs = [cid for i in result.accepted for cid in batch[i][2]] if raw is not None else []
    stats.embedded += len(ok_refs)
    letters = [(cid, reason, batch[i][1][:500]) for i, reason in rejects for cid in batch[i][2]]
    with pool.connection() as conn, conn.transaction():
        stats.dead_lettered += catalog.dead_letter_many(conn, collection, "embed", letters, model_key)
        catalog.resolve_dead_letters(conn, collection, "embed", ok_refs, "embedded on a later run", model_key)
    recorder = figures.recorder(pool)
    recorder.observe(figures.EMBEDDING_SECONDS, collection, model_key, took)
    recorder.add(figures.EMBEDDING_INPUTS, collection, model_key, len(texts))
    recorder.add(figures.EMBEDDING_RETRIES, collection, model_key, embedder.counters().get("retries", 0) - retries_before)
    for kind, count in refused.items():
        recorder.add(figures.VECTOR_REJECTIONS, collection, model_key, count, label=kind)
    recorder.flush_if_due()


# ---------------------------------------------------------------- vector_table

def load_vectors(
    pool: ConnectionPool, store: ObjectStore, collection: str, model_key: str, batch_rows: int | None = None,
    progress: Progress = _no_progress,
) -> dict[str, Any]:
    """Load every live chunk that has a cached vector and no row yet; sync metadata; remove
    rows of deleted or re-chunked documents. One transaction per COPY batch."""
    batch_rows = batch_rows or _tuned("VP_LOAD_BATCH_ROWS", LOAD_BATCH_ROWS)
    with pool.connection() as conn:
        spec = catalog.get_model(conn, model_key)
        table = catalog.vector_table_name(conn, collection, model_key)
        with conn.transaction():
            tables.create_table(conn, table, spec, partitioned=tier_sql.wants_partitions(conn, collection))
        partitioned = tables.is_partitioned(conn, table)
        tid = tables.table_id(table)
        missing_total = docs_sql.count_chunks_missing(conn, collection, tid)
    inserted = without_vector = seen = 0
    timings = {"seconds_selecting": 0.0, "seconds_reading_cache": 0.0, "seconds_copying": 0.0, "seconds_syncing": 0.0}
    clock_started = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock_started
        now = time.perf_counter()
        timings[name] += now - clock_started
        clock_started = now

    for page in docs_sql.pages_of_missing_chunks(pool, collection, tid, batch_rows):
        lap("seconds_selecting")
        seen += len(page)
        vectors = embedding_cache.lookup(pool, store, spec.cache_fingerprint, {r[3] for r in page})
        lap("seconds_reading_cache")
        rows = [(r[0], r[1], r[2], r[3], r[4], r[5], r[6]) for r in page if r[3] in vectors]
        without_vector += len(page) - len(rows)
        if rows:
            matrix = np.vstack([vectors[r[3]] for r in rows])
            began = time.perf_counter()
            with pool.connection() as conn, conn.transaction():
                written = tables.copy_upsert(conn, table, spec, rows, matrix, assume_new=True)
            _count_batch(pool, collection, model_key, "vector_table", written, time.perf_counter() - began)
            inserted += written
            faults.point("load.after_batch")
        lap("seconds_copying")
        progress("vector_table", seen, missing_total)
    lap("seconds_selecting")
    with pool.connection() as conn:
        with conn.transaction():
            # Two joins over the whole collection: room for in-memory hash joins, this transaction only.
            conn.execute("SELECT set_config('work_mem', '256MB', true)")
            if partitioned:  # a changed source timestamp moves the row to its month's partition
                tables.ensure_partitions(conn, table, docs_sql.source_months(conn, collection))
            updated = docs_sql.sync_row_metadata(conn, collection, tid)
            removed = docs_sql.delete_orphan_rows(conn, collection, tid)
        lap("seconds_syncing")
        rows_now, size = tables.table_stats(conn, table)
    figures.recorder(pool).flush()
    return {
        "table": f"{catalog.VECTORS}.{table}",
        "inserted": inserted,
        "metadata_updated": updated,
        "removed": removed,
        "without_vector": without_vector,
        "rows": rows_now,
        "bytes": size,
        **{k: round(v, 3) for k, v in timings.items()},
    }


def _count_batch(pool: ConnectionPool, collection: str, model_key: str, stage: str, rows: int, seconds: float) -> None:
    """One committed batch in the run figures (rows written, seconds to write and commit it)."""
    recorder = figures.recorder(pool)
    recorder.add(figures.INGEST_ROWS, collection, model_key, rows, label=stage)
    recorder.observe(figures.BATCH_COMMIT_SECONDS, collection, model_key, seconds, label=stage)
    recorder.flush_if_due()
