"""The Python API: declare collections, ingest them through Dagster, search them, read status.

    from vector_platform.api import Platform
    vp = Platform()                      # embedded Postgres + file:// store under ./.vp
    vp.add_collection("docs", "./my_docs")
    vp.ingest("docs")                    # runs the Dagster jobs; the UI shows the runs
    vp.search("how do I ...", ["docs"]).hits
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import dagster as dg
from psycopg import sql

from vector_platform import catalog, db, vector_sql
from vector_platform.defs.partitions import collection_partitions, model_partitions
from vector_platform.models import DEFAULT_MODEL_KEY, ModelSpec
from vector_platform.resources import EmbedderResource, ObjectStoreResource, PostgresResource, default_resources
from vector_platform.search import SearchResult, search
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


@dataclass
class RunSummary:
    job: str
    partition: str
    run_id: str
    success: bool
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    error: str | None = None


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
        with self.pool().connection() as conn:
            catalog.upsert_model(conn, spec)
        self.instance.add_dynamic_partitions(model_partitions.name, [spec.key])

    def add_collection(
        self, name: str, source: str | Path, model: str = DEFAULT_MODEL_KEY, **settings: Any
    ) -> catalog.Collection:
        source_path = Path(source).expanduser()
        if not source_path.exists():
            raise FileNotFoundError(f"source {str(source)!r} does not exist")
        with self.pool().connection() as conn:
            coll = catalog.add_collection(conn, name, str(source_path.resolve()), model, CollectionSettings(**settings))
        self._register_partitions(coll)
        return coll

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

    def _run(self, job_name: str, partition_key: str) -> RunSummary:
        job = self.defs.resolve_job_def(job_name)
        result = job.execute_in_process(
            partition_key=partition_key,
            instance=self.instance,
            raise_on_error=False,
            run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
        )
        summary = RunSummary(job_name, partition_key, result.run_id, result.success)
        for event in result.all_events:
            if event.event_type_value == "ASSET_MATERIALIZATION":
                mat = event.event_specific_data.materialization
                summary.metadata[mat.asset_key.to_user_string()] = {k: v.value for k, v in mat.metadata.items()}
            elif event.event_type_value == "ASSET_CHECK_EVALUATION":
                evaluation = event.event_specific_data
                summary.checks[evaluation.check_name] = evaluation.passed
            elif event.event_type_value == "STEP_FAILURE" and summary.error is None:
                summary.error = _root_cause(event.event_specific_data.error)
        return summary

    def ingest(self, name: str) -> list[RunSummary]:
        """source_documents + chunks, then embeddings..hnsw_index per model, then serving_view.

        Stops at the first failed run (a failed blocking check fails its run).
        """
        coll = self.collection(name)
        self._register_partitions(coll)
        runs = [self._run("ingest_documents_job", name)]
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
            models = [
                r[0]
                for r in conn.execute(
                    "SELECT DISTINCT model_key FROM vector_platform.dead_letters "
                    "WHERE collection = %s AND stage = 'embed' AND resolved_at IS NULL ORDER BY 1",
                    (name,),
                )
            ]
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
        return search(self.pool(), self.embed_query, collections, query=query, vector=vector, k=k, exact=exact, filters=filters)

    def status(self) -> dict[str, Any]:
        store = self.object_store.store()
        out = []
        with self.pool().connection() as conn:
            for coll in catalog.list_collections(conn):
                out.append(_collection_status(conn, coll, store))
            models = catalog.list_model_keys(conn)
        return {
            "collections": out,
            "object_store": {
                "url": store.url,
                "embedding_cache_bytes": {m: store.size(f"embedding_cache/{m}") for m in models},
            },
        }


def _root_cause(error) -> str:
    """The innermost error's message: what went wrong, not Dagster's wrapper around it."""
    while error.cause is not None:
        error = error.cause
    return error.message.strip()


def _collection_status(conn, coll: catalog.Collection, store) -> dict[str, Any]:
    documents, deleted = conn.execute(
        "SELECT count(*) FILTER (WHERE deleted_at IS NULL), count(*) FILTER (WHERE deleted_at IS NOT NULL) "
        "FROM vector_platform.documents WHERE collection = %s",
        (coll.name,),
    ).fetchone()
    chunks, catalog_bytes = conn.execute(
        "SELECT count(*), coalesce(sum(pg_column_size(c.*)), 0) FROM vector_platform.chunks c WHERE collection = %s",
        (coll.name,),
    ).fetchone()
    catalog_bytes += conn.execute(
        "SELECT coalesce(sum(pg_column_size(d.*)), 0) FROM vector_platform.documents d WHERE collection = %s",
        (coll.name,),
    ).fetchone()[0]
    dead = conn.execute(
        "SELECT count(*) FROM vector_platform.dead_letters WHERE collection = %s AND resolved_at IS NULL", (coll.name,)
    ).fetchone()[0]
    tables, vectors, table_bytes = {}, 0, 0
    for model_key in coll.models:
        table = catalog.vector_table_name(conn, coll.name, model_key)
        if vector_sql.table_exists(conn, table):
            rows, size = conn.execute(
                sql.SQL("SELECT count(*), pg_total_relation_size(%s::regclass) FROM {}").format(vector_sql.table_id(table)),
                (f'{catalog.VECTORS}."{table}"',),
            ).fetchone()
            index = vector_sql.current_index(conn, table)
            tables[model_key] = {"table": f"{catalog.VECTORS}.{table}", "rows": rows, "bytes": size, "hnsw_index": index["name"] if index else None}
            table_bytes += size
            if model_key == coll.serving_model:
                vectors = rows
    return {
        "name": coll.name,
        "tier": coll.tier,
        "source": coll.source,
        "serving_model": coll.serving_model,
        "models": list(coll.models),
        "documents": documents,
        "documents_deleted": deleted,
        "chunks": chunks,
        "vectors": vectors,
        "dead_letters": dead,
        "bytes_postgres": int(table_bytes + catalog_bytes),
        "bytes_object_store": store.size(f"collections/{coll.name}"),
        "tables": tables,
        "settings": coll.settings.to_json(),
    }
