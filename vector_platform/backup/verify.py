"""Checking backups: a collection's state digest (does a backup still hold what the collection
holds now?), a read-back of every file against the manifest, and a verified download for a
restore (every checksum is checked before anything is written).
"""

from __future__ import annotations

import hashlib
import shutil
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pyarrow.parquet as pq

from vector_platform import catalog, tables
from vector_platform.backup.locations import BackupCorrupt, all_files
from vector_platform.catalog import backups as backup_sql
from vector_platform.catalog import tiers as tier_sql
from vector_platform.object_store import ObjectStore
from vector_platform.tiers import snapshots

READ_CHUNK = 8 * 2**20


def collection_state(conn: psycopg.Connection, name: str) -> dict[str, str]:
    """A digest per part of the collection: its catalog rows and definition
    (`catalog.backups.catalog_state`) and each attached model's vectors: the table's digest
    while active, the serving snapshot's while cold, `none` without vectors. Equal states,
    equal data: the drop gate compares this with the newest backup's."""
    state = backup_sql.catalog_state(conn, name)
    coll = catalog.get_collection(conn, name)
    cold = tier_sql.cold_snapshots(conn, name)
    for model_key in coll.models:
        digest = "none"
        if coll.tier == "cold" and model_key in cold:
            receipt = tier_sql.get_snapshot(conn, cold[model_key])
            digest = receipt.table_digest if receipt else "missing"
        elif coll.tier == "active":
            table = catalog.vector_table_name(conn, name, model_key)
            if tables.table_exists(conn, table):
                digest = snapshots.table_digest(conn, table)[1]
        state[f"vectors/{model_key}"] = digest
    return state


def state_differences(backed_up: dict[str, str], now: dict[str, str]) -> list[str]:
    """The parts whose digest changed since the backup (names only: the digests say nothing to a person)."""
    return sorted(k for k in set(backed_up) | set(now) if backed_up.get(k) != now.get(k))


def verify_in_place(store: ObjectStore, manifest: dict[str, Any]) -> int:
    """Read every file of a backup back from its folder: sha256 and size must be the manifest's.
    Returns the bytes read; raises BackupCorrupt on the first difference."""
    total = 0
    for entry in all_files(manifest):
        try:
            sha, size = snapshots.sha256_of(store, entry["key"])
        except FileNotFoundError:
            raise BackupCorrupt(f"backup {manifest['id']}: {entry['key']} is missing from {store.url}") from None
        _compare(manifest, entry, sha, size)
        total += size
    return total


def _compare(manifest: dict[str, Any], entry: dict[str, Any], sha: str, size: int) -> None:
    if (sha, size) != (entry["sha256"], entry["bytes"]):
        raise BackupCorrupt(
            f"backup {manifest['id']}: {entry['key']} does not match its checksum (read {size} bytes, sha256 {sha[:12]}…; "
            f"the manifest says {entry['bytes']} bytes, sha256 {entry['sha256'][:12]}…); nothing was restored"
        )


def fetch_verified(store: ObjectStore, manifest: dict[str, Any], local_dir: Path) -> dict[str, Path]:
    """Every file of a backup in a local folder, each checked on the way down (sha256, size),
    then its rows, and the chunk ids of each model's vector files against the manifest's hash.
    Returns {key: local path}. Raises BackupCorrupt before the caller writes anything."""
    local_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for entry in all_files(manifest):
        target = local_dir / entry["key"]
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex}")
        digest, size = hashlib.sha256(), 0
        try:
            with store.fs.open_input_stream(store.path(entry["key"])) as src, open(tmp, "wb") as out:
                while block := src.read(READ_CHUNK):
                    digest.update(block)
                    size += len(block)
                    out.write(block)
            _compare(manifest, entry, digest.hexdigest(), size)
            tmp.replace(target)
        except FileNotFoundError:
            raise BackupCorrupt(f"backup {manifest['id']}: {entry['key']} is missing from {store.url}") from None
        finally:
            tmp.unlink(missing_ok=True)
        if pq.ParquetFile(target).metadata.num_rows != entry["rows"]:
            raise BackupCorrupt(f"backup {manifest['id']}: {entry['key']} does not hold the {entry['rows']} rows its manifest says")
        paths[entry["key"]] = target
    for model_key, part in manifest["vectors"].items():
        check_vector_ids(manifest, model_key, [pq.ParquetFile(paths[f["key"]]) for f in part["files"]])
    return paths


def check_vector_ids(manifest: dict[str, Any], model_key: str, files: list[pq.ParquetFile]) -> None:
    """The chunk ids of a model's vector files, read in file order, must hash to the
    manifest's `id_hash` (the sha256 of the sorted ids, one per line). Files hold their rows
    in chunk_id order and follow each other in it, so the ids stream in sorted order: constant
    memory, and rows out of order read as a mismatch."""
    digest = hashlib.sha256()
    for parquet in files:
        for batch in parquet.iter_batches(columns=["chunk_id"], batch_size=65536):
            digest.update(b"".join(i.encode() + b"\n" for i in batch.column(0).to_pylist()))
    if digest.hexdigest() != manifest["vectors"][model_key]["id_hash"]:
        raise BackupCorrupt(f"backup {manifest['id']}: the chunk ids of {model_key}'s vectors differ from the manifest's")


def clear_local(local_dir: Path) -> None:
    shutil.rmtree(local_dir, ignore_errors=True)
