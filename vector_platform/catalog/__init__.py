"""The catalog (schema `vector_platform`): every catalog table's SQL, and its migrations.

One module per group of tables: `schema` (migrations, schema names), `models`,
`collections`, `documents` (documents and chunks), `dead_letters`, `queries` (the query log),
`cache_index` (where each cached embedding lives). Vectors do not live here: one table per
(collection, model) in schema `vp_vectors` and a serving view per collection in `vp_serving`
(see `vector_platform.tables`).
"""

from vector_platform.catalog.collections import (
    Collection,
    add_collection,
    attach_model,
    get_collection,
    list_collections,
    table_fingerprint,
    table_name_for,
    update_settings,
    vector_table_name,
)
from vector_platform.catalog.dead_letters import (
    count_open,
    dead_letter_many,
    open_dead_letters,
    resolve_dead_letters,
    resolve_model_letters,
)
from vector_platform.catalog.models import get_model, list_model_keys, register_model
from vector_platform.catalog.schema import CATALOG, LATEST_VERSION, SERVING, VECTORS, bootstrap, migrate

__all__ = [
    "CATALOG", "LATEST_VERSION", "SERVING", "VECTORS", "bootstrap", "migrate",
    "Collection", "add_collection", "attach_model", "get_collection", "list_collections", "table_fingerprint",
    "table_name_for", "update_settings", "vector_table_name",
    "count_open", "dead_letter_many", "open_dead_letters", "resolve_dead_letters", "resolve_model_letters",
    "get_model", "list_model_keys", "register_model",
]
