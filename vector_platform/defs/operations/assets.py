"""Operations assets (group "operations"), refreshed by maintenance_schedule:

- `table_maintenance`: VACUUM (ANALYZE) of every vector table with its health figures, and the
  check `vector_tables_healthy` (logic: `vector_platform.maintenance`); also deletes audit rows
  past their retention.
- `storage_overview`: per collection, tier, rows, bytes in Postgres and on the object store and a
  monthly cost estimate, drawn as tables (logic: `vector_platform.overview`).
"""

import dagster as dg

from vector_platform import audit, maintenance, overview
from vector_platform.defs.archive.assets import row_archive
from vector_platform.defs.ingest.assets import hnsw_index, vector_table
from vector_platform.defs.resources import ObjectStoreResource, PostgresResource
from vector_platform.defs.tiers.assets import cold_snapshot

HEALTH_CHECK = "vector_tables_healthy"


@dg.asset(
    deps=[hnsw_index],
    group_name="operations",
    kinds={"postgres"},
    check_specs=[dg.AssetCheckSpec(HEALTH_CHECK, asset="table_maintenance", description=(
        "No vector table had more dead tuples before VACUUM than VP_MAX_DEAD_TUPLE_RATIO (autovacuum falls behind), "
        "none is left with more free space than VP_MAX_FREE_SPACE_RATIO after it (bloat), no index is invalid."))],
)
def table_maintenance(context: dg.AssetExecutionContext, postgres: PostgresResource):
    """VACUUM (ANALYZE) of every vector table (each partition of a partitioned one): dead tuples
    before and after, free space after (pgstattuple), table, TOAST and index sizes, invalid
    indexes. Searches and ingest go on meanwhile (VACUUM takes no lock that blocks them).
    Audit rows older than VP_AUDIT_RETENTION_DAYS are deleted."""
    pool = postgres.pool()
    report = maintenance.maintain(pool)
    limits = maintenance.Thresholds.from_env()
    problems = [p for health in report for p in maintenance.judge(health, limits)]
    with pool.connection() as conn:
        purged = audit.purge(conn)
    for problem in problems:
        context.log.warning(problem)
    yield dg.MaterializeResult(metadata={
        "tables": len(report),
        "dead_tuples_before": sum(h.dead_tuples_before for h in report),
        "dead_tuples_after": sum(h.dead_tuples_after for h in report),
        "bytes_tables": sum(h.table_bytes + h.toast_bytes for h in report),
        "bytes_indexes": sum(h.index_bytes for h in report),
        "vacuum_seconds": round(sum(h.vacuum_seconds for h in report), 3),
        "audit_rows_purged": purged,
        "health": dg.MetadataValue.md(maintenance.markdown(report) if report else "no vector tables"),
    })
    yield dg.AssetCheckResult(
        check_name=HEALTH_CHECK,
        passed=not problems,
        metadata={
            "problems": dg.MetadataValue.md("\n".join(f"- {p}" for p in problems) or "none"),
            "max_dead_tuple_ratio": limits.max_dead_tuple_ratio,
            "max_free_space_ratio": limits.max_free_space_ratio,
            "min_bytes_judged": limits.min_bytes,
            "worst_dead_ratio_before": max((round(h.dead_ratio_before, 4) for h in report), default=0.0),
            "worst_free_space_ratio": max((h.free_space_ratio or 0.0 for h in report), default=0.0),
        },
    )


@dg.asset(
    deps=[vector_table, cold_snapshot, row_archive],
    group_name="operations",
    kinds={"postgres", "s3"},
)
def storage_overview(postgres: PostgresResource, object_store: ObjectStoreResource) -> dg.MaterializeResult:
    """Per collection: tier, documents, vectors, archived documents, bytes in Postgres and on the
    object store, and a monthly cost estimate (VP_COST_POSTGRES_GB_MONTH, VP_COST_OBJECT_STORE_GB_MONTH);
    the tier distribution and the bytes per store, drawn as tables in the metadata."""
    figures = overview.storage_overview(postgres.pool(), object_store.store())
    drawn = overview.markdown(figures)
    return dg.MaterializeResult(metadata={
        "collections": len(figures["collections"]),
        "usd_per_month": figures["cost"]["usd_per_month"],
        "bytes_postgres": figures["stores"]["postgres"],
        "bytes_object_store": figures["stores"]["object_store (collections)"] + figures["stores"]["object_store (embedding cache)"],
        **{f"vectors_{tier}": t["vectors"] for tier, t in figures["tiers"].items()},
        "per_collection": dg.MetadataValue.md(drawn["per_collection"]),
        "tier_distribution": dg.MetadataValue.md(drawn["tier_distribution"]),
        "bytes_per_store": dg.MetadataValue.md(drawn["bytes_per_store"]),
    })
