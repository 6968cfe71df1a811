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
    # In-process by default: the multiprocess executor costs seconds per step on small machines.
    # VP_EXECUTOR=multiprocess switches; a k8s/celery/docker executor goes here in production.
    executor = dg.multiprocess_executor if os.environ.get("VP_EXECUTOR") == "multiprocess" else dg.in_process_executor
    return dg.Definitions.merge(
        dg.load_from_defs_folder(path_within_project=Path(__file__).parent),
        dg.Definitions(resources=resources or default_resources(), executor=executor),
    )


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions()
