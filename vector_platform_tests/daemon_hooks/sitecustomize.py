"""Put on PYTHONPATH by conftest.instance_env for the processes a test's CLI starts (the CLI,
the dagster-daemon it may start, its runs): with VP_TEST_DAEMON_INTERVAL_S set, Dagster's
backfill daemon evaluates its backfills every that many seconds instead of every 30.

Dagster has no setting for that interval (the module constant DEFAULT_DAEMON_INTERVAL_SECONDS,
read by the backfill loop each time it starts). The backfill is evaluated exactly as before,
only sooner after its runs end: at 30 s a test spends most of its time waiting for the next
iteration. Nothing is imported until Dagster imports the module itself. A Dagster that no
longer has the constant fails the daemon at start, loudly, rather than leaving tests slow.
A sitecustomize further down sys.path (which this one hides) still runs."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

_MODULE = "dagster._daemon.controller"
_CONSTANT = "DEFAULT_DAEMON_INTERVAL_SECONDS"


class _PatchDaemonInterval(importlib.abc.MetaPathFinder):
    def __init__(self, seconds: int):
        self.seconds = seconds

    def find_spec(self, fullname, path, target=None):
        if fullname != _MODULE:
            return None
        sys.meta_path.remove(self)  # once, and let the usual finders locate the module
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module, seconds = spec.loader.exec_module, self.seconds

        def exec_and_patch(module):
            exec_module(module)
            if not hasattr(module, _CONSTANT):
                raise RuntimeError(f"vector_platform_tests/daemon_hooks: {_MODULE}.{_CONSTANT} is gone; update the hook")
            setattr(module, _CONSTANT, seconds)

        spec.loader.exec_module = exec_and_patch
        return spec


def _run_the_sitecustomize_this_one_hides() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


if os.environ.get("VP_TEST_DAEMON_INTERVAL_S"):
    sys.meta_path.insert(0, _PatchDaemonInterval(int(os.environ["VP_TEST_DAEMON_INTERVAL_S"])))
_run_the_sitecustomize_this_one_hides()
