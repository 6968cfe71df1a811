"""Run one platform command in its own process with the fake embedder, for tests that kill it
or run two at once: `python -m vector_platform_tests.fake_ingest DSN STORE_URL DAGSTER_HOME COMMAND NAME`.

COMMAND is `ingest` or `replay`. Prints one line per run: job, success, error.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    dsn, store_url, dagster_home, command, name = sys.argv[1:6]
    import dagster as dg

    from vector_platform import progress
    from vector_platform.api import Platform
    from vector_platform.defs.resources import ObjectStoreResource, PostgresResource
    from vector_platform_tests.conftest import FakeEmbedderResource

    resources = {
        "postgres": PostgresResource(dsn=dsn),
        "object_store": ObjectStoreResource(url=store_url),
        "embedder": FakeEmbedderResource(batch_size=int(os.environ.get("FAKE_BATCH", "64"))),
    }
    # Each process its own instance: the runs' coordination under test is the database's.
    progress.notice_listeners.append(lambda message: print(message, file=sys.stderr, flush=True))  # as the CLI does
    with dg.DagsterInstance.ephemeral(tempdir=os.path.join(dagster_home, str(os.getpid()))) as instance:
        vp = Platform(resources=resources, instance=instance)
        runs = vp.ingest(name) if command == "ingest" else vp.replay_dead_letters(name)
        for run in runs:
            print(f"{run.job} success={run.success} error={run.error}", flush=True)
    return 0 if all(r.success for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
