"""What every worker of bench/peers.py shares: the job, the documents, the lookup embedding,
the recall tuning and latency loop, peak memory, and the one JSON line of results.

Runs under both interpreters (the product's venv for ours, bench/.venv-peers for the
peers), so it needs only the standard library and numpy.

A worker is `python <worker>.py JOB.json`; it logs to stderr and talks to bench/peers.py on
stdout in lines that start with `BENCH:` (libraries may print there too): `BENCH:READY` when
its table is loaded and tuned (it then times queries on request, see `serve`), and its
results, `BENCH:RESULT {...}`, last.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import numpy as np


def load_job() -> dict:
    return json.loads(Path(sys.argv[1]).read_text())


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def emit(result: dict) -> None:
    result["peak_rss_mib"] = peak_rss_mib()
    print("BENCH:RESULT " + json.dumps(result), flush=True)


def peak_rss_mib() -> float:
    """Peak resident memory of this process and of any child it waited for (Linux: KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, children) / 1024, 1)


def read_docs(path: str) -> list[dict]:
    """The documents, as the JSONL the platform reads: `id`, `title`, `text`."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def full_text(doc: dict) -> str:
    """What every system embeds for a document: the title, a blank line, the abstract
    (what the platform chunks, and what the shared precomputed vectors were made from)."""
    return f"{doc['title']}\n\n{doc['text']}" if doc.get("title") else doc["text"]


def _key(text: str) -> str:
    # Splitters trim and some re-join whitespace: compare texts with whitespace collapsed.
    return " ".join(text.split())


class Lookup:
    """The shared precomputed vectors, found by the text they were computed from.

    A text it does not know raises (no system may quietly get a made-up vector)."""

    def __init__(self, texts_path: str, vectors_path: str):
        texts = json.loads(Path(texts_path).read_text())
        vectors = np.load(vectors_path).astype(np.float32)
        self.by_key = {_key(t): i for i, t in enumerate(texts)}
        self.vectors = vectors
        self.calls = 0

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += 1
        out = np.empty((len(texts), self.vectors.shape[1]), np.float32)
        for i, text in enumerate(texts):
            index = self.by_key.get(_key(text))
            if index is None:
                raise KeyError(f"no precomputed vector for a text of {len(text)} characters: {text[:80]!r}")
            out[i] = self.vectors[index]
        return out


def integrity(rows: Sequence[tuple[str, str]], docs: list[dict]) -> dict:
    """What a table holds against the documents it should hold, one vector each: `rows`
    are (document id, text) of every row. `duplicates`: rows beyond one per document;
    `stale`: rows whose text is not the document's current text (an old version left
    searchable); `missing`: documents with no row."""
    current = {str(d["id"]): _key(full_text(d)) for d in docs}
    seen = Counter(str(doc_id) for doc_id, _ in rows)
    return {
        "rows": len(rows),
        "documents": len(current),
        "duplicates": sum(count - 1 for count in seen.values() if count > 1),
        "stale": sum(1 for doc_id, text in rows if str(doc_id) in current and _key(text) != current[str(doc_id)]),
        "missing": sum(1 for doc_id in current if doc_id not in seen),
        "unknown": sum(1 for doc_id in seen if doc_id not in current),
    }


class HttpEmbedder:
    """The live model behind bench/peers_workers/embed_server.py (an OpenAI-compatible
    `/v1/embeddings`), for peers whose venv has no torch: one request per batch."""

    def __init__(self, base_url: str, model: str = "all-MiniLM-L6-v2"):
        self.url = base_url.rstrip("/") + "/embeddings"
        self.model = model
        self.calls = 0

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        import urllib.request

        self.calls += 1
        body = json.dumps({"input": list(texts), "model": self.model, "encoding_format": "float"}).encode()
        request = urllib.request.Request(self.url, body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            data = json.loads(response.read())["data"]
        return np.asarray([d["embedding"] for d in sorted(data, key=lambda d: d["index"])], np.float32)


def embedder_for(job: dict):
    """The job's embedding function: the lookup (precomputed run) or the live model's server."""
    if job["mode"] == "precomputed":
        return Lookup(job["lookup_texts"], job["lookup_vectors"])
    return HttpEmbedder(job["embed_url"])


def minilm_token_counter(job: dict) -> Callable[[str], int]:
    """Tokens of a text as all-MiniLM-L6-v2 counts them (its own tokenizer.json, offline),
    for the peers' splitters (their default, tiktoken, needs the network)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(job["tokenizer_json"])
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)


def sqlalchemy_url(dsn: str, driver: str):
    """A libpq DSN (URI or key=value, TCP or a socket directory) as a SQLAlchemy URL."""
    from psycopg.conninfo import conninfo_to_dict
    from sqlalchemy.engine import URL

    info = conninfo_to_dict(dsn)
    host = info.get("host")
    query = {"host": host} if host and host.startswith("/") else {}
    return URL.create(
        f"postgresql+{driver}", username=info.get("user"), password=info.get("password") or None,
        host=None if query else host, port=int(info["port"]) if info.get("port") and not query else None,
        database=info.get("dbname"), query=query,
    )


def analyze(dsn: str) -> None:
    """ANALYZE the system's database before searching: what autovacuum does within a minute
    of a load anyway, so every system is searched under its steady-state plan (on small
    tables PostgreSQL may then prefer an exact scan to the HNSW index)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ANALYZE")


def tune(search: Callable[[np.ndarray, int], list[str]], job: dict) -> dict:
    """The smallest ef_search whose recall@k against exact search, over every query, reaches
    the target: up the job's ladder to the first value that does, then a bisection between
    it and the value below (so that no system is timed at a needlessly high ef_search
    because of the ladder's steps). The ladder's top when none does (the best this system
    offers). `search(vector, ef)` returns document ids, best first."""
    queries = np.load(job["queries"]).astype(np.float32)
    truth_idx = np.load(job["truth"])
    doc_ids = json.loads(Path(job["doc_ids"]).read_text())
    truth = [set(doc_ids[i] for i in row) for row in truth_idx]
    k, target = job["k"], job["recall_target"]
    curve: dict[int, float] = {}

    def recall(ef: int) -> float:
        hits = 0
        for q, expected in zip(queries, truth):
            hits += len(expected.intersection(search(q, ef)[:k]))
        curve[ef] = hits / (k * len(queries))
        log(f"ef_search {ef}: recall@{k} {curve[ef]:.4f}")
        return curve[ef]

    below, chosen = None, None
    for ef in job["ef_ladder"]:
        if recall(ef) >= target:
            chosen = ef
            break
        below = ef
    if chosen is None:
        chosen = job["ef_ladder"][-1]
    elif below is not None:
        while chosen - below > 1:
            middle = (below + chosen) // 2
            if recall(middle) >= target:
                chosen = middle
            else:
                below = middle
    search(queries[0], chosen)  # leave the system set to the chosen value
    return {"ef_search": chosen, "recall": curve[chosen],
            "recall_curve": {str(ef): round(r, 4) for ef, r in sorted(curve.items())}}


def serve(runners: dict[str, Callable[[np.ndarray, int], object]], ef_search: int, job: dict) -> None:
    """The latency phase, driven by bench/peers.py so that every system is timed in the same
    minutes (the machine is shared and its load drifts): prints `READY`, then for each
    `Q <i>` line on stdin runs query i with every runner (order rotated) and answers
    `T {"label": seconds, ...}`, until `END`. The first runner is the system's search; more
    (the bare SQL query beside ours) are timed next to it."""
    queries = np.load(job["queries"]).astype(np.float32)
    labels = list(runners)
    print("BENCH:READY", flush=True)
    for line in sys.stdin:
        command = line.split()
        if not command or command[0] == "END":
            break
        i = int(command[1])
        order = labels[i % len(labels):] + labels[: i % len(labels)]
        times = {}
        for label in order:
            started = time.perf_counter()
            runners[label](queries[i], ef_search)
            times[label] = time.perf_counter() - started
        print("BENCH:T " + json.dumps(times), flush=True)


class Stopwatch:
    """Named wall-clock laps: `with watch("ingest"): ...` records seconds under that name."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str):
        watch = self

        class _Lap:
            def __enter__(self):
                self.started = time.perf_counter()
                log(f"{name} ...")

            def __exit__(self, *exc):
                watch.seconds[name] = round(time.perf_counter() - self.started, 3)
                if exc[0] is None:
                    log(f"{name}: {watch.seconds[name]:.2f} s")

        return _Lap()
