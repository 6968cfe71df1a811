"""The Python API: declare collections, ingest them through Dagster, search them, read status.

    from vector_platform.api import Platform
    vp = Platform()                      # embedded Postgres + file:// store under ./.vp
    vp.add_collection("docs", "./my_docs")
    vp.ingest("docs")                    # runs the Dagster jobs; the UI shows the runs
    vp.search("how do I ...", ["docs"]).hits
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import dagster as dg

from vector_platform import catalog, db, runs, tables
from vector_platform.catalog import cache_index
from vector_platform.catalog import documents as docs_sql
from vector_platform.defs.partitions import collection_partitions, model_partitions
from vector_platform.locks import writer_lock
from vector_platform.defs.resources import EmbedderResource, ObjectStoreResource, PostgresResource, default_resources
from vector_platform.models import ModelSpec
from vector_platform.runs import RunSummary
from vector_platform.catalog import tiers as tier_sql
from vector_platform.catalog.tiers import TierRules, check_move
from vector_platform.defs.tiers.jobs import MOVE_JOBS
from vector_platform.object_store import ObjectStore
from vector_platform.search import SearchResult, flush_query_log, search
from vector_platform.settings import CollectionSettings, vp_home

REPO_DAGSTER_YAML = Path(__file__).resolve().parent.parent / "dagster.yaml"


def dagster_instance() -> dg.DagsterInstance:
    """The instance the UI shows: $DAGSTER_HOME, else $VP_HOME/dagster with the repo's dagster.yaml
    (storage in the embedded Postgres). Without that file: Dagster's own SQLite storage there."""
    home = os.environ.get("DAGSTER_HOME")
    if not home:
        home = str(vp_home() / "dagster")
        os.environ["DAGSTER_HOME"] = home
        Path(home).mkdir(parents=True, exist_ok=True)
        if REPO_DAGSTER_YAML.exists():  # kept in step with the repository's copy
            shutil.copyfile(REPO_DAGSTER_YAML, Path(home) / "dagster.yaml")
    prepare_instance_env()
    return dg.DagsterInstance.get()


def prepare_instance_env() -> None:
    """Fill in what dagster.yaml reads from the environment, from the embedded defaults."""
    if "VP_DAGSTER_ARTIFACTS" not in os.environ:
        os.environ["VP_DAGSTER_ARTIFACTS"] = str(vp_home() / "dagster" / "artifacts")
    if "VP_DAGSTER_PG_URL" not in os.environ and not os.environ.get("VP_PG_DSN"):
        os.environ["VP_DAGSTER_PG_URL"] = db.dagster_storage_url(vp_home())


class Platform:
    """One handle on the database, the object store, the embedder and the Dagster instance."""

    def __init__(
        self,
        resources: dict[str, dg.ConfigurableResource] | None = None,
        instance: dg.DagsterInstance | None = None,
    ):
        from vector_platform.definitions import build_definitions

        self.resources = resources or default_resources()
        self.defs = build_definitions(self.resources)
        self._instance = instance
        self._store: ObjectStore | None = None
        # A run submitted to the instance runs the code location's own resources from the
        # environment: only a Platform built on those may submit (tests and notebooks that
        # bind their own resources or instance run in-process).
        self._run_mode: str | None = None if resources is None and instance is None else "in_process"

    @property
    def instance(self) -> dg.DagsterInstance:
        if self._instance is None:
            self._instance = dagster_instance()
        return self._instance

    @property
    def postgres(self) -> PostgresResource:
        return self.resources["postgres"]

    @property
    def embedder(self) -> EmbedderResource:
        return self.resources["embedder"]

    @property
    def object_store(self) -> ObjectStoreResource:
        return self.resources["object_store"]

    def pool(self):
        return self.postgres.pool()

    # ------------------------------------------------------------ catalog

    def add_model(self, spec: ModelSpec) -> None:
        """Register a model version; a key already registered with another fingerprint is refused."""
        with self.pool().connection() as conn:
            catalog.register_model(conn, spec)
        self.instance.add_dynamic_partitions(model_partitions.name, [spec.key])

    def add_collection(
        self, name: str, source: str | Path | None = None, model: str | None = None, **settings: Any
    ) -> catalog.Collection:
        """Declare a collection, or change only what is given of an existing one.

        New collections need a `source`; `model` defaults to the built-in local model.
        """
        source_text = None
        if source is not None:
            source_path = Path(source).expanduser()
            if not source_path.exists():
                raise FileNotFoundError(f"source {str(source)!r} does not exist")
            source_text = str(source_path.resolve())
        # Settings are changed under the writer lock, as by set_settings (a new name locks nothing real).
        lock = writer_lock(self.postgres.resolved_dsn(), name, say=_say) if settings else contextlib.nullcontext()
        with lock, self.pool().connection() as conn:
            coll = catalog.add_collection(conn, name, source_text, model, settings)
        self._register_partitions(coll)
        return coll

    def set_settings(self, name: str, **changes: Any) -> tuple[CollectionSettings, CollectionSettings]:
        """Change some settings of a collection; returns (before, after). Chunking changes re-chunk
        on the next ingest; HNSW changes rebuild the index concurrently on the next ingest."""
        with writer_lock(self.postgres.resolved_dsn(), name, say=_say), self.pool().connection() as conn:
            return catalog.update_settings(conn, name, **changes)

    def _register_partitions(self, coll: catalog.Collection) -> None:
        for definition, keys in ((collection_partitions, [coll.name]), (model_partitions, list(coll.models))):
            known = set(self.instance.get_dynamic_partitions(definition.name))
            new = [k for k in keys if k not in known]
            if new:
                self.instance.add_dynamic_partitions(definition.name, new)

    def collection(self, name: str) -> catalog.Collection:
        with self.pool().connection() as conn:
            return catalog.get_collection(conn, name)

    # ------------------------------------------------------------ runs

    @property
    def run_mode(self) -> str:
        """`in_process` or `instance` (see `vector_platform.runs`), decided once per Platform."""
        if self._run_mode is None:
            self._run_mode = runs.resolve_mode(self.instance)
        return self._run_mode

    def _run(self, job_name: str, partition_key, run_config: dict | None = None) -> RunSummary:
        if self.run_mode == "instance":
            return runs.run_through_instance(self.instance, job_name, partition_key, run_config or {})
        return runs.run_in_process(self.defs, self.instance, job_name, partition_key, run_config or {})

    def ingest(self, name: str, allow_deletes: bool = False) -> list[RunSummary]:
        """source_documents + chunks, then embeddings..hnsw_index per model, then serving_view.

        Stops at the first failed run (a failed blocking check fails its run). A source that
        reads as missing, empty or deleting most documents is refused unless `allow_deletes`.
        """
        coll = self.collection(name)
        if coll.tier != "active":
            raise ValueError(f"collection {name!r} is {coll.tier}: only active collections are ingested"
                             + (" (rehydrate it first: vector-platform tier NAME active)" if coll.tier == "cold" else ""))
        self._register_partitions(coll)
        config = {"ops": {"source_documents": {"config": {"allow_deletes": allow_deletes}}}}
        runs = [self._run("ingest_documents_job", name, config)]
        for model_key in coll.models:
            if not runs[-1].success:
                return runs
            key = dg.MultiPartitionKey({"collection": name, "model": model_key})
            runs.append(self._run("embed_and_index_job", key))
        if runs[-1].success:
            runs.append(self._run("serving_view_job", name))
        return runs

    def replay_dead_letters(self, name: str) -> list[RunSummary]:
        """Run dead_letter_replay_job for each model of `name` with open embedding dead letters."""
        coll = self.collection(name)
        self._register_partitions(coll)
        with self.pool().connection() as conn:
            models = catalog.dead_letters.models_with_open_embed_letters(conn, name)
        runs = [
            self._run("dead_letter_replay_job", dg.MultiPartitionKey({"collection": name, "model": m}))
            for m in models
            if m in coll.models
        ]
        if runs and all(r.success for r in runs):
            runs.append(self._run("serving_view_job", name))
        return runs

    # ------------------------------------------------------------ search and status

    def embed_query(self, spec: ModelSpec, text: str):
        return self.embedder.for_model(spec).embed([text])[0]

    def search(
        self,
        query: str | None = None,
        collections: Sequence[str] = (),
        k: int = 10,
        exact: bool = False,
        vector: Sequence[float] | None = None,
        filters: dict[str, Any] | None = None,
    ) -> SearchResult:
        """Search active collections by HNSW (or exactly), cold ones exactly over their snapshot;
        archived ones are skipped. Every hit says its `source_tier`."""
        return search(
            self.pool(), self.embed_query, collections, query=query, vector=vector, k=k, exact=exact, filters=filters,
            store=self.store(),
        )

    def store(self) -> ObjectStore:
        """The object store (one handle per Platform)."""
        if self._store is None:
            self._store = self.object_store.store()
        return self._store

    # ------------------------------------------------------------ tiers

    def tier(self, name: str, target: str, wait: bool = True, reason: str = "manual") -> RunSummary | str:
        """Move a collection to `target` (active | cold | archived) by running its move job.

        Invalid moves are refused before any run starts. `wait=False` submits the run to the
        instance and returns its id when a dagster-daemon serves the instance; without one the
        run happens here and now (the summary comes back either way)."""
        with self.pool().connection() as conn:
            current = catalog.get_collection(conn, name).tier
        check_move(name, current, target)
        self._register_partitions(self.collection(name))
        job = MOVE_JOBS[target]
        config = {"ops": {job.replace("_job", "_collection"): {"config": {"reason": reason}}}}
        if not wait and self.run_mode == "instance":
            return runs.submit(self.instance, job, name, config)
        return self._run(job, name, config)

    def set_rules(self, name: str, **rules: Any) -> TierRules:
        """Change a collection's tier rules: evict_after_days, archive_after_days (None: off),
        rehydrate_on_query. Unnamed rules stay as they are."""
        with self.pool().connection() as conn:
            return tier_sql.set_rules(conn, name, **rules)

    def status(self) -> dict[str, Any]:
        store = self.store()
        flush_query_log(self.pool())  # this process's searches count in last_queried_at
        out = []
        with self.pool().connection() as conn:
            for coll in catalog.list_collections(conn):
                out.append(_collection_status(conn, coll, store))
            specs = [catalog.get_model(conn, key) for key in catalog.list_model_keys(conn)]
            cache = {s.key: {"fingerprint": s.fingerprint, "vectors": cache_index.count(conn, store.url, s.fingerprint),
                             "bytes": cache_index.total_bytes(conn, store.url, s.fingerprint)} for s in specs}
        return {
            "collections": out,
            "database": self.database_status(),
            "object_store": {"url": store.url, "embedding_cache": cache},
        }

    def database_status(self) -> dict[str, Any]:
        if self.postgres.dsn:
            return {"embedded": False}
        return {"embedded": True, **db.embedded_status(Path(self.postgres.home) if self.postgres.home else vp_home())}


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def _collection_status(conn, coll: catalog.Collection, store) -> dict[str, Any]:
    counts = docs_sql.collection_counts(conn, coll.name)
    dead = catalog.count_open(conn, coll.name)
    table_info, vectors, table_bytes = {}, 0, 0
    for model_key in coll.models:
        table = catalog.vector_table_name(conn, coll.name, model_key)
        if tables.table_exists(conn, table):
            rows, size = tables.table_stats(conn, table)
            index = tables.current_index(conn, table)
            table_info[model_key] = {
                "table": f"{catalog.VECTORS}.{table}",
                "rows": rows,
                "bytes": size,
                "hnsw_index": index["name"] if index else None,
                "fingerprint": catalog.table_fingerprint(conn, coll.name, model_key),
            }
            table_bytes += size
            if model_key == coll.serving_model:
                vectors = rows
    state = tier_sql.tier_states(conn, [coll.name])[0]
    snapshots = [
        {"id": r.id, "model": r.model_key, "rows": r.rows, "bytes": r.bytes, "uri": r.uri, "created_at": r.created_at.isoformat(),
         "serving": r.id in tier_sql.cold_snapshots(conn, coll.name).values()}
        for r in tier_sql.live_snapshots(conn, coll.name)
    ]
    return {
        "name": coll.name,
        **state.as_json(),
        "snapshots": snapshots,
        "tier_events": tier_sql.tier_events(conn, coll.name),
        "source": coll.source,
        "serving_model": coll.serving_model,
        "models": list(coll.models),
        "documents": counts["documents"],
        "documents_deleted": counts["documents_deleted"],
        "chunks": counts["chunks"],
        "vectors": vectors,
        "dead_letters": dead,
        "bytes_postgres": int(table_bytes + counts["catalog_bytes"]),
        "bytes_object_store": store.size(f"collections/{coll.name}"),
        "tables": table_info,
        "settings": coll.settings.to_json(),
    }
