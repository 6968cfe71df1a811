"""Dropping a collection: its catalog rows, vector tables and serving view, then its files on
the object store (cold snapshots, row archive).

It destroys data, so it is refused unless a complete backup holds the collection's current
state: the newest backup whose state digest equals the collection's now (computed under the
writer lock, so nothing changes in between), and whose every file still reads back with its
sha256. A collection with a row archive is refused too, since backups do not hold the row
archive. `force` drops without a backup.

Order: one transaction drops the view and tables and deletes the catalog rows, recording the
drop (`dropped_collections`, with the backup that holds its state); then the files go, and
the drop is marked done. A drop killed between the two is finished by the next `drop` or
`restore` of the name (the files of a collection that no longer exists are not read by anything).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from psycopg_pool import ConnectionPool

from vector_platform import catalog, faults, tables
from vector_platform.backup.locations import BackupCorrupt, BackupError, BackupInfo, folder, list_backups
from vector_platform.backup.verify import collection_state, state_differences, verify_in_place
from vector_platform.catalog import backups as backup_sql
from vector_platform.catalog import tiers as tier_sql
from vector_platform.locks import writer_lock
from vector_platform.names import validate_name
from vector_platform.object_store import ObjectStore


class DropRefused(BackupError):
    """A drop refused for want of a backup of the current state: nothing was dropped."""


@dataclass
class DropReport:
    collection: str
    backup_id: str | None
    backup_uri: str | None
    forced: bool
    tables: list[str] = field(default_factory=list)
    files_deleted: int = 0
    finished_earlier_drop: bool = False  # only the files of a drop that stopped after its commit were left

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def drop_collection(
    pool: ConnectionPool,
    dsn: str,
    primary: ObjectStore,
    location: ObjectStore | None,
    name: str,
    force: bool = False,
    say: Callable[[str], None] = lambda _: None,
) -> DropReport:
    """Drop `name` (see the module's docstring). `location` holds its backups (unused with `force`)."""
    validate_name(name)
    with writer_lock(dsn, name, say=say):
        with pool.connection() as conn:
            exists = catalog.get_collection(conn, name, missing_ok=True) is not None
        if not exists:
            with pool.connection() as conn:
                pending = backup_sql.drops_with_files_left(conn, name)
            if not pending:
                raise KeyError(f"unknown collection {name!r}")
            report = DropReport(name, None, None, force, finished_earlier_drop=True)
            report.files_deleted = finish_earlier_drops(pool, primary, name, say)
            return report
        backup = None
        if not force:
            if location is None:
                raise DropRefused(f"dropping {name!r} needs its backup location (or force)")
            backup = require_backup(pool, location, name)
        report = DropReport(name, backup.id if backup else None, backup.uri if backup else None, force)
        with pool.connection() as conn, conn.transaction():
            tier_sql.lock_collection_row(conn, name)
            tables.drop_view(conn, name)
            for table in backup_sql.relations_of(conn, name):
                tables.drop_table(conn, table)
                report.tables.append(table)
            backup_sql.delete_collection(conn, name)
            drop_id = backup_sql.record_drop(conn, name, report.backup_uri, force, {"tables": report.tables})
        say(f"{name}: catalog rows, tables and view dropped" + (f" (backup {backup.id} holds them)" if backup else " (forced)"))
        faults.point("drop.after_catalog")
        report.files_deleted = _remove_files(pool, primary, name, [drop_id])
    say(f"{name}: dropped; {report.files_deleted} files deleted from the object store")
    return report


def require_backup(pool: ConnectionPool, location: ObjectStore, name: str) -> BackupInfo:
    """The backup that holds `name`'s current state, read back in full; DropRefused otherwise.
    The caller holds the collection's writer lock."""
    backups = list_backups(location, name)
    if not backups:
        raise DropRefused(
            f"no backup of {name!r} at {location.url}: nothing dropped. Back it up first (vector-platform backup {name}), "
            "or drop it without one with --force"
        )
    with pool.connection() as conn:
        state = collection_state(conn, name)
        archive = backup_sql.row_archive_counts(conn, name)
    if archive["documents"] or archive["files"]:
        raise DropRefused(
            f"{name!r} has a row archive ({archive['documents']} documents in {archive['files']} files) and backups do not "
            "hold the row archive: dropping would lose it. Nothing dropped (--force drops it anyway)"
        )
    match = next((b for b in backups if b.manifest["state"] == state), None)
    if match is None:
        newest = backups[0]
        changed = state_differences(newest.manifest["state"], state)
        raise DropRefused(
            f"the newest backup of {name!r} ({newest.id}) does not hold its current state ({', '.join(changed)} changed "
            f"since): nothing dropped. Back it up again (vector-platform backup {name}), or --force"
        )
    try:
        verify_in_place(folder(location, f"{name}/{match.id}"), match.manifest)
    except BackupCorrupt as err:
        raise DropRefused(f"backup {match.id} of {name!r} no longer reads back as written ({err}); nothing dropped") from None
    return match


def finish_earlier_drops(pool: ConnectionPool, primary: ObjectStore, name: str, say: Callable[[str], None] = lambda _: None) -> int:
    """Delete the files of earlier drops of `name` that stopped after their commit; returns
    how many files went. The caller holds the name's writer lock, and `name` does not exist."""
    with pool.connection() as conn:
        pending = backup_sql.drops_with_files_left(conn, name)
    if not pending:
        return 0
    removed = _remove_files(pool, primary, name, pending)
    say(f"{name}: finished an earlier drop ({removed} files left on the object store deleted)")
    return removed


def _remove_files(pool: ConnectionPool, primary: ObjectStore, name: str, drop_ids: list[int]) -> int:
    """The collection's files on the primary store (cold snapshots, row archive), then the
    drops are marked done."""
    removed = 0
    for prefix in (f"collections/{name}", f"archive/{name}"):
        for key in primary.list(prefix):
            primary.delete(key, missing_ok=True)
            removed += 1
    with pool.connection() as conn:
        backup_sql.mark_files_removed(conn, drop_ids)
    return removed
