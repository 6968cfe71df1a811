"""The soak's clients, in a process of their own (their timing is not the test process's, whose
worker thread runs the platform's moves): several threads send the planned requests to the
HTTP API over keep-alive connections until a stop file appears (or a hard deadline passes),
check every answer against its probe's expectations, and write one JSON report.

    python -m vector_platform_tests.reliability.soak_clients PLAN.json REPORT.json

A plan: {"base": "http://127.0.0.1:PORT", "threads": 4, "stop_file": PATH, "hard_deadline_s": S,
"benign_warnings": [regex, ...], "probes": [probe, ...]}. A probe: {"kind", "method", "path",
"body" (POST), "expect": {...}} where `expect` may say
- `hits`: the exact number of hits (searches; every collection searched holds more than k rows);
- `tiers`: the source tiers a hit may carry; `one_tier`: all of a collection's non-archive hits
  in one tier (a collection answers from one tier at a time);
- `doc`: a document id that must be among the hits, with `doc_tiers` its allowed tiers;
- `one_model`: all hits of one model; `models`: the model keys allowed;
- `metadata`: {key: value} every hit's metadata holds (a filter's flat equalities);
- for a document read: `status`, `doc_id`, `source_tiers`.
A probe with `split_by_model` has its latencies also counted per serving model. A client stops
after `max_requests` requests too.

Every answer is one of: ok, an error (transport failure, status other than expected, a body
that is not JSON), empty (a search answered with no hits), or a violation (any other broken
expectation, a warning outside `benign_warnings`). The report holds counts, latency
percentiles overall and per kind, tiers and models seen per collection, and the first few
failures of each class and the answers slower than SLOW_MS, with their times (time.time()),
to set against the worker's moves.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import sys
import threading
import time
from collections import Counter, defaultdict
from urllib.parse import urlsplit

KEEP = 25  # failures kept per class
SLOW_MS = 1000.0  # answers slower than this are listed (with their times) to set against the moves


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return round(ordered[rank], 3)


def check_search(answer: dict, expect: dict, benign: list[re.Pattern]) -> tuple[str, str | None, dict]:
    """('ok' | 'empty' | 'violation', why, seen) for one search answer."""
    hits = answer.get("hits")
    if not isinstance(hits, list):
        return "violation", "no hits list", {}
    seen = {"tiers": Counter((h.get("collection"), h.get("source_tier")) for h in hits),
            "models": Counter((h.get("collection"), h.get("model")) for h in hits)}
    if not hits:
        return "empty", f"no hits (warnings: {answer.get('warnings')})", seen
    odd = [w for w in answer.get("warnings", []) if not any(p.search(w) for p in benign)]
    if odd:
        return "violation", f"warnings {odd}", seen
    if "hits" in expect and len(hits) != expect["hits"]:
        return "violation", f"{len(hits)} hits, expected {expect['hits']}", seen
    for h in hits:
        tier = h.get("source_tier")
        if tier not in expect.get("tiers", ("active", "cold", "archive")):
            return "violation", f"hit {h.get('doc_id')} of {h.get('collection')} labelled {tier!r}", seen
        if (tier == "cold") != ("snapshot_id" in h):
            return "violation", f"hit {h.get('doc_id')} labelled {tier!r} with snapshot_id {h.get('snapshot_id')}", seen
        if tier in ("cold", "archive") and h.get("exact") is not True:
            return "violation", f"{tier} hit {h.get('doc_id')} not marked exact", seen
    if expect.get("one_tier"):
        by_collection = defaultdict(set)
        for h in hits:
            if h["source_tier"] != "archive":
                by_collection[h["collection"]].add(h["source_tier"])
        mixed = {c: sorted(t) for c, t in by_collection.items() if len(t) > 1}
        if mixed:
            return "violation", f"one answer from two tiers of a collection: {mixed}", seen
    if "metadata" in expect:
        unmatched = [h.get("doc_id") for h in hits if any(h.get("metadata", {}).get(k) != v for k, v in expect["metadata"].items())]
        if unmatched:
            return "violation", f"hits {unmatched[:5]} do not match the filter {expect['metadata']}", seen
    if expect.get("one_model") and len({h.get("model") for h in hits}) != 1:
        return "violation", f"hits of several models: {sorted({h.get('model') for h in hits})}", seen
    if "models" in expect and not {h.get("model") for h in hits} <= set(expect["models"]):
        return "violation", f"hits of models {sorted({h.get('model') for h in hits})}", seen
    if "doc" in expect:
        mine = [h for h in hits if h.get("doc_id") == expect["doc"]]
        if not mine:
            return "violation", f"document {expect['doc']} not among the hits", seen
        if "doc_tiers" in expect and mine[0]["source_tier"] not in expect["doc_tiers"]:
            return "violation", f"document {expect['doc']} labelled {mine[0]['source_tier']!r}", seen
    return "ok", None, seen


def check_document(answer: dict, expect: dict) -> tuple[str, str | None, dict]:
    if answer.get("doc_id") != expect["doc_id"]:
        return "violation", f"answered document {answer.get('doc_id')!r}", {}
    tier = answer.get("source_tier")
    if tier not in expect["source_tiers"]:
        return "violation", f"document {expect['doc_id']} labelled {tier!r}", {}
    return "ok", None, {"tiers": Counter({(expect.get("collection"), tier): 1})}


class Report:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = Counter()
        self.latencies: dict[str, list[float]] = defaultdict(list)  # by kind, and kind[model] for split probes
        self.every: list[float] = []  # each request once
        self.failures: dict[str, list[dict]] = defaultdict(list)
        self.tiers = Counter()
        self.models = Counter()
        self.slow: list[dict] = []

    def add(self, kind: str, outcome: str, latency_ms: float, why: str | None, probe: dict, seen: dict, at: float) -> None:
        with self.lock:
            self.counts["requests"] += 1
            self.counts[outcome] += 1
            self.counts[f"{kind}:{outcome}"] += 1
            self.latencies[kind].append(latency_ms)
            self.every.append(latency_ms)
            models = {m for (_, m) in seen.get("models", {})}
            if probe.get("split_by_model") and len(models) == 1:  # e.g. which model embedded the query
                self.latencies[f"{kind}[{models.pop()}]"].append(latency_ms)
            self.tiers.update(seen.get("tiers", {}))
            self.models.update(seen.get("models", {}))
            if latency_ms > SLOW_MS and len(self.slow) < 4 * KEEP:
                self.slow.append({"at": at, "kind": kind, "ms": round(latency_ms, 1), "body": probe.get("body")})
            if outcome != "ok" and len(self.failures[outcome]) < KEEP:
                self.failures[outcome].append({"at": at, "kind": kind, "why": why, "path": probe["path"],
                                               "body": probe.get("body")})

    def as_json(self, started: float, ended: float) -> dict:
        def figures(values):
            return {"requests": len(values), "p50_ms": percentile(values, 50), "p95_ms": percentile(values, 95),
                    "p99_ms": percentile(values, 99), "max_ms": round(max(values), 3) if values else None}
        nested_tiers, nested_models = defaultdict(dict), defaultdict(dict)
        for (collection, tier), n in self.tiers.items():
            nested_tiers[str(collection)][str(tier)] = n
        for (collection, model), n in self.models.items():
            nested_models[str(collection)][str(model)] = n
        return {
            "started": started, "ended": ended, "seconds": round(ended - started, 3),
            "requests": self.counts["requests"], "ok": self.counts["ok"], "errors": self.counts["error"],
            "empty": self.counts["empty"], "violations": self.counts["violation"],
            "counts": dict(self.counts), "latency": figures(self.every),
            "latency_by_kind": {kind: figures(values) for kind, values in sorted(self.latencies.items())},
            "tiers_seen": nested_tiers, "models_seen": nested_models, "failures": dict(self.failures), "slow": self.slow,
        }


def client(plan: dict, report: Report, seed: int, stop) -> None:
    parts = urlsplit(plan["base"])
    probes = plan["probes"]
    weights = [p.get("weight", 1.0) for p in probes]
    benign = [re.compile(p) for p in plan.get("benign_warnings", [])]
    rng = random.Random(seed)
    conn = None
    for _ in range(plan["max_requests"]):
        if stop():
            break
        probe = rng.choices(probes, weights)[0]
        expect = probe.get("expect", {})
        body = json.dumps(probe["body"]).encode() if "body" in probe else None
        at = time.time()
        began = time.perf_counter()
        outcome, why, seen = "error", None, {}
        try:
            if conn is None:
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=plan.get("timeout_s", 60))
            conn.request(probe["method"], probe["path"], body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            raw = response.read()
            latency = (time.perf_counter() - began) * 1000
            if response.status != expect.get("status", 200):
                why = f"HTTP {response.status}: {raw[:300]!r}"
            else:
                try:
                    answer = json.loads(raw)
                except ValueError as err:
                    why = f"not JSON ({err}): {raw[:200]!r}"
                else:
                    if probe["path"] == "/search":
                        outcome, why, seen = check_search(answer, expect, benign)
                    else:
                        outcome, why, seen = check_document(answer, expect)
        except (OSError, http.client.HTTPException) as err:
            latency = (time.perf_counter() - began) * 1000
            why = f"{type(err).__name__}: {err}"
            if conn is not None:
                conn.close()
            conn = None
        report.add(probe["kind"], outcome, latency, why, probe, seen, at)
    if conn is not None:
        conn.close()


def main() -> int:
    plan = json.loads(open(sys.argv[1], encoding="utf-8").read())
    out = sys.argv[2]
    report = Report()
    started = time.time()
    hard_deadline = time.monotonic() + plan["hard_deadline_s"]

    def stop() -> bool:
        return os.path.exists(plan["stop_file"]) or time.monotonic() > hard_deadline

    threads = [threading.Thread(target=client, args=(plan, report, i, stop), daemon=True) for i in range(plan["threads"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(plan["hard_deadline_s"] + 120)
    result = report.as_json(started, time.time())
    result["threads_alive"] = sum(t.is_alive() for t in threads)
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f)
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
