"""A process started with SIGINT ignored (a background job of a script, `nohup ... &`) keeps
SIGTERM working after an in-process run. Dagster, restoring SIGINT after a run on the main
thread, sets SIGTERM to SIGINT's handler, here "ignore": from then on the process and every
child it started ignored SIGTERM, and each step of a later run on another thread waited 30 s
for its compute-log `tail` to die (the soak's 60 s evictions in a backgrounded CI run)."""

import signal
import subprocess
import threading
import time

from .conftest import write_jsonl


def test_sigterm_still_works_after_a_run_in_a_process_that_ignores_sigint(make_platform, tmp_path, unique_name):
    vp = make_platform()
    vp.add_collection(unique_name, write_jsonl(tmp_path / "d.jsonl", [{"id": f"d{i}", "text": f"note {i} alpha beta"} for i in range(20)]))
    sigint, sigterm = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as a fresh process has it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert all(r.success for r in vp.ingest(unique_name))  # on the main thread
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        child = subprocess.Popen(["sleep", "30"])  # what a later step's `tail` is
        child.terminate()
        assert child.wait(timeout=5) == -signal.SIGTERM
        # A run on another thread (a worker, a server) ends in its own time, not 30 s per step.
        took = {}

        def later():
            began = time.monotonic()
            took["runs"] = vp.ingest(unique_name)
            took["s"] = time.monotonic() - began

        thread = threading.Thread(target=later)
        thread.start()
        thread.join(120)
        assert all(r.success for r in took["runs"]) and took["s"] < 25, took
    finally:
        signal.signal(signal.SIGINT, sigint)
        signal.signal(signal.SIGTERM, sigterm)
