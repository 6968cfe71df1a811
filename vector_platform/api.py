"""The Python API: declare collections, ingest them through Dagster, search them, read status.

    from vector_platform.api import Platform
    vp = Platform()                      # embedded Postgres + file:// store under ./.vp
    vp.add_collection("docs", "./my_docs")
    vp.ingest("docs")                    # runs the Dagster jobs; the UI shows the runs
    vp.search("how do I ...", ["docs"]).hits
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import sys
from pathlib import Path
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import dagster as dg
import psycopg

from vector_platform import backfills, catalog, checks, db, replicas, runs, tables
from vector_platform.archive import rows as archive_rows
from vector_platform.archive.reads import get_document
from vector_platform.catalog import cache_index
from vector_platform.catalog import documents as docs_sql
from vector_platform.defs.partitions import collection_partitions, model_partitions
from vector_platform.locks import writer_lock
from vector_platform.defs.resources import EmbedderResource, ObjectStoreResource, PostgresResource, default_resources
from vector_platform.models import ModelSpec
from vector_platform.names import validate_name
from vector_platform.runs import RunSummary
from vector_platform.catalog import tiers as tier_sql
from vector_platform.catalog import upgrades as upgrade_sql
from vector_platform.defs.ingest.assets import embeddings, hnsw_index, vector_table
from vector_platform.upgrade.swap import SwapRefused, abandon, retire_expired
from vector_platform.catalog.tiers import TierRules, check_move
from vector_platform.defs.tiers.assets import cold_snapshot
from vector_platform.defs.tiers.jobs import MOVE_JOBS
from vector_platform.object_store import ObjectStore
from vector_platform.search import SearchResult, flush_query_log, search
from vector_platform.settings import CollectionSettings, vp_home

if TYPE_CHECKING:
    from vector_platform.backup import BackupInfo
    from vector_platform.backup.drop import DropReport
    from vector_platform.backup.restore import RestoreReport

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


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def _title(full: str, short: str) -> str:
    """A Dagster title (at most 100 characters)."""
    return full if len(full) <= 100 else short[:100]


@dataclass
class UpgradeOutcome:
    to: str
    collections: list[str]
    backfill_id: str | None = None
    status: str | None = None  # the backfill's final status, when waited for
    runs: list[RunSummary] = field(default_factory=list)  # in-process upgrades
    swaps: dict[str, dict] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    not_rehydrated: dict[str, str] = field(default_factory=dict)  # cold, swapped, the asked-for rehydrate failed


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
        self._own_code_location = resources is None and instance is None
        self._run_mode: str | None = None if self._own_code_location else "in_process"

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
        """The owner's pool (VP_PG_DSN): every write, check and move."""
        return self.postgres.pool()

    def read_pool(self):
        """Where reads outside search go (a document, the collection list): the read-only
        role's DSN (VP_PG_READ_DSN) when set, else the owner's pool."""
        return self.postgres.read_pool()

    def create_reader_role(self, name: str = db.READER_ROLE, password_env: str = db.READER_PASSWORD_ENV) -> dict[str, Any]:
        """Create or update the read-only role search runs as (see `db.ensure_reader_role`): a
        login role whose password is read from the environment variable `password_env`, or a
        NOLOGIN role when that is unset. Returns what it granted (never the password)."""
        password = os.environ.get(password_env) or None
        with self.pool().connection() as conn:
            return db.ensure_reader_role(conn, name, password)

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
        validate_name(name)
        with writer_lock(self.postgres.resolved_dsn(), name, say=_say), self.pool().connection() as conn:
            return catalog.update_settings(conn, name, **changes)

    def _register_partitions(self, coll: catalog.Collection) -> None:
        for definition, keys in ((collection_partitions, [coll.name]), (model_partitions, list(coll.models))):
            known = set(self.instance.get_dynamic_partitions(definition.name))
            new = [k for k in keys if k not in known]
            if new:
                self.instance.add_dynamic_partitions(definition.name, new)

    def collection(self, name: str) -> catalog.Collection:
        validate_name(name)
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
            return self._plain(runs.run_through_instance(self.instance, job_name, partition_key, run_config or {}))
        return self._plain(runs.run_in_process(self.defs, self.instance, job_name, partition_key, run_config or {}))

    def _plain(self, run: RunSummary) -> RunSummary:
        """A run that failed because PostgreSQL went away says so, naming the database."""
        if run.error:
            run.error = runs.plain_database_error(run.error, db.describe(self.postgres.resolved_dsn()))
        return run

    def ingest(self, name: str, allow_deletes: bool = False) -> list[RunSummary]:
        """source_documents + chunks, then embeddings..hnsw_index per model, then serving_view.

        Stops when the documents or the serving model's run fails (a failed blocking check fails
        its run); a failing shadow model's run is reported without holding up serving_view. A source that
        reads as missing, empty or deleting most documents is refused unless `allow_deletes`.
        """
        coll = self.collection(name)
        if coll.tier != "active":
            raise ValueError(f"collection {name!r} is {coll.tier}: only active collections are ingested"
                             + (" (rehydrate it first: vector-platform tier NAME active)" if coll.tier == "cold" else ""))
        self._register_partitions(coll)
        config = {"ops": {"source_documents": {"config": {"allow_deletes": allow_deletes}}}}
        runs = [self._run("ingest_documents_job", name, config)]
        if not runs[-1].success:
            return runs
        # Every attached model is written (during an upgrade: the serving model and its shadow,
        # so neither falls behind); the serving model first, so a failing shadow never holds
        # up what serves.
        ordered = sorted(coll.models, key=lambda m: m != coll.serving_model)
        serving_ok = False
        for model_key in ordered:
            key = dg.MultiPartitionKey({"collection": name, "model": model_key})
            runs.append(self._run("embed_and_index_job", key))
            if model_key == coll.serving_model:
                serving_ok = runs[-1].success
                if not serving_ok:
                    return runs
        if serving_ok:
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
        include_archive: bool = False,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        fingerprint: str | None = None,
        consistent: bool = False,
    ) -> SearchResult:
        """Search active collections by HNSW (or exactly), cold ones exactly over their snapshot;
        archived ones are skipped. `include_archive` adds the collections' row archives (aged
        rows on the object store, searched exactly); `since` / `until` keep rows whose source
        timestamp is in [since, until). Every hit says its `source_tier`. With a `vector`, pass
        the `fingerprint` of the model that made it: collections serving another model are
        then refused, not compared.

        With read DSNs (VP_PG_READ_DSN) the search reads one of them, chosen by health and
        replication lag (replicas.py), else the primary; `consistent` reads the primary (a
        search that must see a just-finished ingest). `stats["read_from"]` says which."""
        tried: set[str] = set()
        while True:
            choice = self.postgres.reader(consistent)
            try:
                result = search(
                    self.pool(), self.embed_query, collections, query=query, vector=vector, k=k, exact=exact,
                    filters=filters, store=self.store(), include_archive=include_archive, since=since, until=until,
                    read_dsn=choice.dsn, fingerprint=fingerprint,
                )
            except psycopg.OperationalError as err:
                if choice.dsn is None or choice.dsn in tried:
                    raise
                # the read server went away since its last check: skip it, ask the next one
                tried.add(choice.dsn)
                replicas.router(self.postgres.resolved_dsn(), self.postgres.read_dsns()).mark_down(choice.dsn, err)
                continue
            result.warnings[:0] = choice.warnings
            result.stats["read_from"] = {"server": choice.label, "lag_s": round(choice.lag_s, 3)}
            return result

    def archive_rows(self, name: str) -> RunSummary:
        """One pass of row archival over `name` by its archive_rows_older_than_days rule: runs
        `row_archive_job` (the asset and its archive_reconciles check), as the nightly
        schedule does."""
        coll = self.collection(name)
        self._register_partitions(coll)
        return self._run("row_archive_job", name)

    def get(self, name: str, doc_id: str) -> dict[str, Any] | None:
        """One document by id: from Postgres when it is there (active, cold, or deleted at
        the source), else from the row archive by one ranged read. None when unknown."""
        validate_name(name)
        return get_document(self.read_pool(), self.store(), name, doc_id)

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
        validate_name(name)
        with self.pool().connection() as conn:
            current = catalog.get_collection(conn, name).tier
        check_move(name, current, target)
        self._register_partitions(self.collection(name))
        job = MOVE_JOBS[target]
        config = {"ops": {job.replace("_job", "_collection"): {"config": {"reason": reason}}}}
        if not wait and self.run_mode == "instance":
            return runs.submit(self.instance, job, name, config)
        return self._run(job, name, config)

    # ------------------------------------------------------------ model upgrades

    def upgrade(
        self,
        names: Sequence[str],
        to: str,
        wait: bool = True,
        swap: bool = True,
        rehydrate: bool = False,
        say: Callable[[str], None] = _say,
    ) -> UpgradeOutcome:
        """Upgrade collections to model `to`: attach it, then build and gate the new model's vectors.

        An active collection gets a shadow table (ingest writes both models from now on):
        embeddings -> vector_table -> hnsw_index for the new partition, with their checks and
        the quality gate. A cold one stays cold: `cold_snapshot` embeds the text of its serving
        snapshot with the new model into a second snapshot (the source is never read), gated
        by `snapshot_passes_quality_gate`; `rehydrate` brings it back to active after the swap.

        A Platform on the code location's own resources launches one Dagster asset backfill
        for all of them (the UI's backfills page shows it; a dagster-daemon executes it,
        started for the duration when none runs and `wait`). One bound to other resources
        (tests, notebooks) runs the same jobs here instead. With `wait` and `swap`, each
        collection whose gate passed is swapped to the new model; the others keep serving
        their model, and say why.
        """
        names = [validate_name(n) for n in dict.fromkeys(names)]
        if not names:
            raise ValueError("name at least one collection to upgrade")
        cold: list[str] = []
        with self.pool().connection() as conn:
            catalog.get_model(conn, to)
            for name in names:
                coll = catalog.get_collection(conn, name)
                if coll.tier == "archived":
                    raise ValueError(f"collection {name!r} is archived: it has no vectors to upgrade")
                if coll.serving_model == to:
                    raise ValueError(f"collection {name!r} already serves {to!r}")
                if upgrade_sql.upgrade_state(conn, name).previous_model == to:
                    raise ValueError(f"{to!r} served {name!r} before and is kept for rollback: `models rollback {name}`")
                if coll.tier == "cold":
                    cold.append(name)
        active_names = [n for n in names if n not in cold]
        for name in names:
            with self.pool().connection() as conn:
                catalog.attach_model(conn, name, to)
                upgrade_sql.start_upgrade(conn, name, to, None)  # before any run: the gate measures upgrade targets
            self._register_partitions(self.collection(name))
        outcome = UpgradeOutcome(to=to, collections=names)
        if not self._own_code_location:  # bound to other resources: the daemon's runs could not use them
            for name in names:
                job = "cold_snapshot_job" if name in cold else "embed_and_index_job"
                outcome.runs.append(self._run(job, dg.MultiPartitionKey({"collection": name, "model": to})))
            if wait and swap:
                self._swap_gated(outcome, say)
            if wait and swap and rehydrate:
                self._rehydrate_swapped(outcome, cold, say)
            return outcome
        outcome.backfill_id = backfills.launch(
            self.instance, self.defs,
            [([embeddings.key, vector_table.key, hnsw_index.key], [(n, to) for n in active_names]),
             ([cold_snapshot.key], [(n, to) for n in cold])],
            title=_title(f"upgrade {', '.join(names)} to {to}", f"upgrade {len(names)} collections to {to}"),
            description=f"Model upgrade to {to} of {', '.join(names)}: shadow tables (snapshots for cold collections), "
            "checks and the quality gate.",
            tags={"vector_platform/purpose": "model_upgrade", "vector_platform/upgrade_to": to},
        )
        with self.pool().connection() as conn:
            for name in names:
                upgrade_sql.start_upgrade(conn, name, to, outcome.backfill_id)
        self._follow(outcome, wait, swap, say)
        if wait and swap and rehydrate:
            self._rehydrate_swapped(outcome, cold, say)
        return outcome

    def set_storage(
        self, name: str, storage_type: str, wait: bool = True, swap: bool = True, say: Callable[[str], None] = _say,
    ) -> UpgradeOutcome | None:
        """Store a collection's vectors another way (`vector` | `halfvec` | `binary`; see
        models.STORAGE_TYPES) through the model-upgrade path: the same model under another
        storage is another model version (`<key>_<storage>`, registered here when no model of
        that identity is), built in a shadow table from the embedding cache (nothing is embedded
        again: the cache is keyed by the vectors, not their storage), gated on recall and
        quality, and swapped. None when the collection already stores its vectors that way."""
        from vector_platform.models import STORAGE_TYPES

        if storage_type not in STORAGE_TYPES:
            raise ValueError(f"unknown storage type {storage_type!r}; expected one of {sorted(STORAGE_TYPES)}")
        with self.pool().connection() as conn:
            serving = catalog.get_model(conn, self.collection(name).serving_model)
            if serving.storage_type == storage_type:
                return None
            target = serving.with_storage(storage_type)
            registered = [catalog.get_model(conn, key) for key in catalog.list_model_keys(conn)]
        same = [spec for spec in registered if spec.fingerprint == target.fingerprint]
        if same:
            target = same[0]
        else:
            self.add_model(target)  # a key taken by another identity is refused here, with both named
            say(f"registered model {target.key}: {serving.key} stored as {storage_type}")
        return self.upgrade([name], target.key, wait=wait, swap=swap, say=say)

    def retry_upgrade(self, backfill_id: str, wait: bool = True, swap: bool = True, say: Callable[[str], None] = _say) -> UpgradeOutcome:
        """Re-execute a finished upgrade backfill from failure: only what it did not materialize."""
        parent = self.instance.get_backfill(backfill_id)
        if parent is None:
            raise KeyError(f"no backfill {backfill_id!r} in this instance")
        to = parent.tags.get("vector_platform/upgrade_to")
        with self.pool().connection() as conn:
            names = [r[0] for r in conn.execute(  # those swapped already are done
                "SELECT name FROM vector_platform.collections WHERE upgrade_backfill_id = %s AND serving_model IS DISTINCT FROM %s "
                "ORDER BY name", (backfill_id, to))]
        outcome = UpgradeOutcome(to=to or "", collections=names)
        # A partition whose last step succeeded but whose gate never ran (its run failed on
        # another partition of its range) or could not measure (the new model's API was
        # down) is run again from that step: the step keeps what it built, its check gates it.
        ungated = []
        with self.pool().connection() as conn:
            for name in names:
                latest = upgrade_sql.latest_gate(conn, name, to) if to else None
                if latest is None or not latest.passed or latest.evaluated_at.timestamp() < parent.backfill_timestamp:
                    last = cold_snapshot.key if catalog.get_collection(conn, name).tier == "cold" else hnsw_index.key
                    ungated.append((last, (name, to)))
        outcome.backfill_id = backfills.retry_failed(self.instance, self.defs, backfill_id, also=ungated)
        with self.pool().connection() as conn:
            for name in names:
                upgrade_sql.start_upgrade(conn, name, to, outcome.backfill_id)
        self._follow(outcome, wait, swap and bool(to), say)
        return outcome

    def _follow(self, outcome: "UpgradeOutcome", wait: bool, swap: bool, say) -> None:
        """With `wait`: follow the backfill to its end (a temporary daemon when none runs), then
        swap each collection whose gate passed."""
        if not wait:
            return
        with backfills.ensure_daemon(self.instance, say) as tick:
            outcome.status = backfills.wait(self.instance, outcome.backfill_id, say, tick=tick).value
            if swap:
                self._swap_gated(outcome, say)

    def _rehydrate_swapped(self, outcome: "UpgradeOutcome", cold: list[str], say) -> None:
        for name in cold:
            if name not in outcome.swaps:
                continue
            say(f"{name}: swapped to {outcome.to} while cold; rehydrating it as asked")
            try:
                run = self.tier(name, "active")
                error = None if run.success else run.error
            except (ValueError, RuntimeError) as err:  # refused before any run started
                error = str(err)
            if error:
                outcome.not_rehydrated[name] = error

    def _swap_gated(self, outcome: "UpgradeOutcome", say) -> None:
        # Here and now: a swap is one short transaction under the writer lock; queueing it behind
        # the run queue would only add latency (its run still shows in the UI).
        for name in outcome.collections:
            try:
                outcome.swaps[name] = self._serving_change(name, {"swap_to": outcome.to}, here=True).metadata.get("serving_view", {})
            except SwapRefused as err:
                outcome.refused[name] = str(err)
                say(f"{name}: not swapped: {err}")

    def swap(self, name: str, to: str) -> RunSummary:
        """Serve model `to` (gated: refused unless its latest quality gate passed); runs
        serving_view with `swap_to`. Raises SwapRefused with the gate's numbers."""
        return self._serving_change(name, {"swap_to": to})

    def rollback(self, name: str) -> RunSummary:
        """Serve the previous model again, while its table is retained."""
        return self._serving_change(name, {"rollback": True})

    def abandon_upgrade(self, name: str, model_key: str) -> None:
        """Give up upgrading `name` to `model_key`: drop its shadow table (and stop serving its
        cold snapshot), stop writing it; the attachment stays as history."""
        validate_name(name)
        abandon(self.pool(), self.postgres.resolved_dsn(), name, model_key, say=_say)

    def _serving_change(self, name: str, config: dict, here: bool = False) -> RunSummary:
        self.collection(name)
        run_config = {"ops": {"serving_view": {"config": config}}}
        if here:
            run = self._plain(runs.run_in_process(self.defs, self.instance, "serving_view_job", name, run_config))
        else:
            run = self._run("serving_view_job", name, run_config)
        if not run.success:
            raise SwapRefused(run.error or f"serving_view failed (run {run.run_id})")
        return run

    def set_qrels(self, name: str, path: str | Path, queries: str | Path | None = None) -> tuple[int, int]:
        """Load labelled queries for the upgrade gate's nDCG@10 from BEIR files: a qrels TSV
        (query-id, corpus-id, score; header optional) and queries.jsonl ({"_id", "text"}), or a
        BEIR dataset folder holding both. Replaces the collection's previous ones."""
        from vector_platform.upgrade.qrels import read_beir

        self.collection(name)
        query_texts, judgements = read_beir(Path(path), Path(queries) if queries else None)
        with self.pool().connection() as conn:
            return upgrade_sql.replace_qrels(conn, name, query_texts, judgements)

    def maintain(self) -> RunSummary:
        """VACUUM (ANALYZE) every vector table with its health check, then the storage overview
        (maintenance_job; maintenance_schedule runs it nightly)."""
        return self._run("maintenance_job", None)

    def check_recall(self, name: str) -> RunSummary:
        """The recall check of the collection's serving index on a sample of its logged queries
        (recall_monitoring_job; recall_monitoring_schedule runs it weekly)."""
        coll = self.collection(name)
        if coll.tier != "active" or not coll.serving_model:
            raise ValueError(f"{name} is {coll.tier}: only an active collection's index has a recall to measure")
        from vector_platform.defs.operations.jobs import RECALL_CHECK

        self._register_partitions(coll)
        key = dg.MultiPartitionKey({"collection": name, "model": coll.serving_model})
        # in this process whatever the run mode (`dagster job launch` cannot select a check alone);
        # a read-only measurement, recorded in the instance like any run
        return self._plain(runs.run_in_process(self.defs, self.instance, "recall_monitoring_job", key, {}, checks_only={RECALL_CHECK}))

    def retire_previous_models(self) -> list[tuple[str, str]]:
        """Drop previous models' tables whose retention (retain_previous_days) has run out."""
        return retire_expired(self.pool(), self.postgres.resolved_dsn(), say=_say)

    def set_rules(self, name: str, **rules: Any) -> TierRules:
        """Change a collection's tier rules: evict_after_days, archive_after_days (None: off),
        rehydrate_on_query. Unnamed rules stay as they are."""
        validate_name(name)
        with self.pool().connection() as conn:
            return tier_sql.set_rules(conn, name, **rules)

    def status(self) -> dict[str, Any]:
        store = self.store()
        flush_query_log(self.pool())  # this process's searches count in last_queried_at
        out = []
        with self.pool().connection() as conn:
            for coll in catalog.list_collections(conn):
                out.append(collection_status(conn, coll, store))
            specs = [catalog.get_model(conn, key) for key in catalog.list_model_keys(conn)]
            cache_url = self.object_store.cache_store().url
            cache = {s.key: {"fingerprint": s.cache_fingerprint, "vectors": cache_index.count(conn, cache_url, s.cache_fingerprint),
                             "bytes": cache_index.total_bytes(conn, cache_url, s.cache_fingerprint)} for s in specs}
        return {
            "collections": out,
            "database": self.database_status(),
            "object_store": {"url": store.url, "embedding_cache_url": cache_url, "embedding_cache": cache},
        }

    # ------------------------------------------------------------ backups

    def backup(self, name: str, to: str | None = None) -> "BackupInfo":
        """Write a verified backup of `name` to `to` (default $VP_BACKUP_URL, else
        file://$VP_HOME/backups), a location other than the primary object store. Holds the
        writer lock while it reads (searches go on). Returns what the manifest says."""
        validate_name(name)
        from vector_platform.backup import open_location
        from vector_platform.backup.write import backup_collection

        location = open_location(to, self.store())
        return backup_collection(self.pool(), self.postgres.resolved_dsn(), self.store(), location, name, say=_say)

    def backups(self, name: str, location: str | None = None) -> list["BackupInfo"]:
        """The complete backups of `name` at `location` (default as for `backup`), newest first."""
        validate_name(name)
        from vector_platform.backup import default_location_url, list_backups

        url = location or default_location_url()
        if url.startswith("file://") and not Path(url[len("file://"):]).is_dir():
            return []
        return list_backups(ObjectStore.from_url(url), name)

    def restore(self, name: str, source: str | None = None, as_name: str | None = None) -> "RestoreReport":
        """Restore collection `name` from `source`: a backup's folder, or a location (its newest
        backup of `name`; default as for `backup`), under its own name or `as_name`. Every
        checksum is verified before anything is written; nothing is embedded. Refused when the
        target exists or a model key is registered here with another fingerprint."""
        validate_name(name)
        if as_name is not None:
            validate_name(as_name)
        from vector_platform.backup import find_backup
        from vector_platform.backup.restore import restore_collection

        backup_store, info = find_backup(source, name)
        report = restore_collection(self.pool(), self.postgres.resolved_dsn(), self.store(), backup_store, info, as_name, say=_say)
        coll = self.collection(report.collection)
        self._register_partitions(coll)
        return report

    def drop_collection(self, name: str, force: bool = False, backups: str | None = None) -> "DropReport":
        """Drop a collection: catalog rows, vector tables, serving view, its files on the object
        store and its Dagster partition. Refused unless a complete backup at `backups` (default as
        for `backup`) holds its current state and reads back intact; `force` drops without one."""
        validate_name(name)
        from vector_platform.backup import open_location
        from vector_platform.backup.drop import drop_collection

        location = None if force else open_location(backups, self.store())
        report = drop_collection(self.pool(), self.postgres.resolved_dsn(), self.store(), location, name, force, say=_say)
        if name in self.instance.get_dynamic_partitions(collection_partitions.name):
            self.instance.delete_dynamic_partition(collection_partitions.name, name)
        return report

    def database_status(self) -> dict[str, Any]:
        if self.postgres.dsn:
            return {"embedded": False}
        return {"embedded": True, **db.embedded_status(Path(self.postgres.home) if self.postgres.home else vp_home())}


def monthly_cost(postgres_bytes: int, store_bytes: int) -> dict[str, Any]:
    """A monthly storage estimate at $/GB-month rates (VP_COST_POSTGRES_GB_MONTH, default 0.12, a
    provisioned SSD volume; VP_COST_OBJECT_STORE_GB_MONTH, default 0.023, S3 Standard)."""
    pg_rate = float(os.environ.get("VP_COST_POSTGRES_GB_MONTH", "0.12"))
    store_rate = float(os.environ.get("VP_COST_OBJECT_STORE_GB_MONTH", "0.023"))
    pg_gb, store_gb = postgres_bytes / 1e9, store_bytes / 1e9
    return {
        "postgres_gb": round(pg_gb, 6), "object_store_gb": round(store_gb, 6),
        "usd_per_gb_month": {"postgres": pg_rate, "object_store": store_rate},
        "usd_per_month": round(pg_gb * pg_rate + store_gb * store_rate, 6),
    }


def collection_status(conn, coll: catalog.Collection, store) -> dict[str, Any]:
    counts = docs_sql.collection_counts(conn, coll.name)
    archived = archive_rows.archive_summary(conn, coll.name, jobs=3)
    dead = catalog.count_open(conn, coll.name)
    table_info, vectors, table_bytes = {}, 0, 0
    for model_key in coll.models:
        table = catalog.vector_table_name(conn, coll.name, model_key)
        if tables.table_exists(conn, table):
            rows, size = tables.table_stats(conn, table)
            index = tables.current_index(conn, table)
            recall = checks.recall_history(conn, coll.name, model_key, limit=1)
            table_info[model_key] = {
                "table": f"{catalog.VECTORS}.{table}",
                "rows": rows,
                "bytes": size,
                "storage_type": catalog.get_model(conn, model_key).storage_type,
                **{k: v for k, v in tables.bytes_per_vector(conn, table, rows).items() if k != "rows"},
                # the index's latest recall@10 against exact search (index_recall_meets_target)
                "recall": {"recall": recall[0]["recall"], "ef_search": recall[0]["ef_search"],
                           "measured_at": recall[0]["measured_at"].isoformat()} if recall else None,
                "hnsw_index": index["name"] if index else None,
                "fingerprint": catalog.table_fingerprint(conn, coll.name, model_key),
                # month-partitioned (a row-archival rule when the table was made) or one table
                "partitions": len(tables.partitions(conn, table)) if tables.is_partitioned(conn, table) else None,
            }
            table_bytes += size
            if model_key == coll.serving_model:
                vectors = rows
    state = tier_sql.tier_states(conn, [coll.name])[0]
    upgrade = upgrade_sql.upgrade_state(conn, coll.name)
    gates = {}
    for model_key in coll.models:
        gate = upgrade_sql.latest_gate(conn, coll.name, model_key)
        if gate is not None:
            gates[model_key] = {"id": gate.id, "passed": gate.passed, "reasons": gate.reasons, "figures": gate.figures,
                                "evaluated_at": gate.evaluated_at.isoformat()}
    serving_snapshots = set(tier_sql.cold_snapshots(conn, coll.name).values())
    snapshots = [
        {"id": r.id, "model": r.model_key, "rows": r.rows, "bytes": r.bytes, "uri": r.uri, "created_at": r.created_at.isoformat(),
         "serving": r.id in serving_snapshots, **_snapshot_layout(r, coll.settings.cold_nprobe)}
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
        "upgrade": {
            "to": upgrade.upgrade_to, "backfill_id": upgrade.upgrade_backfill_id, "previous_model": upgrade.previous_model,
            "previous_retained_until": upgrade.previous_retain_until.isoformat() if upgrade.previous_retain_until else None,
            "gates": gates, "swaps": upgrade_sql.swaps(conn, coll.name),
        },
        "documents": counts["documents"],
        "documents_deleted": counts["documents_deleted"],
        "chunks": counts["chunks"],
        "vectors": vectors,
        "dead_letters": dead,
        "bytes_postgres": int(table_bytes + counts["catalog_bytes"]),
        "bytes_object_store": store.size(f"collections/{coll.name}") + archived["bytes"],
        "archive": archived,
        "cost": monthly_cost(table_bytes + counts["catalog_bytes"], store.size(f"collections/{coll.name}") + archived["bytes"]),
        "tables": table_info,
        "settings": coll.settings.to_json(),
    }


def _snapshot_layout(receipt, cold_nprobe: int) -> dict[str, Any]:
    """How a cold search reads the snapshot: every row (flat), or the `nprobe` nearest of its
    IVF lists (tiers/ivf.py)."""
    if receipt.manifest.get("layout") != "ivf":
        return {"layout": "flat"}
    from vector_platform.tiers import ivf

    lists = receipt.manifest["ivf"]["lists"]
    return {"layout": "ivf", "lists": lists, "nprobe": min(lists, cold_nprobe or ivf.default_nprobe(lists)),
            "nprobe_setting": cold_nprobe}
