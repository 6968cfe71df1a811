"""Dagster resources: `postgres`, `object_store`, `embedder`. Each is bound once, in definitions.py.

Each hands out a plain object (a connection pool, an `ObjectStore`, an `Embedder`) that the
packages outside `defs/` use without knowing about Dagster."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Optional

import dagster as dg
from psycopg_pool import ConnectionPool
from pydantic import Field

from vector_platform import catalog, db, replicas
from vector_platform.ingest.embedders import Embedder, make_embedder
from vector_platform.models import ModelSpec
from vector_platform.object_store import ObjectStore
from vector_platform.settings import default_object_store_url, read_dsns, vp_home


_bootstrapped: set[str] = set()


class PostgresResource(dg.ConfigurableResource):
    """The PostgreSQL + pgvector database that holds the catalog and the vector tables."""

    dsn: Optional[str] = Field(
        default=None,
        description="PostgreSQL DSN (a secret: bind it with EnvVar('VP_PG_DSN')). "
        "Unset: the embedded PostgreSQL 18 + pgvector server under `home`/pg, started on demand.",
    )
    read_dsn: Optional[str] = Field(
        default=None,
        description="DSNs search reads through, separated by `;`: streaming replicas and/or the read-only role "
        "(`vector-platform db reader-role`) on the primary (a secret: bind it with EnvVar('VP_PG_READ_DSN')). "
        "Unset: search reads through `dsn`. Writes, checks and moves never use them.",
    )
    max_replica_lag_s: float = Field(
        default=5.0,
        description="A replica further behind the primary than this is skipped (with a warning) until it catches up.",
    )
    home: Optional[str] = Field(default=None, description="Folder for embedded defaults (default $VP_HOME or ./.vp).")
    pool_size: int = Field(default=4, description="Connections per process.")
    wait_for_connection_s: float = Field(
        default=30.0,
        description="How long a step waits for a database connection (the server restarting, a failover) before it "
        "fails saying the database is unreachable.",
    )

    def resolved_dsn(self) -> str:
        # Inside a run Dagster resolves EnvVar fields; the Python API and CLI call us directly.
        dsn = self.dsn.get_value() if isinstance(self.dsn, dg.EnvVar) else self.dsn
        return dsn or db.embedded_dsn(Path(self.home) if self.home else vp_home())

    def read_dsns(self) -> list[str]:
        """The DSNs search reads through ([]: the owner's DSN). One for now (see settings.read_dsns)."""
        value = self.read_dsn.get_value() if isinstance(self.read_dsn, dg.EnvVar) else self.read_dsn
        return read_dsns(value or "")

    def reader(self, consistent: bool = False) -> "replicas.Choice":
        """Where a search reads now (see replicas.py): a healthy read DSN within
        max_replica_lag_s, else the primary (`dsn` None); `consistent`: the primary."""
        return replicas.router(self.resolved_dsn(), self.read_dsns()).choose(self.max_replica_lag_s, consistent)

    def read_pool(self) -> ConnectionPool:
        """The pool for reads outside search (documents, the collection list, health, metrics):
        on a read DSN chosen as search chooses one, else the owner's pool."""
        choice = self.reader() if self.read_dsns() else None
        return db.get_read_pool(choice.dsn, self.pool_size) if choice and choice.dsn else self.pool()

    def pool(self) -> ConnectionPool:
        dsn = self.resolved_dsn()
        pool = db.get_pool(dsn, self.pool_size, self.wait_for_connection_s)
        if dsn not in _bootstrapped:  # once per process: the hot path (search) borrows nothing here
            with pool.connection() as conn:
                catalog.bootstrap(conn)
            _bootstrapped.add(dsn)
        return pool


class ObjectStoreResource(dg.ConfigurableResource):
    """Where the embedding cache (and later snapshots and archives) live: file:// or s3://."""

    url: Optional[str] = Field(default=None, description="file:///path or s3://bucket/prefix (default $VP_OBJECT_STORE or file://$VP_HOME/objects).")
    endpoint_url: Optional[str] = Field(default=None, description="S3-compatible endpoint (default $AWS_ENDPOINT_URL).")
    embedding_cache_url: Optional[str] = Field(
        default=None,
        description="Where the embedding cache lives when not beside the snapshots (default $VP_EMBEDDING_CACHE, else "
        "`url`): e.g. a bucket in the workers' region. Keyed by model fingerprint, so caches never disagree.",
    )

    def store(self) -> ObjectStore:
        return ObjectStore.from_url(self.url or default_object_store_url(), self.endpoint_url)

    def cache_store(self) -> ObjectStore:
        """The embedding cache's store: `embedding_cache_url` / VP_EMBEDDING_CACHE, else `store()`."""
        url = self.embedding_cache_url or os.environ.get("VP_EMBEDDING_CACHE")
        return ObjectStore.from_url(url, self.endpoint_url) if url else self.store()


_embedders: dict[tuple, Embedder] = {}
_embedders_lock = threading.Lock()


class EmbedderResource(dg.ConfigurableResource):
    """Hands out the embedder for a model spec (the local model by default), once per process."""

    device: str = Field(default="cpu", description="torch device for local models.")
    batch_size: int = Field(default=64, description="Texts per local-model call (and per cache file).")
    openai_api_key: Optional[str] = Field(
        default=None,
        description="Key for OpenAI-compatible models (a secret: bind it with EnvVar('OPENAI_API_KEY')); "
        "a model can name another variable with options.api_key_env.",
    )

    def for_model(self, spec: ModelSpec) -> Embedder:
        key = (spec.key, spec.model_name, tuple(sorted(map(str, spec.options.items()))), self.device)
        with _embedders_lock:
            if key not in _embedders:
                api_key = self.openai_api_key
                if isinstance(api_key, dg.EnvVar):
                    api_key = api_key.get_value()
                _embedders[key] = make_embedder(spec, device=self.device, api_key=api_key)
            return _embedders[key]



def default_resources() -> dict[str, dg.ConfigurableResource]:
    dsn = dg.EnvVar("VP_PG_DSN") if os.environ.get("VP_PG_DSN") else None
    read_dsn = dg.EnvVar("VP_PG_READ_DSN") if os.environ.get("VP_PG_READ_DSN") else None
    return {
        "postgres": PostgresResource(dsn=dsn, read_dsn=read_dsn),
        "object_store": ObjectStoreResource(),
        "embedder": EmbedderResource(
            openai_api_key=dg.EnvVar("OPENAI_API_KEY") if os.environ.get("OPENAI_API_KEY") else None
        ),
    }
