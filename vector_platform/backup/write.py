"""Writing a backup of one collection to the backup location.

Under the collection's writer lock (exclusive: ingest, replay, tier moves, swaps and row
archival wait; searches go on), so the backup is one point in time. A repeatable-read
snapshot would not be enough: a cold collection's vectors and its row archive are files on
the object store, which a tier move or an archival job deletes or adds whatever Postgres
snapshot the backup reads under.

Order, so that a backup that counts is a whole one:
1. the catalog rows (documents, chunks, open dead letters, labelled queries) as Parquet;
2. each attached model's vectors: an active table read in chunk_id order into the
   cold-snapshot format (`tiers.snapshots`), or a cold collection's serving snapshot copied
   file by file, each checked against its receipt's sha256 on the way;
3. every file read back from the backup location: sha256, size, rows, and the vector
   files' chunk ids against the table's;
4. `manifest.json` last, then read back: from then on the backup is listed and restorable.
A failure before 4 removes what was written (a folder without a manifest never counts).

The row archive (`vector_platform.archive`: aged rows in Parquet on the primary store) is not
copied: the manifest and `backups` say how much of it a backup leaves out, and a drop refuses
to delete it without --force.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
import uuid
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from psycopg_pool import ConnectionPool

from vector_platform import catalog, clock, tables
from vector_platform.backup.locations import FORMAT, FORMAT_VERSION, MANIFEST, BackupCorrupt, BackupError, BackupInfo, folder
from vector_platform.backup.verify import check_vector_ids, collection_state, verify_in_place
from vector_platform.catalog import backups as backup_sql
from vector_platform.catalog import tiers as tier_sql
from vector_platform.catalog.tiers import SnapshotReceipt
from vector_platform.locks import writer_lock
from vector_platform.object_store import ObjectStore
from vector_platform.tiers import snapshots

ROWS_PER_FILE = 200_000
READ_CHUNK = 8 * 2**20


def backup_collection(
    pool: ConnectionPool,
    dsn: str,
    primary: ObjectStore,
    location: ObjectStore,
    name: str,
    say: Callable[[str], None] = lambda _: None,
) -> BackupInfo:
    """Write a verified backup of `name` under `location` (see the module's docstring)."""
    started = time.perf_counter()
    with writer_lock(dsn, name, say=say):
        with pool.connection() as conn:
            definition = backup_sql.read_definition(conn, name)
            state = collection_state(conn, name)
            archive = backup_sql.row_archive_counts(conn, name)
            sources = _vector_sources(conn, name, definition)
        created = clock.now()
        backup_id = f"{created:%Y%m%dT%H%M%S}Z-{uuid.uuid4().hex[:8]}"
        target = folder(location, f"{name}/{backup_id}")
        try:
            rows = {rs.name: _write_rows(target, rs, backup_sql.pages(pool, rs, name)) for rs in backup_sql.ROW_SETS}
            vectors = {}
            for model_key, (spec, source, fingerprint) in sources.items():
                prefix = f"vectors/{model_key}"
                if isinstance(source, SnapshotReceipt):
                    vectors[model_key] = _copy_snapshot(primary, target, source, spec, prefix)
                else:
                    vectors[model_key] = _write_table(pool, target, source, spec, fingerprint, prefix)
                say(f"{name}/{model_key}: {vectors[model_key]['rows']} vectors written")
            manifest = {
                "format": FORMAT, "format_version": FORMAT_VERSION, "id": backup_id, "collection": name,
                "created_at": created.isoformat(), "tier": definition["tier"], "definition": definition, "state": state,
                "rows": rows, "vectors": vectors,
                "row_archive": {"included": False, **archive},
                "consistency": "writer lock held while reading",
            }
            manifest["bytes"] = sum(f["bytes"] for part in (*rows.values(), *vectors.values()) for f in part["files"])
            _read_back(target, manifest)
            text = _manifest_text(manifest)
            target.put_bytes(MANIFEST, text)
            if target.get_bytes(MANIFEST) != text:
                raise BackupCorrupt(f"{target.uri(MANIFEST)} read back differs from the manifest written")
        except BaseException:
            _remove(target)  # no manifest: these files never counted
            raise
    say(f"{name}: backup {backup_id} written and verified at {target.url} ({manifest['bytes']} bytes, "
        f"{time.perf_counter() - started:.1f} s)")
    return BackupInfo.from_manifest(manifest, target.url)


def _vector_sources(conn, name: str, definition: dict[str, Any]) -> dict[str, tuple[Any, Any, str]]:
    """model key -> (spec, vector table name or the cold snapshot receipt, fingerprint of its
    vectors) for each attached model that has vectors."""
    cold = tier_sql.cold_snapshots(conn, name)
    out: dict[str, tuple[Any, Any, str]] = {}
    for model in definition["models"]:
        spec = catalog.get_model(conn, model["key"])
        if definition["tier"] == "cold" and model["key"] in cold:
            receipt = tier_sql.get_snapshot(conn, cold[model["key"]])
            if receipt is None:
                raise BackupError(f"cold collection {name!r}: the snapshot of {model['key']} is no longer recorded")
            out[model["key"]] = (spec, receipt, receipt.manifest["fingerprint"])
        elif definition["tier"] == "active" and tables.table_exists(conn, model["table"]):
            out[model["key"]] = (spec, model["table"], model["vectors_fingerprint"])
    return out


def _write_rows(target: ObjectStore, rows: backup_sql.RowSet, pages: Iterator[pa.Table]) -> dict[str, Any]:
    """A catalog table's pages as Parquet files under `<rows.name>/`, hashed while written."""
    files: list[dict[str, Any]] = []
    total = 0
    page = next(pages, None)
    while page is not None or not files:
        key = f"{rows.name}/part-{len(files):05d}.parquet"
        digest = hashlib.sha256()
        in_file = 0
        with target.open_output(key) as raw:
            sink = snapshots.HashingSink(raw, digest)
            with pq.ParquetWriter(sink, rows.schema, compression="zstd") as writer:
                while page is not None and in_file < ROWS_PER_FILE:
                    writer.write_table(page)
                    in_file += page.num_rows
                    page = next(pages, None)
        files.append({"key": key, "rows": in_file, "bytes": sink.size, "sha256": digest.hexdigest()})
        total += in_file
    return {"rows": total, "files": files}


def _write_table(pool: ConnectionPool, target: ObjectStore, table: str, spec, fingerprint: str, prefix: str) -> dict[str, Any]:
    """An active vector table in the cold-snapshot format, with its digest (what the restored
    table must have)."""
    with pool.connection() as conn:
        rows, digest = snapshots.table_digest(conn, table)
    files, id_hash, written = snapshots.write_table_files(pool, target, table, spec, prefix)
    if written != rows:
        raise BackupError(f"{table} changed while it was written ({rows} rows counted, {written} written)")
    return {"source": "table", "fingerprint": fingerprint, "dims": spec.dims, "storage_type": spec.storage_type,
            "rows": rows, "id_hash": id_hash, "table_digest": digest, "files": files}


def _copy_snapshot(primary: ObjectStore, target: ObjectStore, receipt: SnapshotReceipt, spec, prefix: str) -> dict[str, Any]:
    """A cold snapshot's files copied from the primary store, each checked against its
    receipt's sha256 on the way (a bad copy is removed and the backup fails)."""
    files = []
    for i, entry in enumerate(receipt.manifest["files"]):
        key = f"{prefix}/part-{i:05d}.parquet"
        digest, size = hashlib.sha256(), 0
        with primary.fs.open_input_stream(primary.path(entry["key"])) as src, target.open_output(key) as out:
            while block := src.read(READ_CHUNK):
                digest.update(block)
                size += len(block)
                out.write(block)
            if (digest.hexdigest(), size) != (entry["sha256"], entry["bytes"]):
                raise BackupCorrupt(
                    f"snapshot {receipt.id} of {receipt.collection}/{receipt.model_key}: {entry['key']} on the primary store does "
                    f"not match its receipt (sha256 {digest.hexdigest()[:12]}…, receipt {entry['sha256'][:12]}…); no backup written"
                )
        files.append({"key": key, "rows": entry["rows"], "bytes": size, "sha256": entry["sha256"]})
    return {"source": f"cold snapshot {receipt.id}", "fingerprint": receipt.manifest["fingerprint"],
            "dims": receipt.manifest["dims"], "storage_type": receipt.manifest.get("storage_type", spec.storage_type),
            "rows": receipt.rows, "id_hash": receipt.manifest["id_hash"], "table_digest": receipt.table_digest, "files": files}


def _read_back(target: ObjectStore, manifest: dict[str, Any]) -> None:
    """Every file as the backup location returns it: sha256 and size, rows, and the vector
    files' chunk ids against the table's."""
    verify_in_place(target, manifest)
    for part in manifest["rows"].values():
        for entry in part["files"]:
            with target.open_input(entry["key"]) as f:
                if pq.ParquetFile(f).metadata.num_rows != entry["rows"]:
                    raise BackupCorrupt(f"{target.uri(entry['key'])}: the rows read back differ from the {entry['rows']} written")
    for model_key, part in manifest["vectors"].items():
        with contextlib.ExitStack() as stack:
            files = [pq.ParquetFile(stack.enter_context(target.open_input(f["key"]))) for f in part["files"]]
            if sum(f.metadata.num_rows for f in files) != part["rows"]:
                raise BackupCorrupt(f"{target.url}/vectors/{model_key}: the rows read back differ from the {part['rows']} written")
            check_vector_ids(manifest, model_key, files)


def _manifest_text(manifest: dict[str, Any]) -> bytes:
    return tier_sql.manifest_text(manifest)


def _remove(target: ObjectStore) -> None:
    for key in target.list(""):
        target.delete(key, missing_ok=True)
