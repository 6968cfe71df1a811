"""Backups of collections on a second object store, their listing, restore, and dropping a
collection (which wants a backup of its current state first).

A backup is a folder `<location>/<collection>/<stamp>-<id>/` holding Parquet files and, written
last, `manifest.json` (see `locations` for the layout, `write` for what goes in and in which
order, `restore` for the way back, `drop` for the gate before destroying anything). The
location is `$VP_BACKUP_URL`, else `file://$VP_HOME/backups`; never the primary object store.
"""

from vector_platform.backup.locations import (
    BackupCorrupt,
    BackupError,
    BackupInfo,
    default_location_url,
    find_backup,
    list_backups,
    open_location,
)

__all__ = [
    "BackupCorrupt", "BackupError", "BackupInfo", "default_location_url", "find_backup", "list_backups", "open_location",
]
