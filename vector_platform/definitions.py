"""The code location: everything under `defs/` plus the resources, each bound once."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from vector_platform.defs.resources import default_resources
from vector_platform.telemetry import logs


def build_definitions(resources: dict | None = None) -> dg.Definitions:
    """All definitions; `resources` replaces the defaults (tests bind their own)."""
    # Every process that loads the code location (run workers included) masks secrets in its logs.
    logs.install_redaction()
    return dg.Definitions.merge(
        dg.load_from_defs_folder(path_within_project=Path(__file__).parent),
        dg.Definitions(resources=resources or default_resources(), executor=executor_from_env()),
    )


EXECUTORS = ("in_process", "multiprocess", "celery")


def executor_from_env() -> dg.ExecutorDefinition:
    """The executor of every job, by VP_EXECUTOR:
    - `in_process` (default): one process per run; the multiprocess executor costs seconds per
      step on a small machine.
    - `multiprocess`: a process per step, on the run worker's machine.
    - `celery`: each step a Celery task on the broker VP_CELERY_BROKER (e.g. redis://host:6379/0;
      results to VP_CELERY_BACKEND, default the broker), executed by `dagster-celery` workers on
      any machine that has this package and reaches the database and the object store. Pools
      (`vector_db`) still cap concurrent writers: dagster-celery claims the instance's
      concurrency slots before it submits a step. Runs must go through the instance
      (`VP_RUN_MODE=instance`, or the UI); an in-process run executes in its own process.
    """
    name = (os.environ.get("VP_EXECUTOR") or "in_process").strip().replace("-", "_")
    if name not in EXECUTORS:
        raise ValueError(f"VP_EXECUTOR={name!r}: expected one of {', '.join(EXECUTORS)}")
    if name == "multiprocess":
        return dg.multiprocess_executor
    if name == "celery":
        try:
            from dagster_celery import celery_executor
        except ImportError:
            raise ImportError("VP_EXECUTOR=celery needs dagster-celery and redis: pip install 'vector_platform[celery]'") from None
        if not os.environ.get("VP_CELERY_BROKER"):
            raise ValueError("VP_EXECUTOR=celery needs VP_CELERY_BROKER, the broker's URL (e.g. redis://127.0.0.1:6379/0)")
        # from the environment at run time (a secret: a broker URL may hold a password)
        backend = "VP_CELERY_BACKEND" if os.environ.get("VP_CELERY_BACKEND") else "VP_CELERY_BROKER"
        return celery_executor.configured(
            {"broker": {"env": "VP_CELERY_BROKER"}, "backend": {"env": backend}}, name="celery"
        )
    return dg.in_process_executor


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions()
