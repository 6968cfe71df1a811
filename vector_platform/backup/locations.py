"""Where backups live, how one is found, and what one says about itself.

Layout of one backup (keys relative to its folder `<location>/<collection>/<stamp>-<id>/`):

    documents/part-00000.parquet ...   the catalog's documents (bodies, hashes, chunked_hash)
    chunks/part-00000.parquet ...      the catalog's chunks (so a later ingest stays incremental)
    dead_letters/ labelled_queries/ qrels/
    vectors/<model>/part-00000.parquet the vector rows, in the cold-snapshot format
    manifest.json                      written last: the definition, every file's sha256,
                                       bytes and rows, the fingerprints, the state digest

A folder without `manifest.json` is an unfinished backup: it is never listed nor restored.
Backups are listed from the location itself, not from the catalog, so they outlive the
database they were taken from.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from vector_platform.object_store import ObjectStore
from vector_platform.settings import vp_home

FORMAT = "vector_platform.backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class BackupError(RuntimeError):
    """A backup could not be written, found or used as asked (nothing was changed)."""


class BackupCorrupt(BackupError):
    """A backup's bytes differ from its manifest: it is not restored, nor trusted by a drop."""


def default_location_url() -> str:
    return os.environ.get("VP_BACKUP_URL") or (vp_home() / "backups").as_uri()


def _root(url: str) -> tuple[str, str]:
    """(scheme, path) of a store URL, symlinks resolved for file://, to compare two locations."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return "file", os.path.realpath(parsed.path or "/").rstrip("/") or "/"
    return parsed.scheme, f"{parsed.netloc}{parsed.path}".rstrip("/")


def _overlaps(a: str, b: str) -> bool:
    (scheme_a, path_a), (scheme_b, path_b) = _root(a), _root(b)
    if scheme_a != scheme_b:
        return False
    return path_a == path_b or path_a.startswith(path_b.rstrip("/") + "/") or path_b.startswith(path_a.rstrip("/") + "/")


def open_location(url: str | None, primary: ObjectStore) -> ObjectStore:
    """The backup location at `url` (default: `default_location_url()`). Refused when it is,
    contains or lies inside the primary object store: a backup there is not a second copy."""
    url = url or default_location_url()
    if _overlaps(url, primary.url):
        raise BackupError(
            f"backup location {url} overlaps the primary object store {primary.url}: a backup there is not a second "
            "copy. Give another bucket or folder (--to, or VP_BACKUP_URL)"
        )
    return ObjectStore.from_url(url)


def folder(location: ObjectStore, key: str) -> ObjectStore:
    """A store rooted at one folder of `location` (a backup's keys are relative to its folder,
    so a backup copied elsewhere still reads)."""
    return ObjectStore(location.fs, location.path(key), location.uri(key))


@dataclass(frozen=True)
class BackupInfo:
    """One complete backup, as its manifest describes it."""

    id: str
    collection: str
    uri: str  # the backup's folder
    created_at: dt.datetime
    tier: str
    rows: dict[str, int]  # model -> vector rows
    documents: int
    chunks: int
    bytes: int
    files: int
    row_archive: dict[str, Any]
    manifest: dict[str, Any]

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], uri: str) -> "BackupInfo":
        return cls(
            manifest["id"], manifest["collection"], uri, dt.datetime.fromisoformat(manifest["created_at"]),
            manifest["tier"], {m: v["rows"] for m, v in manifest["vectors"].items()},
            manifest["rows"]["documents"]["rows"], manifest["rows"]["chunks"]["rows"], manifest["bytes"],
            len(all_files(manifest)), manifest["row_archive"], manifest,
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "collection": self.collection, "uri": self.uri, "created_at": self.created_at.isoformat(),
            "tier": self.tier, "vector_rows": self.rows, "documents": self.documents, "chunks": self.chunks,
            "bytes": self.bytes, "files": self.files, "row_archive": self.row_archive,
            "models": {m["key"]: m["fingerprint"] for m in self.manifest["definition"]["models"]},
        }


def all_files(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every data file a manifest names: {key, sha256, bytes, rows}."""
    files = [f for part in manifest["rows"].values() for f in part["files"]]
    return files + [f for part in manifest["vectors"].values() for f in part["files"]]


def read_manifest(store: ObjectStore) -> dict[str, Any] | None:
    """The manifest at the root of `store` (a backup's folder); None when there is none."""
    try:
        text = store.get_bytes(MANIFEST)
    except FileNotFoundError:
        return None
    try:
        manifest = json.loads(text)
    except ValueError as err:
        raise BackupCorrupt(f"{store.uri(MANIFEST)} is not JSON ({err})") from None
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{store.uri(MANIFEST)} is not a vector_platform backup manifest")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise BackupError(f"{store.uri(MANIFEST)} has format version {manifest['format_version']}, newer than this "
                          f"release reads ({FORMAT_VERSION}): upgrade vector_platform")
    return manifest


def _subfolders(location: ObjectStore, key: str) -> list[str]:
    selector = pafs.FileSelector(location.path(key), recursive=False, allow_not_found=True)
    return sorted(i.base_name for i in location.fs.get_file_info(selector) if i.type == pafs.FileType.Directory)


def list_backups(location: ObjectStore, collection: str) -> list[BackupInfo]:
    """The complete backups of `collection` at `location`, newest first."""
    found = []
    for name in _subfolders(location, collection):
        store = folder(location, f"{collection}/{name}")
        manifest = read_manifest(store)
        if manifest is not None and manifest["collection"] == collection:
            found.append(BackupInfo.from_manifest(manifest, store.url))
    return sorted(found, key=lambda b: (b.created_at, b.id), reverse=True)


def find_backup(url: str | None, collection: str, primary: ObjectStore | None = None) -> tuple[ObjectStore, BackupInfo]:
    """The backup `url` names: a backup's folder (it holds a manifest.json), or a location
    (then the newest complete backup of `collection` there). Default: the default location."""
    url = url or default_location_url()
    parsed = urlparse(url)
    if parsed.scheme == "file" and not os.path.isdir(parsed.path):
        raise BackupError(f"no backup at {url}: the folder does not exist")
    store = ObjectStore.from_url(url)
    manifest = read_manifest(store)
    if manifest is not None:
        if manifest["collection"] != collection:
            raise BackupError(f"{url} is a backup of collection {manifest['collection']!r}, not {collection!r}")
        return store, BackupInfo.from_manifest(manifest, store.url)
    backups = list_backups(store, collection)
    if not backups:
        raise BackupError(f"no complete backup of {collection!r} at {url} (a backup counts once its manifest.json is written)")
    newest = backups[0]
    return folder(store, f"{collection}/{newest.id}"), newest


__all__ = [
    "BackupCorrupt", "BackupError", "BackupInfo", "FORMAT", "FORMAT_VERSION", "MANIFEST", "all_files", "default_location_url",
    "find_backup", "folder", "list_backups", "open_location", "read_manifest",
]
