"""The writer lock, as every asset and op that writes a collection takes it."""

from contextlib import contextmanager

import dagster as dg

from vector_platform import catalog
from vector_platform.defs.resources import PostgresResource
from vector_platform.locks import writer_lock
from vector_platform.progress import notify
from vector_platform.telemetry import logs


@contextmanager
def writing(context, postgres: PostgresResource, collection: str, model_key: str | None = None, require_active: bool = True):
    """Hold the collection's (or the collection x model's) writer lock for the step.

    `require_active`: refuse, under the lock, to write a collection that is cold or archived
    (its vectors live in a snapshot or nowhere; rehydrate it first). Tier moves pass False.
    """

    def say(message: str) -> None:
        # A wait is worth a warning: it stands out in the UI's run log, and the CLI shows it live.
        context.log.warning(message)
        notify(message)

    # Python log records of the step's work say which run, collection and model they are about.
    scope = logs.log_context(run_id=context.run.run_id, collection=collection, model=model_key)
    with scope, writer_lock(postgres.resolved_dsn(), collection, model_key, say=say) as waited:
        if require_active:
            with postgres.pool().connection() as conn:
                tier = catalog.get_collection(conn, collection).tier
            if tier != "active":
                hint = "rehydrate it first: vector-platform tier NAME active" if tier == "cold" else "archived is terminal"
                raise dg.Failure(f"collection {collection!r} is {tier}; only active collections are written ({hint})", allow_retries=False)
        yield waited
