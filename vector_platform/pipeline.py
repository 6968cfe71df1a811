"""The steps behind each asset, as plain functions over a pool, an object store and an embedder.

Dagster assets in `defs/` are thin wrappers around these; each returns a dict of figures that
becomes the materialization's metadata. Every step is idempotent and converges after a kill.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from vector_platform import catalog, clock, embedding_cache, vector_sql
from vector_platform.chunking import Chunker
from vector_platform.embedders import Embedder
from vector_platform.object_store import ObjectStore
from vector_platform.sources import Document, Rejection, read_source
from vector_platform.validation import check_matrix, gate

Progress = Callable[[str, int, int], None]


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


# ---------------------------------------------------------------- source_documents

def register_documents(pool: ConnectionPool, collection: str) -> dict[str, Any]:
    """Read the source; add/update documents by content hash; soft-delete the ones that vanished."""
    with pool.connection() as conn:
        catalog.bootstrap(conn)
        coll = catalog.get_collection(conn, collection)
        now = clock.now()
        counts = {"added": 0, "changed": 0, "unchanged": 0, "deleted": 0, "restored": 0, "rejected": 0}
        known = {
            row[0]: (row[1], row[2])
            for row in conn.execute(
                "SELECT doc_id, content_hash, deleted_at IS NOT NULL FROM vector_platform.documents WHERE collection = %s",
                (collection,),
            )
        }
        seen: set[str] = set()
        rejected_refs: list[str] = []
        with conn.transaction():
            for item in read_source(coll.source, coll.settings.max_document_bytes):
                if isinstance(item, Rejection):
                    catalog.dead_letter(conn, collection, "source", item.ref, item.error, item.payload)
                    rejected_refs.append(item.ref)
                    counts["rejected"] += 1
                    continue
                seen.add(item.doc_id)
                previous = known.get(item.doc_id)
                if previous is None:
                    counts["added"] += 1
                elif previous[1]:
                    counts["restored"] += 1
                elif previous[0] != item.content_hash:
                    counts["changed"] += 1
                else:
                    counts["unchanged"] += 1
                _upsert_document(conn, collection, item, now)
            gone = [doc_id for doc_id, (_, deleted) in known.items() if doc_id not in seen and not deleted]
            if gone:
                conn.execute(
                    "UPDATE vector_platform.documents SET deleted_at = %s, updated_at = %s "
                    "WHERE collection = %s AND doc_id = ANY(%s)",
                    (now, now, collection, gone),
                )
            counts["deleted"] = len(gone)
            # Documents that now read fine close their earlier source dead letters.
            catalog.resolve_dead_letters(conn, collection, "source", list(seen), "document read on a later run")
        live = conn.execute(
            "SELECT count(*) FROM vector_platform.documents WHERE collection = %s AND deleted_at IS NULL", (collection,)
        ).fetchone()[0]
    return {**counts, "live_documents": live}


def _upsert_document(conn, collection: str, doc: Document, now) -> None:
    conn.execute(
        """
        INSERT INTO vector_platform.documents
            (collection, doc_id, title, body, content_hash, metadata, source_ts, first_seen_at, updated_at)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
        ON CONFLICT (collection, doc_id) DO UPDATE SET
            title = excluded.title, body = excluded.body, content_hash = excluded.content_hash,
            metadata = excluded.metadata, source_ts = excluded.source_ts, deleted_at = NULL,
            updated_at = excluded.updated_at
        WHERE (documents.content_hash, documents.metadata, documents.source_ts, documents.deleted_at IS NULL)
              IS DISTINCT FROM (excluded.content_hash, excluded.metadata, excluded.source_ts, true)
        """,
        (collection, doc.doc_id, doc.title, doc.body, doc.content_hash, Jsonb(doc.metadata), doc.source_ts, now, now),
    )


# ---------------------------------------------------------------- chunks

def chunk_documents(
    pool: ConnectionPool, collection: str, chunker: Chunker, progress: Progress = _no_progress
) -> dict[str, Any]:
    """Re-chunk documents whose content changed since they were last chunked; drop chunks of deleted ones."""
    with pool.connection() as conn:
        with conn.transaction():
            dropped = conn.execute(
                """
                DELETE FROM vector_platform.chunks c USING vector_platform.documents d
                WHERE c.collection = %s AND d.collection = c.collection AND d.doc_id = c.doc_id
                  AND d.deleted_at IS NOT NULL
                """,
                (collection,),
            ).rowcount
            conn.execute(
                "UPDATE vector_platform.documents SET chunked_hash = NULL WHERE collection = %s AND deleted_at IS NOT NULL",
                (collection,),
            )
        todo = conn.execute(
            """
            SELECT doc_id, title, body, content_hash FROM vector_platform.documents
            WHERE collection = %s AND deleted_at IS NULL AND chunked_hash IS DISTINCT FROM content_hash
            ORDER BY doc_id
            """,
            (collection,),
        ).fetchall()
        made = 0
        for i, (doc_id, title, body, doc_hash) in enumerate(todo):
            doc = Document(doc_id=doc_id, body=body, title=title)
            chunks = chunker.split(collection, doc_id, doc.text_for_chunking())
            # One transaction per document: a kill leaves each document fully old or fully new.
            with conn.transaction():
                conn.execute(
                    "DELETE FROM vector_platform.chunks WHERE collection = %s AND doc_id = %s", (collection, doc_id)
                )
                if not chunks:
                    catalog.dead_letter(conn, collection, "chunk", doc_id, "no text left to embed after chunking")
                with conn.cursor() as cur:
                    with cur.copy(
                        "COPY vector_platform.chunks (chunk_id, collection, doc_id, seq, text, content_hash, token_count) FROM STDIN"
                    ) as copy:
                        for ch in chunks:
                            copy.write_row((ch.chunk_id, collection, doc_id, ch.seq, ch.text, ch.content_hash, ch.token_count))
                conn.execute(
                    "UPDATE vector_platform.documents SET chunked_hash = %s WHERE collection = %s AND doc_id = %s",
                    (doc_hash, collection, doc_id),
                )
            made += len(chunks)
            progress("chunks", i + 1, len(todo))
        with conn.transaction():
            superseded = conn.execute(
                """
                UPDATE vector_platform.dead_letters dl SET resolved_at = %s,
                    resolution = 'chunk no longer exists (its document changed or was deleted)'
                WHERE dl.collection = %s AND dl.stage = 'embed' AND dl.resolved_at IS NULL
                  AND NOT EXISTS (SELECT 1 FROM vector_platform.chunks c WHERE c.chunk_id::text = dl.ref)
                """,
                (clock.now(), collection),
            ).rowcount
        total, tokens_max = conn.execute(
            "SELECT count(*), coalesce(max(token_count), 0) FROM vector_platform.chunks WHERE collection = %s",
            (collection,),
        ).fetchone()
    return {
        "documents_chunked": len(todo),
        "chunks_written": made,
        "chunks_dropped_for_deleted_documents": dropped,
        "dead_letters_superseded": superseded,
        "chunks_total": total,
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
    """Make sure every live chunk's content has a valid vector for this model in the cache.

    Order of lookup: the vector table (already loaded), the cache, then the model. Each batch
    is gated and written to the cache before the next one starts; rejects become dead letters.
    """
    spec = embedder.spec
    stats = EmbedStats()
    api_before = embedder.stats.as_dict() if hasattr(embedder, "stats") else None
    with pool.connection() as conn:
        table = catalog.vector_table_name(conn, collection, model_key)
        in_table = vector_sql.table_exists(conn, table)
        existing = (
            sql.SQL("EXISTS (SELECT 1 FROM {} v WHERE v.chunk_id = c.chunk_id)").format(vector_sql.table_id(table))
            if in_table
            else sql.SQL("false")
        )
        rows = conn.execute(
            sql.SQL(
                """
                SELECT c.chunk_id, c.content_hash, c.text, {existing}
                FROM vector_platform.chunks c JOIN vector_platform.documents d USING (collection, doc_id)
                WHERE c.collection = %s AND d.deleted_at IS NULL ORDER BY c.doc_id, c.seq
                """
            ).format(existing=existing),
            (collection,),
        ).fetchall()
    stats.chunks = len(rows)
    needed: dict[str, tuple[str, list[str]]] = {}  # content hash -> (text, chunk ids)
    for chunk_id, content_hash, text, loaded in rows:
        if loaded:
            stats.already_in_table += 1
            continue
        needed.setdefault(content_hash, (text, []))[1].append(str(chunk_id))
    cached = embedding_cache.lookup(store, model_key, needed)
    stats.from_cache = sum(len(needed[h][1]) for h in cached)
    todo = [(h, text, ids) for h, (text, ids) in needed.items() if h not in cached]
    resolved_refs = [cid for h in cached for cid in needed[h][1]]
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        texts = [text for _, text, _ in batch]
        began = time.perf_counter()
        try:
            raw = embedder.embed(texts)
            if len(raw) != len(texts):
                raise ValueError(f"embedder returned {len(raw)} vectors for {len(texts)} inputs")
        except Exception as err:  # noqa: BLE001 - the batch is dead-lettered with the reason, the run goes on
            if getattr(err, "fatal", False):  # misconfiguration: no input is at fault, fail the step
                raise
            raw = None
            batch_error = f"{type(err).__name__}: {err}"
        stats.seconds_embedding += time.perf_counter() - began
        stats.embed_calls += 1
        if raw is None:
            result_rejects = [(i, batch_error) for i in range(len(batch))]
            good_hashes, good_vectors = [], np.zeros((0, spec.dims), np.float32)
        else:
            result = gate(raw, spec.dims, spec.normalise)
            result_rejects = result.rejected
            good_hashes = [batch[i][0] for i in result.accepted]
            good_vectors = result.vectors
        if embedding_cache.write(store, model_key, good_hashes, good_vectors):
            stats.cache_files_written += 1
        stats.embedded += sum(len(needed[h][1]) for h in good_hashes)
        with pool.connection() as conn, conn.transaction():
            for i, reason in result_rejects:
                for cid in batch[i][2]:
                    catalog.dead_letter(conn, collection, "embed", cid, reason, batch[i][1][:500], model_key)
                    stats.dead_lettered += 1
            ok_refs = [cid for h in good_hashes for cid in needed[h][1]]
            catalog.resolve_dead_letters(conn, collection, "embed", ok_refs, "embedded on a later run", model_key)
        progress("embeddings", min(start + batch_size, len(todo)), len(todo))
    if resolved_refs:
        with pool.connection() as conn, conn.transaction():
            catalog.resolve_dead_letters(conn, collection, "embed", resolved_refs, "found in cache", model_key)
    stats.cache_files_compacted = embedding_cache.compact(store, model_key)
    if api_before is not None:
        after = embedder.stats.as_dict()
        stats.api = {k: round(after[k] - api_before[k], 3) for k in after}
    return stats


def validate_cached_vectors(pool: ConnectionPool, store: ObjectStore, collection: str, model_key: str) -> dict[str, Any]:
    """What `embeddings_are_valid` checks: the vectors about to be loaded, as stored in the cache."""
    with pool.connection() as conn:
        spec = catalog.get_model(conn, model_key)
        hashes = [r[0] for r in conn.execute(
            """
            SELECT DISTINCT c.content_hash FROM vector_platform.chunks c
            JOIN vector_platform.documents d USING (collection, doc_id)
            WHERE c.collection = %s AND d.deleted_at IS NULL
            """,
            (collection,),
        )]
    found = embedding_cache.lookup(store, model_key, hashes)
    matrix = np.vstack(list(found.values())) if found else np.zeros((0, spec.dims), np.float32)
    problems = check_matrix(matrix, spec.dims, unit=spec.normalise)
    return {"vectors_checked": len(found), "dims": spec.dims, "problems": problems}


# ---------------------------------------------------------------- vector_table

def load_vectors(
    pool: ConnectionPool, store: ObjectStore, collection: str, model_key: str, batch_rows: int = 20_000
) -> dict[str, Any]:
    """Upsert every live chunk that has a vector; remove rows of deleted or re-chunked documents."""
    with pool.connection() as conn:
        spec = catalog.get_model(conn, model_key)
        table = catalog.vector_table_name(conn, collection, model_key)
        vector_sql.create_table(conn, table, spec)
        conn.commit()
        tid = vector_sql.table_id(table)
        missing = conn.execute(
            sql.SQL(
                """
                SELECT c.chunk_id, c.doc_id, c.seq, c.content_hash, c.text, d.metadata, d.source_ts
                FROM vector_platform.chunks c JOIN vector_platform.documents d USING (collection, doc_id)
                WHERE c.collection = %s AND d.deleted_at IS NULL
                  AND NOT EXISTS (SELECT 1 FROM {t} v WHERE v.chunk_id = c.chunk_id)
                ORDER BY c.doc_id, c.seq
                """
            ).format(t=tid),
            (collection,),
        ).fetchall()
        vectors = embedding_cache.lookup(store, model_key, {r[3] for r in missing})
        loadable = [r for r in missing if r[3] in vectors]
        inserted = 0
        for start in range(0, len(loadable), batch_rows):
            part = loadable[start : start + batch_rows]
            with conn.transaction():
                inserted += vector_sql.copy_upsert(
                    conn, table, spec, part, np.vstack([vectors[r[3]] for r in part]), assume_new=True
                )
        with conn.transaction():
            updated = conn.execute(
                sql.SQL(
                    """
                    UPDATE {t} v SET doc_id = c.doc_id, seq = c.seq, metadata = d.metadata,
                        source_ts = d.source_ts, updated_at = now()
                    FROM vector_platform.chunks c JOIN vector_platform.documents d USING (collection, doc_id)
                    WHERE v.chunk_id = c.chunk_id AND c.collection = %s AND d.deleted_at IS NULL
                      AND (v.seq, v.metadata, v.source_ts) IS DISTINCT FROM (c.seq, d.metadata, d.source_ts)
                    """
                ).format(t=tid),
                (collection,),
            ).rowcount
            removed = conn.execute(
                sql.SQL(
                    """
                    DELETE FROM {t} v WHERE NOT EXISTS (
                        SELECT 1 FROM vector_platform.chunks c JOIN vector_platform.documents d USING (collection, doc_id)
                        WHERE c.chunk_id = v.chunk_id AND c.collection = %s AND d.deleted_at IS NULL)
                    """
                ).format(t=tid),
                (collection,),
            ).rowcount
        rows, size = conn.execute(
            sql.SQL("SELECT count(*), pg_total_relation_size(%s::regclass) FROM {t}").format(t=tid),
            (f'{catalog.VECTORS}."{table}"',),
        ).fetchone()
        conn.commit()
    return {
        "table": f"{catalog.VECTORS}.{table}",
        "inserted": inserted,
        "metadata_updated": updated,
        "removed": removed,
        "without_vector": len(missing) - len(loadable),
        "rows": rows,
        "bytes": size,
    }


def count_lost_chunks(pool: ConnectionPool, collection: str, model_key: str) -> dict[str, int]:
    """Live chunks with neither a vector nor an open dead letter, and rows with no live chunk."""
    with pool.connection() as conn:
        table = catalog.vector_table_name(conn, collection, model_key)
        if not vector_sql.table_exists(conn, table):
            return {"lost": -1, "orphans": 0, "live_chunks": 0, "dead_letters": 0}
        tid = vector_sql.table_id(table)
        lost, live = conn.execute(
            sql.SQL(
                """
                SELECT count(*) FILTER (WHERE v.chunk_id IS NULL AND dl.id IS NULL), count(*)
                FROM vector_platform.chunks c
                JOIN vector_platform.documents d USING (collection, doc_id)
                LEFT JOIN {t} v ON v.chunk_id = c.chunk_id
                LEFT JOIN vector_platform.dead_letters dl ON dl.collection = c.collection AND dl.model_key = %(m)s
                     AND dl.stage = 'embed' AND dl.ref = c.chunk_id::text AND dl.resolved_at IS NULL
                WHERE c.collection = %(c)s AND d.deleted_at IS NULL
                """
            ).format(t=tid),
            {"c": collection, "m": model_key},
        ).fetchone()
        orphans = conn.execute(
            sql.SQL(
                """
                SELECT count(*) FROM {t} v WHERE NOT EXISTS (
                    SELECT 1 FROM vector_platform.chunks c JOIN vector_platform.documents d USING (collection, doc_id)
                    WHERE c.chunk_id = v.chunk_id AND c.collection = %s AND d.deleted_at IS NULL)
                """
            ).format(t=tid),
            (collection,),
        ).fetchone()[0]
        dead = conn.execute(
            "SELECT count(*) FROM vector_platform.dead_letters WHERE collection = %s AND model_key IN (%s, '') AND resolved_at IS NULL",
            (collection, model_key),
        ).fetchone()[0]
    return {"lost": lost, "orphans": orphans, "live_chunks": live, "dead_letters": dead}
