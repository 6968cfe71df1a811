"""The soak (issue 11): searches over the HTTP API, from a process of client threads, for
VP_SOAK_SECONDS (default 60; `make soak`: 600) while a worker thread moves the collections
they search, round after round:

- ingest: new documents (fresh and backdated) and changed ones into `docs` (an archived one
  among them: changed at the source it comes back live, and is archived again); from the
  second round on, into `tier` too while it is active, so each evict writes a new snapshot
  and deletes the one it replaces;
- row archival: `archive_rows` of `docs` (a 730-day rule, month-partitioned vector table),
  the archival clock moved a few days each round, so rows keep ageing out;
- evict and rehydrate: `tier` goes cold and comes back active, once each a round;
- model swap: `swap` is upgraded to a second model (an OpenAI-compatible test server): its
  shadow table built and gated, then swapped in; then rolled back, and back again, round
  after round (a rollback is itself undone by a rollback).

The API runs as a server process of its own (`soak_serve`: `vector_platform.http.serve`,
uvicorn on 127.0.0.1), on S3 (moto over HTTP) and the embedded PostgreSQL. Every answer must
be 200 and JSON; every search of a non-empty collection answers k hits, each labelled with
its tier (cold hits with their snapshot, archived rows only with `include_archive` and found
then), one tier and one model per collection in an answer; every move must have happened.
Figures (latency percentiles, requests, moves and their durations) go to
$VP_TEST_ARTIFACTS/soak-<seconds>s.json when that is set, and a summary line is printed.
"""

from __future__ import annotations

import datetime as dt
import faulthandler
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import psycopg

from vector_platform import clock
from vector_platform.archive.reconcile import archive_reconciles
from vector_platform.metrics import percentile
from vector_platform.models import MINILM

from .. import upgrade_data as data
from ..conftest import write_jsonl
from ..test_tiers import WORDS, corpus

SOAK_SECONDS = float(os.environ.get("VP_SOAK_SECONDS", "60"))
# The worker starts no move that would not end before the deadline (by its last duration);
# past the deadline it goes on only until every kind of move has run once (a slow, shared
# machine), and never longer than this.
COVERAGE_GRACE_S = 120.0
JOIN_TIMEOUT_S = 300.0  # a move still running this long after the deadline is hung
CLIENT_THREADS = 4
# Bounds in count besides time: rounds of moves, requests per client thread (far above what
# either reaches in time: about 25 s a round, a few hundred requests a second in all).
MAX_ROUNDS = max(10, int(SOAK_SECONDS))
MAX_REQUESTS_PER_CLIENT = max(100_000, int(SOAK_SECONDS) * 2_000)
K = 10
ARCHIVE_DAYS = 730
CLOCK_STEP_DAYS = 3  # the archival clock moves this much a round...
CLOCK_MAX_DAYS = 300  # ...and no further, so that the stable recent documents never age out
SPREAD_DAYS = 1095  # the dated documents' timestamps span three years before T0
N_DOCS, N_TIER, N_SWAP = 240, 200, 200
OPS = ("ingest", "archival", "eviction", "rehydration", "swap", "rollback")
SLOW_MOVE_S = 20.0  # a move still running this long: the worker's stack and the database's sessions are kept
BENIGN_WARNINGS = [r"merged by reciprocal rank fusion"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _words(seed: int, n: int) -> str:
    return " ".join(WORDS[(seed * 5 + j * 3 + j * j) % len(WORDS)] for j in range(n))


def dated_docs(t0: dt.datetime) -> list[dict]:
    """The tiers corpus with source timestamps spread evenly over SPREAD_DAYS before t0 (doc i
    the older the larger i)."""
    docs = corpus(N_DOCS, "s")
    for i, doc in enumerate(docs):
        doc["timestamp"] = (t0 - dt.timedelta(days=SPREAD_DAYS * i / N_DOCS, hours=1)).timestamp()
    return docs


class Worker:
    """Runs the moves in rounds until the deadline (or until each has run once, within the
    grace); stops at the first move that fails. Every move is timed."""

    def __init__(self, vp, names: dict[str, str], second_model: str, sources: dict[str, tuple[Path, list[dict]]],
                 t0: dt.datetime, churn: dict[str, list[str]], deadline: float, dsn: str, dump_dir: Path):
        self.vp, self.names, self.second, self.t0 = vp, names, second_model, t0
        self.dsn, self.dump_dir = dsn, dump_dir
        self.sources = {role: (path, {d["id"]: d for d in docs}) for role, (path, docs) in sources.items()}
        self.churn = churn
        self.deadline = deadline
        self.moves: list[dict] = []
        self.failure: str | None = None
        self.archived_documents = 0
        self.last_seconds: dict[str, float] = {}
        self.thread = threading.Thread(target=self._run, name="soak worker", daemon=True)

    def counts(self) -> Counter:
        return Counter(m["op"] for m in self.moves if m["ok"])

    def _more(self, step) -> bool:
        """Whether to start `step`: while it should end before the deadline (judged by how long
        it took last time); past that only while some kind of move has not run yet, within the
        grace."""
        now = time.monotonic()
        if now + self.last_seconds.get(step.__name__, 0.0) < self.deadline:
            return True
        return now < self.deadline + COVERAGE_GRACE_S and set(self.counts()) < set(OPS)

    def _run(self) -> None:
        try:
            round_ = 0
            # The swap early in a round: the first one (the upgrade) is the longest move. `tier`
            # changes while active from the second round on, so that each evict writes a new
            # snapshot and deletes the one it replaces (an unchanged table reuses its snapshot).
            steps = (self._toggle_tier, self._swap, self._ingest_docs, self._toggle_tier, self._ingest_tier, self._archive)
            while self.failure is None and round_ < MAX_ROUNDS:
                for step in steps:
                    if not self._more(step) or self.failure is not None:
                        return
                    began = time.monotonic()
                    step(round_)
                    self.last_seconds[step.__name__] = time.monotonic() - began
                round_ += 1
        except Exception as err:  # noqa: BLE001 - the test reports it
            self.failure = f"worker crashed: {err!r}"

    def _timed(self, op: str, collection: str, call) -> None:
        began, at = time.perf_counter(), time.time()
        ok, detail = False, {}
        slow = self._watch(len(self.moves))
        try:
            ok, detail = call()
        except Exception as err:  # noqa: BLE001 - a failed move ends the soak, reported by the test
            detail = {"error": repr(err)}
        finally:
            slow["timer"].cancel()
            faulthandler.cancel_dump_traceback_later()
        seconds = round(time.perf_counter() - began, 3)
        if seconds > SLOW_MOVE_S:
            detail = {**detail, "slow": self._what_it_waited_on(slow)}
        self.moves.append({"op": op, "collection": collection, "at": at, "seconds": seconds, "ok": ok, **detail})
        if not ok:
            self.failure = f"{op} of {collection} failed: {detail}"

    def _watch(self, number: int) -> dict:
        """After SLOW_MOVE_S: every thread's stack (faulthandler, to a file) and the database's
        busy sessions, to say what a slow move was waiting on."""
        slow: dict = {"dump": self.dump_dir / f"move{number}.stacks.txt", "sessions": None}
        slow["file"] = slow["dump"].open("w")
        faulthandler.dump_traceback_later(SLOW_MOVE_S, repeat=False, file=slow["file"])

        def sessions():
            try:
                slow["sessions"] = _database_activity(self.dsn)
            except Exception as err:  # noqa: BLE001 - a diagnosis only
                slow["sessions"] = repr(err)

        slow["timer"] = threading.Timer(SLOW_MOVE_S, sessions)
        slow["timer"].daemon = True
        slow["timer"].start()
        return slow

    def _what_it_waited_on(self, slow: dict) -> dict:
        slow["file"].close()
        text = slow["dump"].read_text(errors="replace")
        me = f"Thread 0x{threading.get_ident():016x}"
        mine = [block for block in text.split("\n\n") if block.startswith(me) or me in block[:40]]
        return {"worker_stack": (mine[0] if mine else text)[-4000:], "sessions": slow["sessions"]}

    def _toggle_tier(self, round_: int) -> None:
        name = self.names["tier"]
        target = "active" if self.vp.collection(name).tier == "cold" else "cold"

        def move():
            run = self.vp.tier(name, target)
            return run.success, {"error": run.error} if not run.success else {}

        self._timed("rehydration" if target == "active" else "eviction", name, move)

    def _ingest_docs(self, round_: int) -> None:
        arch_now = self._archival_now(round_)
        new = [
            {"id": f"n{round_}_fresh", "text": f"n{round_}fresh " + _words(round_, 6), "timestamp": clock.now().timestamp()},
            *({"id": f"n{round_}_late{j}", "text": f"n{round_}late{j} " + _words(round_ + j, 5),
               "timestamp": (arch_now - dt.timedelta(days=ARCHIVE_DAYS + 70 + j, hours=round_)).timestamp()} for j in (0, 1)),
        ]
        # An old one may be archived by now: changed at the source, it comes back live (and is archived again).
        changed = [self.churn["recent"][round_ % len(self.churn["recent"])], self.churn["old"][round_ % len(self.churn["old"])]]
        self._ingest("docs", round_, new, changed)

    def _ingest_tier(self, round_: int) -> None:
        if round_ == 0 or self.vp.collection(self.names["tier"]).tier != "active":
            return
        new = [{"id": f"t_new{round_}", "text": f"tnew{round_} " + _words(round_ + 3, 6)}]
        self._ingest("tier", round_, new, [self.churn["tier"][round_ % len(self.churn["tier"])]])

    def _ingest(self, role: str, round_: int, new: list[dict], changed: list[str]) -> None:
        name = self.names[role]
        source, docs = self.sources[role]
        for doc in new:
            docs[doc["id"]] = doc
        for doc_id in changed:
            docs[doc_id] = {**docs[doc_id], "text": f"{doc_id} v{round_} " + _words(round_ * 7 + len(doc_id), 5)}
        write_jsonl(source, list(docs.values()))

        def ingest():
            runs = self.vp.ingest(name)
            ok = all(r.success for r in runs)
            figures = runs[0].metadata.get("source_documents", {}) if runs else {}
            # What came in is found at once, by its new text (the late ones until archived).
            missing = [d["id"] for d in [*new, *(docs[i] for i in changed)] if ok and d["id"] not in
                       {h.doc_id for h in self.vp.search(d["text"], [name], k=K).hits}]
            return ok and not missing, {
                "runs": len(runs), "errors": [r.error for r in runs if not r.success], "new": len(new),
                "changed": len(changed), "not_found_after": missing, "source_documents": _small(figures)}

        self._timed("ingest", name, ingest)

    def _archival_now(self, round_: int) -> dt.datetime:
        return self.t0 + dt.timedelta(days=min(round_ * CLOCK_STEP_DAYS, CLOCK_MAX_DAYS))

    def _archive(self, round_: int) -> None:
        name = self.names["docs"]

        def archive():
            clock.set_now(self._archival_now(round_))  # only this thread reads the clock meanwhile
            try:
                run = self.vp.archive_rows(name)
            finally:
                clock.set_now(None)
            figures = run.metadata.get("row_archive", {})
            self.archived_documents += int(figures.get("documents", 0) or 0)
            ok = run.success and run.checks.get("archive_reconciles") is True
            return ok, {"documents": figures.get("documents"), "partitions_dropped": figures.get("partitions_dropped"),
                        "checks": run.checks, "error": run.error}

        self._timed("archival", name, archive)

    def _swap(self, round_: int) -> None:
        """The first time an upgrade (the shadow table built, gated, swapped in), then a rollback
        each time: by design the model just rolled back from is served again only by rolling back
        (`swap` to it is refused: "is the previous model"), so rollbacks go back and forth."""
        name = self.names["swap"]
        if self.second not in self.vp.collection(name).models:
            def upgrade():
                outcome = self.vp.upgrade([name], self.second, say=lambda m: None)
                ok = outcome.swaps.get(name, {}).get("to_model") == self.second
                return ok, {"kind": "upgrade", "refused": outcome.refused, "errors": [r.error for r in outcome.runs if not r.success]}

            self._timed("swap", name, upgrade)
            return

        def rollback():
            run = self.vp.rollback(name)
            return run.success, {"to": run.metadata.get("serving_view", {}).get("to_model")}

        self._timed("rollback", name, rollback)


def _small(metadata: dict) -> dict:
    return {k: v for k, v in metadata.items() if isinstance(v, (int, float, str)) and len(str(v)) < 80}


def _plan(base: str, names: dict[str, str], docs: list[dict], tier_docs: list[dict], stable: dict[str, list[str]],
          second: str, stop_file: Path) -> dict:
    by_id = {d["id"]: d for d in docs}
    probes = []
    for doc_id in stable["recent"]:  # never archived, never changed: always found, active
        probes.append({"kind": "docs_live", "weight": 2, "method": "POST", "path": "/search",
                       "body": {"query": by_id[doc_id]["text"], "collections": [names["docs"]], "k": K},
                       "expect": {"hits": K, "tiers": ["active"], "doc": doc_id}})
    for doc_id in stable["old"]:  # archived in the first pass, then only ever there
        probes.append({"kind": "docs_archive", "weight": 2, "method": "POST", "path": "/search",
                       "body": {"query": by_id[doc_id]["text"], "collections": [names["docs"]], "k": K, "include_archive": True},
                       "expect": {"hits": K, "tiers": ["active", "archive"], "doc": doc_id, "doc_tiers": ["active", "archive"]}})
        probes.append({"kind": "docs_without_archive", "weight": 1, "method": "POST", "path": "/search",
                       "body": {"query": by_id[doc_id]["text"], "collections": [names["docs"]], "k": K},
                       "expect": {"hits": K, "tiers": ["active"]}})
        probes.append({"kind": "get", "weight": 1, "method": "GET", "path": f"/collections/{names['docs']}/documents/{doc_id}",
                       "expect": {"doc_id": doc_id, "source_tiers": ["active", "archive"], "collection": names["docs"]}})
    for doc in tier_docs[::7]:
        probes.append({"kind": "tier", "weight": 3, "method": "POST", "path": "/search",
                       "body": {"query": doc["text"], "collections": [names["tier"]], "k": K},
                       "expect": {"hits": K, "tiers": ["active", "cold"], "one_tier": True, "doc": doc["id"]}})
        probes.append({"kind": "tier_filtered", "weight": 1, "method": "POST", "path": "/search",
                       "body": {"query": doc["text"], "collections": [names["tier"]], "k": K, "filters": {"odd": 1}},
                       "expect": {"hits": K, "tiers": ["active", "cold"], "one_tier": True, "metadata": {"odd": 1}}})
        probes.append({"kind": "multi", "weight": 1, "method": "POST", "path": "/search",
                       "body": {"query": doc["text"], "collections": [names["tier"], names["swap"], names["docs"]], "k": K},
                       "expect": {"hits": K, "tiers": ["active", "cold"], "one_tier": True}})
    for text in list(data.queries().values())[:40]:
        probes.append({"kind": "swap", "weight": 3, "method": "POST", "path": "/search", "split_by_model": True,
                       "body": {"query": text, "collections": [names["swap"]], "k": K},
                       "expect": {"hits": K, "tiers": ["active"], "one_model": True, "models": [MINILM.key, second]}})
    return {"base": base, "threads": CLIENT_THREADS, "stop_file": str(stop_file), "timeout_s": 60,
            "max_requests": MAX_REQUESTS_PER_CLIENT,
            "hard_deadline_s": SOAK_SECONDS + COVERAGE_GRACE_S + JOIN_TIMEOUT_S, "benign_warnings": BENIGN_WARNINGS,
            "probes": probes}


def _request(url: str, body: dict | None = None) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode() if body else None, method="POST" if body else "GET",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _wait_healthy(base: str, server: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the API server exited ({server.returncode}): {log.read_text()[-3000:]}")
        try:
            if _request(f"{base}/healthz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"the API server did not answer /healthz in {timeout_s} s: {log.read_text()[-3000:]}")


def _database_activity(dsn: str) -> list[tuple]:
    """What every other session is doing (for a worker that hung: who waits on whom)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(
            "SELECT pid, application_name, state, wait_event_type, wait_event, pg_blocking_pids(pid), "
            "now() - query_start, left(query, 200) FROM pg_stat_activity "
            "WHERE pid <> pg_backend_pid() AND datname = current_database() AND state <> 'idle'").fetchall()


def _stop(proc: subprocess.Popen | None, timeout_s: float = 30) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _timings(moves: list[dict]) -> dict:
    out = {}
    for op in OPS:
        seconds = [m["seconds"] for m in moves if m["op"] == op and m["ok"]]
        out[op] = {"count": len(seconds), "total_s": round(sum(seconds), 2),
                   "p50_s": percentile(seconds, 50) if seconds else None, "max_s": max(seconds) if seconds else None}
    return out


def test_search_answers_through_every_move(make_platform, pg_dsn, s3_url, tmp_path):
    started = time.monotonic()
    suffix = uuid.uuid4().hex[:6]
    names = {role: f"soak_{role}_{suffix}" for role in ("docs", "tier", "swap")}
    server = clients = model_server = None
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server_log = tmp_path / "server.log"
    stop_file = tmp_path / "clients.stop"
    worker = None
    try:
        with server_log.open("wb") as log:  # a file, not a pipe: nobody has to drain it
            server = subprocess.Popen(
                [sys.executable, "-m", "vector_platform_tests.reliability.soak_serve", "api", pg_dsn, s3_url, str(port)],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "DAGSTER_HOME": str(tmp_path)},
            )
        # The second model: MiniLM's vectors from the OpenAI-compatible test server.
        model_server = subprocess.Popen([sys.executable, "-m", "vector_platform_tests.reliability.soak_serve", "model"],
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        ready, _, _ = select.select([model_server.stdout], [], [], 120)
        model_url = model_server.stdout.readline().strip() if ready else "no answer in 120 s"
        assert model_url.startswith("http://127.0.0.1:"), model_url
        second = data.spec(f"soak_mini_{suffix}", SimpleNamespace(base_url=model_url))
        vp = make_platform(store_url=s3_url)
        vp.add_model(second)

        # docs: dated, the archival rule set first (so its vector table is month-partitioned).
        t0 = clock.now()
        docs = dated_docs(t0)
        source = write_jsonl(tmp_path / "docs.jsonl", docs)
        vp.add_collection(names["docs"], source)
        vp.set_rules(names["docs"], archive_rows_older_than_days=ARCHIVE_DAYS)
        ids = [d["id"] for d in docs]
        stable = {"recent": ids[0:60:3], "old": ids[180:230:2]}
        tier_docs = corpus(N_TIER, "t")
        # Changed during the soak: never a document the clients must find by its first text.
        churn = {"recent": ids[60:66], "old": ids[230:236], "tier": [d["id"] for d in tier_docs[3::7]]}
        tier_source = write_jsonl(tmp_path / "tier.jsonl", tier_docs)
        vp.add_collection(names["tier"], tier_source)
        vp.add_collection(names["swap"], write_jsonl(tmp_path / "swap.jsonl", data.docs_with_judged(N_SWAP)))
        for name in names.values():
            runs = vp.ingest(name)
            assert all(r.success for r in runs), [r.error for r in runs]
        # No labelled queries for `swap`: the fake model's chunks are not the texts whose MiniLM
        # vectors the second model's server knows, so nDCG@10 would measure noise. Its gate is
        # recall@10 of the new index and search latency.

        _wait_healthy(base, server, server_log)
        for name in names.values():  # everything answers before the load starts
            status, answer = _request(f"{base}/search", {"query": "alpha beta", "collections": [name], "k": K})
            assert status == 200 and len(answer["hits"]) == K, answer
        setup_s = time.monotonic() - started
        print(f"\nsoak: set up in {setup_s:.1f} s; {SOAK_SECONDS:.0f} s of load begins", flush=True)

        plan_file, report_file = tmp_path / "plan.json", tmp_path / "clients.json"
        plan_file.write_text(json.dumps(_plan(base, names, docs, tier_docs, stable, second.key, stop_file)))
        with (tmp_path / "clients.log").open("wb") as log:
            clients = subprocess.Popen(
                [sys.executable, "-m", "vector_platform_tests.reliability.soak_clients", str(plan_file), str(report_file)],
                stdout=log, stderr=subprocess.STDOUT,
            )
        load_began = time.monotonic()
        worker = Worker(vp, names, second.key, {"docs": (source, docs), "tier": (tier_source, tier_docs)}, t0, churn,
                        deadline=load_began + SOAK_SECONDS, dsn=pg_dsn, dump_dir=tmp_path)
        worker.thread.start()
        worker.thread.join(SOAK_SECONDS + COVERAGE_GRACE_S + JOIN_TIMEOUT_S)
        hung = worker.thread.is_alive()
        if not hung and worker.failure is None:  # the searches go on for the whole soak, moves or not
            time.sleep(max(0.0, load_began + SOAK_SECONDS - time.monotonic()))
        activity = _database_activity(pg_dsn) if hung else []
        load_s = time.monotonic() - load_began
        stop_file.touch()
        clients.wait(120)
        report = json.loads(report_file.read_text())
    finally:
        clock.set_now(None)
        stop_file.touch()
        _stop(clients)
        _stop(server)
        _stop(model_server)

    final = {c["name"]: c for c in vp.status()["collections"] if c["name"] in names.values()}
    counts = worker.counts()
    summary = {
        "soak_seconds_asked": SOAK_SECONDS, "load_seconds": round(load_s, 1), "setup_seconds": round(setup_s, 1),
        "total_seconds": round(time.monotonic() - started, 1), "client_threads": CLIENT_THREADS,
        "requests": report["requests"], "requests_per_s": round(report["requests"] / max(report["seconds"], 1e-9), 1),
        "errors": report["errors"], "empty": report["empty"], "violations": report["violations"],
        "latency_ms": report["latency"], "latency_by_kind": report["latency_by_kind"],
        "tiers_seen": report["tiers_seen"], "models_seen": report["models_seen"],
        "moves": {op: counts[op] for op in OPS}, "move_timings": _timings(worker.moves),
        "archived_documents": worker.archived_documents,
        "final": {n: {"tier": c["tier"], "serving_model": c["serving_model"], "documents": c["documents"],
                      "archived": c["archive"]["documents"]} for n, c in final.items()},
        "failures": report["failures"], "slow_requests": report["slow"], "move_log": worker.moves,
    }
    artifacts = os.environ.get("VP_TEST_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        (Path(artifacts) / f"soak-{int(SOAK_SECONDS)}s.json").write_text(json.dumps(summary, indent=1, default=str))
    lat = report["latency"]
    print(f"\nsoak {load_s:.0f} s: {report['requests']} requests ({summary['requests_per_s']}/s, {CLIENT_THREADS} clients), "
          f"errors {report['errors']}, empty {report['empty']}, violations {report['violations']}; "
          f"p50 {lat['p50_ms']} ms p95 {lat['p95_ms']} ms p99 {lat['p99_ms']} ms; moves "
          + ", ".join(f"{op} {counts[op]}" for op in OPS) + f"; {worker.archived_documents} documents archived; "
          f"setup {setup_s:.0f} s, total {summary['total_seconds']} s")

    assert not hung, f"a move never ended (deadlock or endless lock wait); last moves {worker.moves[-3:]}; sessions {activity}"
    assert worker.failure is None, worker.failure
    # Final state: the archive reconciles with what left Postgres.
    assert archive_reconciles(vp.pool(), vp.store(), names["docs"])["problems"] == []
    assert report["threads_alive"] == 0
    assert report["errors"] == 0, report["failures"].get("error")
    assert report["empty"] == 0, report["failures"].get("empty")
    assert report["violations"] == 0, report["failures"].get("violation")
    assert report["requests"] >= load_s, "the clients hardly searched"
    assert all(counts[op] > 0 for op in OPS), (
        f"not every kind of move ran: {dict(counts)}; timings {summary['move_timings']}; "
        f"last moves {[{k: m.get(k) for k in ('op', 'seconds', 'ok', 'kind', 'errors', 'slow')} for m in worker.moves[-3:]]}")
    assert worker.archived_documents > 0
    # The clients saw every state they were meant to see through: the tier collection both
    # active and cold, archived rows answered from the archive, both models serving.
    seen = report["tiers_seen"]
    assert seen[names["tier"]].get("active", 0) > 0 and seen[names["tier"]].get("cold", 0) > 0, seen
    assert seen[names["docs"]].get("archive", 0) > 0 and seen[names["docs"]].get("active", 0) > 0, seen
    assert set(report["models_seen"][names["swap"]]) == {MINILM.key, second.key}, report["models_seen"]
    log = server_log.read_text(errors="replace")
    assert "Traceback" not in log, log[-5000:]
