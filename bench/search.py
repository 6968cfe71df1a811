"""Search hot-path benchmark: `Platform.search(vector=...)` and `POST /search` vs a bare psycopg query.

One active collection of real vectors (the shared SciFact all-MiniLM-L6-v2 vectors, 5,183
rows, HNSW m 16, ef_construction 64), the same 300 real query vectors, ef_search 100, k 10,
in one run with the order of the three rotated on every query. The bare query is the SELECT
the platform runs, on a connection holding the same planner settings, not prepared (as the
platform runs it). The HTTP API runs in this process (uvicorn on 127.0.0.1, one keep-alive
connection). Last line: `search_over_bare_p50=<Python API p50 / bare p50>`.

    .venv/bin/python bench/search.py [--dsn DSN] [--queries 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from vector_platform import tables  # noqa: E402
from vector_platform.models import MINILM  # noqa: E402
from vector_platform.search import active  # noqa: E402


def bare_query(conn, view, q, k, ef_search):
    query = sql.SQL(
        "SELECT chunk_id, doc_id, text, metadata, embedding <=> %(q)s::vector AS distance FROM {rel} "
        "ORDER BY embedding <=> %(q)s::vector LIMIT %(k)s"
    ).format(rel=view)
    return conn.execute(query, {"q": q, "k": k, "filters": None}, prepare=False).fetchall()


def start_http(vp) -> tuple[int, object]:
    import uvicorn

    from vector_platform.http import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(create_app(vp, api_key=""), host="127.0.0.1", port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return port, server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="PostgreSQL DSN (default: a temporary embedded server)")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    k, ef_search = 10, 100
    with common.server(args.dsn) as dsn:
        vp = common.platform(dsn, Path(tempfile.mkdtemp(prefix="vp-bench-store-")).as_uri())
        rows, vectors = common.scifact()
        name = "bench_search"
        common.load_collection(vp, name, rows, vectors)
        vp.set_settings(name, hnsw_ef_search=ef_search)
        queries = common.query_vectors(args.queries)
        view = tables.view_id(name)

        bare = psycopg.connect(dsn, autocommit=True)
        register_vector(bare)
        session: dict[str, str] = {}
        active._apply_settings(bare, active.plan_settings(False, ef_search, iterative=False), session)
        port, server = start_http(vp)
        client = http.client.HTTPConnection("127.0.0.1", port)

        def via_http(q):
            client.request("POST", "/search", json.dumps({"vector": q.tolist(), "collections": [name], "k": k}),
                           {"Content-Type": "application/json"})
            response = client.getresponse()
            body = response.read()
            assert response.status == 200, body
            return json.loads(body)["hits"]

        runners = {
            "bare psycopg": lambda q: bare_query(bare, view, q, k, ef_search),
            "Platform.search": lambda q: vp.search(vector=q, collections=[name], k=k).hits,
            "POST /search": via_http,
        }
        # Same answers from all three (the platform and HTTP return the bare query's rows).
        for q in queries[:20]:
            ids = [str(r[0]) for r in runners["bare psycopg"](q)]
            assert ids == [h.chunk_id for h in runners["Platform.search"](q)] == [h["chunk_id"] for h in via_http(q)]
        plan = active.explain_nearest(bare, view, MINILM, queries[0], exact=False, ef_search=ef_search)
        assert "hnsw" in plan, plan
        for q in queries[:30]:  # warm-up
            for run in runners.values():
                run(q)
        times: dict[str, list[float]] = {label: [] for label in runners}
        labels = list(runners)
        for _ in range(args.rounds):
            for i, q in enumerate(queries):
                order = labels[i % 3:] + labels[: i % 3]
                for label in order:
                    started = time.perf_counter()
                    runners[label](q)
                    times[label].append(time.perf_counter() - started)
        server.should_exit = True
        bare.close()
    print(f"{len(rows)} rows x {vectors.shape[1]} d, HNSW m 16 ef_construction 64, ef_search {ef_search}, k {k}, "
          f"{len(queries)} queries x {args.rounds} rounds")
    print(f"{'':<18}{'p50 ms':>9}{'p95 ms':>9}{'x bare p50':>12}")
    base = common.pct(times["bare psycopg"], 50)
    for label, values in times.items():
        print(f"{label:<18}{common.pct(values, 50):>9.3f}{common.pct(values, 95):>9.3f}{common.pct(values, 50) / base:>12.2f}")
    print(f"http_over_bare_p50={common.pct(times['POST /search'], 50) / base:.3f}")
    print(f"search_over_bare_p50={common.pct(times['Platform.search'], 50) / base:.3f}")


if __name__ == "__main__":
    main()
