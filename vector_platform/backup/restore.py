"""Restoring a backup as a collection, under its own name or a new one, without embedding
anything again.

1. Refusals first, nothing written: the target collection exists; a model key of the backup
   is registered here with another fingerprint (a model key is one model for ever); this
   release computes another fingerprint for a model's spec.
2. Every file is fetched to a local folder and checked on the way (sha256, size), then its
   rows and the vector files' chunk ids: a mismatch stops the restore before any write.
3. Under the target's writer lock. A cold collection's vectors become a new verified
   snapshot on the primary object store (`snapshots.publish`), as an evict would make.
4. One transaction writes everything else: missing models are registered, the collection
   row and its attachments, documents, chunks, open dead letters and labelled queries are
   COPied in; an active collection's vector tables are COPied (the product's bulk path),
   checked against the backup's digest, given their HNSW index and the serving view; a
   cold one is pointed at its new snapshots. A kill before the commit leaves nothing in
   Postgres; the snapshot files of step 3 without a collection are swept by the re-run,
   which then completes. The Dagster partitions are registered after the commit (the caller).

Restored `--as NEW`, chunk ids are derived from the new name (`ingest.chunking.chunk_id`, as
ingest would): the same id for a chunk row and for its vector rows, so a later ingest of the
same source into NEW finds everything in place and adds nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from psycopg_pool import ConnectionPool

from vector_platform import catalog, faults, tables
from vector_platform.backup.drop import finish_earlier_drops
from vector_platform.backup.locations import BackupCorrupt, BackupError, BackupInfo
from vector_platform.backup.verify import clear_local, fetch_verified
from vector_platform.catalog import backups as backup_sql
from vector_platform.catalog import tiers as tier_sql
from vector_platform.catalog.tiers import SnapshotReceipt
from vector_platform.ingest.chunking import chunk_id
from vector_platform.locks import writer_lock
from vector_platform.models import ModelSpec
from vector_platform.names import validate_name
from vector_platform.object_store import ObjectStore
from vector_platform.settings import CollectionSettings, vp_home
from vector_platform.tiers import snapshots

BATCH_ROWS = 5000


class RestoreRefused(BackupError):
    """A restore that cannot start (the target exists, a model conflicts): nothing was written."""


@dataclass
class RestoreReport:
    collection: str
    backup_id: str
    backup_uri: str
    tier: str
    renamed_from: str | None
    documents: int
    chunks: int
    vectors: dict[str, int]
    models_registered: list[str] = field(default_factory=list)
    snapshots: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _Plan:
    """One restore: the verified backup, and where it goes."""

    manifest: dict[str, Any]
    paths: dict[str, Path]  # backup key -> the verified local copy
    specs: dict[str, ModelSpec]
    missing: list[ModelSpec]  # models to register
    target: str
    renamed: bool
    report: RestoreReport

    def vector_batches(self, model_key: str) -> Iterator[pa.RecordBatch]:
        """A model's vector rows, with chunk ids derived from the target's name when renamed."""
        files = [self.paths[f["key"]] for f in self.manifest["vectors"][model_key]["files"]]
        for batch in snapshots.read_batches(files, batch_rows=BATCH_ROWS):
            yield _renamed(batch, self.target) if self.renamed else batch

    def check_digest(self, model_key: str, digest: str) -> None:
        """Under its own name the rows read must have the digest the table had at backup time."""
        if not self.renamed and digest != self.manifest["vectors"][model_key]["table_digest"]:
            raise BackupCorrupt(f"backup {self.manifest['id']}: the vector rows of {model_key} do not have the digest of "
                                "the table backed up; nothing restored")


def restore_collection(
    pool: ConnectionPool,
    dsn: str,
    primary: ObjectStore,
    backup_store: ObjectStore,
    info: BackupInfo,
    as_name: str | None = None,
    say: Callable[[str], None] = lambda _: None,
    work_dir: Path | None = None,
) -> RestoreReport:
    """Restore the backup in `backup_store` (its folder) as `as_name`, or under its own name
    (see the module's docstring for the order of steps)."""
    started = time.perf_counter()
    manifest = info.manifest
    source_name = manifest["collection"]
    target = validate_name(as_name or source_name)
    with pool.connection() as conn:
        _refuse_existing(conn, target)
        specs, missing = _check_models(conn, manifest)
    report = RestoreReport(target, info.id, info.uri, manifest["tier"], source_name if target != source_name else None,
                           0, 0, {}, [s.key for s in missing], warnings=_left_out(manifest))
    work = (work_dir or vp_home() / "cache" / "restore-backup") / f"{target}-{info.id}"
    try:
        paths = fetch_verified(backup_store, manifest, work)
        say(f"backup {info.id}: every file matches its checksum; restoring as {target!r}")
        plan = _Plan(manifest, paths, specs, missing, target, target != source_name, report)
        with writer_lock(dsn, target, say=say):
            with pool.connection() as conn:
                _refuse_existing(conn, target)
            finish_earlier_drops(pool, primary, target, say)
            _sweep_unowned_snapshots(pool, primary, target)
            _write(pool, primary, plan, started)
    finally:
        clear_local(work)
    report.seconds = round(time.perf_counter() - started, 3)
    say(f"{target}: restored from backup {info.id} ({report.documents} documents, "
        + ", ".join(f"{m} {n} vectors" for m, n in report.vectors.items()) + f", {manifest['tier']}); nothing embedded")
    for warning in report.warnings:
        say(f"warning: {warning}")
    return report


def _left_out(manifest: dict[str, Any]) -> list[str]:
    archive = manifest["row_archive"]
    if archive["included"] or not (archive["documents"] or archive["files"]):
        return []
    return [f"the row archive of {manifest['collection']!r} ({archive['documents']} documents) is not in backups: those "
            "documents are not restored (an ingest of the source would add them again as new documents)"]


def _write(pool: ConnectionPool, primary: ObjectStore, plan: _Plan, started: float) -> None:
    """Steps 3 and 4: a cold collection's snapshots, then the one transaction."""
    manifest, report = plan.manifest, plan.report
    published: dict[str, SnapshotReceipt] = {}
    try:
        if manifest["tier"] == "cold":
            published = _publish_cold(pool, primary, plan)
            report.snapshots = {m: r.id for m, r in published.items()}
        with pool.connection() as conn, conn.transaction():
            _write_catalog(conn, plan)
            if manifest["tier"] == "active":
                _load_vectors(pool, conn, plan)
            for model_key, receipt in published.items():
                tier_sql.set_cold_snapshot(conn, plan.target, model_key, receipt.id)
                report.vectors[model_key] = receipt.rows
            serving = manifest["definition"]["serving_model"]
            tier_sql.record_tier_event(
                conn, plan.target, None, manifest["tier"], f"restored from backup {manifest['id']}",
                report.vectors.get(serving, 0), manifest["bytes"], time.perf_counter() - started, None,
                report.snapshots.get(serving),
            )
            faults.point("restore.before_commit")
    except BaseException:
        for receipt in published.values():  # no collection will ever be served from them
            snapshots.delete_snapshot(pool, primary, receipt)
        raise


def _refuse_existing(conn, target: str) -> None:
    if catalog.get_collection(conn, target, missing_ok=True) is not None:
        raise RestoreRefused(
            f"collection {target!r} exists: nothing restored. Restore beside it with --as NEW_NAME, or drop it first "
            f"(vector-platform collections drop {target})"
        )


def _check_models(conn, manifest: dict[str, Any]) -> tuple[dict[str, ModelSpec], list[ModelSpec]]:
    """The backup's models as registered here (key -> spec), and those to register. Refused:
    a key registered with another identity, or a spec whose fingerprint this release computes
    differently from the one its vectors were made with."""
    specs, missing = {}, []
    for model in manifest["definition"]["models"]:
        spec = ModelSpec(**model["spec"])
        made_with = manifest["vectors"].get(model["key"], {}).get("fingerprint", model["vectors_fingerprint"])
        if spec.fingerprint != model["fingerprint"] or (made_with and made_with != spec.fingerprint):
            raise RestoreRefused(
                f"model {spec.key!r}: the backup's vectors have fingerprint {made_with}, but this release computes "
                f"{spec.fingerprint} for the same spec (its identity rules or chunker changed); nothing restored"
            )
        existing = catalog.get_model(conn, spec.key, missing_ok=True)
        if existing is None:
            missing.append(spec)
            specs[spec.key] = spec
        elif existing.fingerprint != spec.fingerprint:
            raise RestoreRefused(
                f"model key {spec.key!r} is registered here as another model (fingerprint {existing.fingerprint}; the backup's "
                f"is {spec.fingerprint}: {'; '.join(existing.differences(spec))}). A model key is one model for ever: "
                "nothing restored"
            )
        else:
            specs[spec.key] = existing
    return specs, missing


def _sweep_unowned_snapshots(pool: ConnectionPool, primary: ObjectStore, target: str) -> None:
    """Snapshots of a collection that does not exist are what a killed restore left (step 3
    without its commit): deleted before the new attempt writes its own."""
    with pool.connection() as conn:
        receipts = tier_sql.live_snapshots(conn, target)
    for receipt in receipts:
        snapshots.delete_snapshot(pool, primary, receipt)
    for key in primary.list(f"collections/{target}/snapshots"):  # files that never got a receipt
        primary.delete(key, missing_ok=True)


def _renamed(batch: pa.RecordBatch, target: str) -> pa.RecordBatch:
    """Snapshot rows with chunk ids derived from the new collection name."""
    ids = [str(chunk_id(target, d, t)) for d, t in zip(batch.column("doc_id").to_pylist(), batch.column("text").to_pylist())]
    index = batch.schema.get_field_index("chunk_id")
    columns = list(batch.columns)
    columns[index] = pa.array(ids, pa.string())
    return pa.RecordBatch.from_arrays(columns, schema=batch.schema)


def _publish_cold(pool: ConnectionPool, primary: ObjectStore, plan: _Plan) -> dict[str, SnapshotReceipt]:
    """Each model's vectors as a new verified snapshot of the target on the primary store."""
    definition = plan.manifest["definition"]
    coll = catalog.Collection(plan.target, definition["source"], CollectionSettings.from_json(definition["settings"]),
                              definition["serving_model"], "cold", tuple(m["key"] for m in definition["models"]))
    published: dict[str, SnapshotReceipt] = {}
    try:
        for model_key, part in plan.manifest["vectors"].items():
            digest = snapshots.RowsDigest(pool)

            def pages(model_key=model_key, digest=digest) -> Iterator[pa.Table]:
                for batch in plan.vector_batches(model_key):
                    page = pa.Table.from_batches([batch])
                    digest.add(page)
                    yield page

            def finish(snapshot_manifest, model_key=model_key, digest=digest) -> None:
                plan.check_digest(model_key, digest.value)
                snapshot_manifest["table_digest"] = digest.value
                snapshot_manifest["restored_from_backup"] = plan.manifest["id"]

            spec = plan.specs[model_key]
            snapshot_manifest = snapshots.new_manifest(coll, spec, catalog.table_name_for(plan.target, model_key), part["fingerprint"])
            published[model_key] = snapshots.publish(pool, primary, snapshot_manifest, pages(), spec, part["rows"], finish)
    except BaseException:
        for receipt in published.values():
            snapshots.delete_snapshot(pool, primary, receipt)
        raise
    return published


def _write_catalog(conn, plan: _Plan) -> None:
    """Models, the collection, its attachments and its catalog rows, in the caller's transaction."""
    for spec in plan.missing:
        catalog.register_model(conn, spec)
    backup_sql.insert_collection(conn, plan.target, plan.manifest["definition"], plan.manifest["tier"])
    follow = _ChunkIds(plan) if plan.renamed else None
    for rows in backup_sql.ROW_SETS:
        names = [n for n, _ in rows.columns]
        loaded = 0
        for entry in plan.manifest["rows"][rows.name]["files"]:
            for batch in pq.ParquetFile(plan.paths[entry["key"]]).iter_batches(batch_size=BATCH_ROWS):
                values = [dict(zip(names, r)) for r in zip(*(batch.column(n).to_pylist() for n in names))]
                if follow is not None:
                    follow.rename(rows, values)
                loaded += backup_sql.copy_in(conn, rows, plan.target, [[v[n] for n in names] for v in values])
        expected = plan.manifest["rows"][rows.name]["rows"]
        if loaded != expected:
            raise BackupError(f"{rows.name}: {loaded} rows restored, the backup holds {expected}")
    plan.report.documents = plan.manifest["rows"]["documents"]["rows"]
    plan.report.chunks = plan.manifest["rows"]["chunks"]["rows"]


class _ChunkIds:
    """Renamed, a chunk's id is derived from the new name (as ingest would derive it), and an
    embedding dead letter, which names its chunk by id, follows it."""

    def __init__(self, plan: _Plan):
        self.target = plan.target
        self.letters: set[str] = set()
        for entry in plan.manifest["rows"]["dead_letters"]["files"]:
            rows = pq.read_table(plan.paths[entry["key"]], columns=["stage", "ref"]).to_pylist()
            self.letters |= {r["ref"] for r in rows if r["stage"] == "embed"}
        self.new_ids: dict[str, str] = {}  # only the ids a dead letter names

    def rename(self, rows: backup_sql.RowSet, values: list[dict[str, Any]]) -> None:
        if rows is backup_sql.CHUNKS:
            for v in values:
                old, v["chunk_id"] = v["chunk_id"], str(chunk_id(self.target, v["doc_id"], v["text"]))
                if old in self.letters:
                    self.new_ids[old] = v["chunk_id"]
        elif rows is backup_sql.DEAD_LETTERS:
            for v in values:
                if v["stage"] == "embed":
                    v["ref"] = self.new_ids.get(v["ref"], v["ref"])


def _load_vectors(pool: ConnectionPool, conn, plan: _Plan) -> None:
    """Each model's vector table: COPY, the digest checked, the HNSW index built; then the
    serving view. In the caller's transaction (nobody sees these tables before the commit)."""
    definition = plan.manifest["definition"]
    settings = CollectionSettings.from_json(definition["settings"])
    partitioned = tier_sql.wants_partitions(conn, plan.target)
    for model_key, part in plan.manifest["vectors"].items():
        spec = plan.specs[model_key]
        table = catalog.vector_table_name(conn, plan.target, model_key)
        tables.create_table(conn, table, spec, partitioned=partitioned)
        digest = snapshots.RowsDigest(pool)
        for batch in plan.vector_batches(model_key):
            digest.add(pa.Table.from_batches([batch]))
            rows, vectors, updated_at = snapshots.rows_of_batch(batch)
            tables.copy_restored_rows(conn, table, spec, rows, vectors, updated_at, partitioned)
        plan.check_digest(model_key, digest.value)
        rows, table_digest = snapshots.table_digest(conn, table)
        if (rows, table_digest) != (part["rows"], digest.value):
            raise BackupError(f"{table}: {rows} rows restored that do not match the {part['rows']} rows of the backup")
        tables.build_hnsw_in_transaction(conn, table, spec, settings.hnsw_m, settings.hnsw_ef_construction)
        plan.report.vectors[model_key] = rows
    serving = definition["serving_model"]
    if serving in plan.manifest["vectors"]:
        tables.publish_view(conn, plan.target, catalog.vector_table_name(conn, plan.target, serving))
