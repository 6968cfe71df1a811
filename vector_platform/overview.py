"""The storage overview: per collection its tier, rows, bytes in Postgres and on the object
store, and a monthly cost estimate; plus the totals per tier and per store.

The figures are `Platform.status()`'s own (one definition of "bytes of a collection"); this
module adds them up and draws them for the `storage_overview` asset.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from psycopg_pool import ConnectionPool

from vector_platform import catalog, pictures
from vector_platform.api import collection_status, monthly_cost
from vector_platform.catalog import cache_index
from vector_platform.object_store import ObjectStore


def storage_overview(pool: ConnectionPool, store: ObjectStore) -> dict[str, Any]:
    with pool.connection() as conn:
        collections = [collection_status(conn, coll, store) for coll in catalog.list_collections(conn)]
        cache_bytes = sum(int(cache_index.total_bytes(conn, store.url, catalog.get_model(conn, key).fingerprint))
                          for key in catalog.list_model_keys(conn))
    rows = [
        {
            "collection": c["name"], "tier": c["tier"], "documents": c["documents"], "vectors": c["vectors"],
            "archived_documents": c["archive"]["documents"], "bytes_postgres": c["bytes_postgres"],
            "bytes_object_store": c["bytes_object_store"], "usd_per_month": c["cost"]["usd_per_month"],
        }
        for c in collections
    ]
    tiers: dict[str, dict[str, int]] = defaultdict(lambda: {"collections": 0, "vectors": 0, "bytes": 0})
    for c in collections:
        tier = tiers[c["tier"]]
        tier["collections"] += 1
        tier["bytes"] += c["bytes_postgres"] + c["bytes_object_store"]
        # an active collection's vectors are rows of its table; a cold one's, rows of its snapshot
        tier["vectors"] += c["vectors"] if c["tier"] == "active" else sum(s["rows"] for s in c["snapshots"] if s["serving"])
    stores = {
        "postgres": sum(r["bytes_postgres"] for r in rows),
        "object_store (collections)": sum(r["bytes_object_store"] for r in rows),
        "object_store (embedding cache)": cache_bytes,
    }
    total = monthly_cost(stores["postgres"], stores["object_store (collections)"] + cache_bytes)
    return {"collections": rows, "tiers": dict(tiers), "stores": stores, "cost": total}


def markdown(overview: dict[str, Any]) -> dict[str, str]:
    """The pictures of the overview: per collection, per tier, per store."""
    rows = overview["collections"]
    per_collection = pictures.bar_table(
        ["collection", "tier", "documents", "vectors", "archived docs", "Postgres", "object store", "$/month"],
        [(r["collection"], r["tier"], r["documents"], r["vectors"], r["archived_documents"],
          pictures.human_bytes(r["bytes_postgres"]), pictures.human_bytes(r["bytes_object_store"]), f"{r['usd_per_month']:.6f}")
         for r in rows],
        values=[r["bytes_postgres"] + r["bytes_object_store"] for r in rows], bar_header="bytes",
    )
    tiers = sorted(overview["tiers"].items())
    per_tier = pictures.bar_table(
        ["tier", "collections", "vectors", "bytes"],
        [(tier, t["collections"], t["vectors"], pictures.human_bytes(t["bytes"])) for tier, t in tiers],
        values=[t["vectors"] for _, t in tiers], bar_header="vectors",
    )
    per_store = pictures.bar_table(
        ["store", "bytes"], [(name, pictures.human_bytes(n)) for name, n in overview["stores"].items()],
        values=list(overview["stores"].values()),
    )
    return {"per_collection": per_collection, "tier_distribution": per_tier, "bytes_per_store": per_store}
